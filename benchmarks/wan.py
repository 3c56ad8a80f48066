"""Over real slow links: the collectives, and the main job's DDP and DiLoCo as real processes,
each worker in a network namespace of its own with its upload and download shaped by tc's
token bucket (``islands.runtime.wan``; root only). Latency is not emulated (see that module).

1. Collectives (``benchmarks/collective.py --network MBIT`` for each bandwidth): gloo's fp32
   ``all_reduce`` against the butterfly with ``identity``, ``int8`` and ``int4``, 2 and 4
   workers, 16 and 128 MB: seconds, goodput, the ratio to gloo, and the link's utilization
   (payload bits each worker sent over the capacity times the time).
2. The main job's model (the byte-level GPT, 0.63M parameters, no warm start) under DDP,
   DiLoCo (H = 50), DiLoCo with its sync overlapped (``algorithm.overlap = "delayed"``) and
   DDP on gloo's own all_reduce (``runtime.trust = "cluster"``), 4
   workers (``--job-workers``), through ``islands launch --emulate-network``: the wall time
   per round (commit to commit, median) beside the simulator's virtual time per round for the
   same ``[network]`` (``framing`` TCP over Ethernet's), with ``[compute] step_time_s`` set
   from the measured inner steps (batch, forward, backward, optimizer step), and the ratio;
   twice: from the network model alone (``wire only``), and with ``[compute]
   commit_time_s``, a round's commit (the coordinator's barriers, the state's hashes),
   measured once per worker count as the commit of real DDP rounds on loopback
   (:func:`commit_time`).

3. ``--link-event``: a fault plan on real processes: the main job's DiLoCo (400 steps, H = 50,
   8 rounds) through ``islands launch --emulate-network`` with ``[[faults]]``: worker 1's
   link falls to a tenth of the bandwidth (both directions) at round 4. The wall time per
   round before and after the event (commit to commit, median) beside the simulator's, the
   same plan in its config.

Run it (as root): ``python benchmarks/wan.py`` (about 40 minutes on 2 cores), ``--quick`` for
one bandwidth, two sizes and fewer repeats; ``--link-event --no-collectives --jobs`` for the
fault plan alone. Writes ``bench-results/wan.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
# The bridge's latency, and TCP/IPv4 over Ethernet's framing (1514 bytes per 1448 of
# payload, what tbf counts) for the simulator: the real runs' links are shaped at line rate.
MAIN_JOB = ["device=cpu", "eval_every=1000000", "init.warm_start_steps=0",
            "network.latency_s=0.0001", f"network.framing={1514 / 1448}"]
JOBS = {"ddp": ["algorithm.name=ddp", "steps=30"],
        "diloco": ["algorithm.name=diloco", "algorithm.sync_every=50", "steps=250"],
        # DDP's steps on gloo's own all_reduce (runtime.trust = "cluster")
        "ddp-cluster": ["algorithm.name=ddp", "steps=30", "runtime.trust=cluster"],
        # each round's sync on a thread while the next round trains
        "diloco-delayed": ["algorithm.name=diloco", "algorithm.sync_every=50", "steps=250",
                           "algorithm.overlap=delayed", "outer.momentum=0.6"]}


def collectives(mbit: float, args: argparse.Namespace) -> list[dict]:
    """``benchmarks/collective.py --network`` at ``mbit``; its rows with the link's use."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "c.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "collective.py"), "--network",
                        str(mbit), "--no-sim", "--workers", *map(str, args.workers),
                        "--sizes-mb", *map(str, args.sizes_mb), "--codecs", *args.codecs,
                        "--repeats", str(args.repeats), "--json", str(out)], check=True)
        rows = json.loads(out.read_text())["dist"]
    for r in rows:
        r["mbit"] = mbit
        r["utilization"] = 8 * r["bytes_sent_per_worker"] / (mbit * 1e6 * r["butterfly_s"])
        # gloo's ring sends 2 (n - 1) / n of the tensor's fp32 bytes per worker
        gloo_bytes = 2 * (r["workers"] - 1) / r["workers"] * r["size_mb"] * 2**20
        r["gloo_utilization"] = 8 * gloo_bytes / (mbit * 1e6 * r["gloo_s"])
    return rows


def launch(sets: list[str], out: Path, *, emulate: bool) -> dict:
    """One real run of the main job (``islands launch``, over the shaped link with
    ``emulate``, else on loopback): its wall time per round (``round_s``: commit to commit,
    median), the measured compute of an inner step (``step_s``: its batch, forward, backward
    and optimizer step, what ``[compute] step_time_s`` stands for; a DDP step's all-reduce is
    not in it), and the median of its rows' ``sync_s`` (``commit_s``: from the round's last
    inner step to its commit)."""
    from islands.core.config import load_config
    from islands.metrics.run_dir import read_metrics

    islands_launch(sets, out, emulate=emulate)
    rows = read_metrics(out / "w0")
    commits = [r["commit_unix"] for r in rows]
    summary = json.loads((out / "w0" / "summary.json").read_text())
    return {"round_s": statistics.median(b - a for a, b in zip(commits, commits[1:])),
            "step_s": summary["compute_s_by_worker"][0] / load_config(None, sets).steps,
            "commit_s": statistics.median(r["sync_s"] for r in rows[1:]),
            "rounds": len(rows)}


def islands_launch(sets: list[str], out: Path, *, emulate: bool = True) -> None:
    """``islands launch`` of the main job with ``sets``, into ``out``, silent; over the
    shaped link with ``emulate``, else on loopback."""
    argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "launch",
            *(["--emulate-network"] if emulate else []),
            "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def commit_time(workdir: Path, workers: int) -> float:
    """``[compute] commit_time_s`` for the main job with ``workers`` workers: a real DDP run
    on loopback, the median of its rows' ``sync_s``. A DDP round is one step whose
    all-reduce is done before the step ends, so what is left is the commit alone: the
    coordinator's barriers and the shared state's hashes, the time per round the network
    model does not see. The collective's own passes over the bytes overlap the transfer
    on a real link and are not in it."""
    sets = [f"workers={workers}", *MAIN_JOB, *JOBS["ddp"]]
    return launch(sets, workdir / f"commit-{workers}", emulate=False)["commit_s"]


def job(algo: str, mbit: float, workdir: Path, workers: int = 4,
        commit_s: float = 0.0) -> dict:
    """One real run of the main job's model over the shaped link, and the simulator's
    prediction of its time per round: from the network model alone, and with the commit's
    time measured on loopback (``commit_s``: :func:`commit_time`)."""
    from islands.core.config import load_config
    from islands.sim.runner import simulate

    sets = [f"workers={workers}", *MAIN_JOB, *JOBS[algo], f"network.bandwidth_bps={mbit * 1e6}"]
    run = launch(sets, workdir / f"{algo}-{mbit:g}-{workers}", emulate=True)
    cfg = load_config(None, sets)
    wire_only, with_commit = (
        simulate(cfg.replace(**{"compute.step_time_s": run["step_s"],
                                "compute.commit_time_s": s}))
        for s in (0.0, commit_s))
    per_round = {k: p["virtual_time_s"] / p["rounds"]
                 for k, p in (("wire", wire_only), ("commit", with_commit))}
    measured = run["round_s"]
    return {"algorithm": algo, "mbit": mbit, "workers": cfg.workers, "rounds": run["rounds"],
            "measured_round_s": measured, "step_s": run["step_s"], "commit_s": commit_s,
            "predicted_round_s": per_round["commit"],
            "predicted_over_measured": per_round["commit"] / measured,
            "predicted_wire_only_round_s": per_round["wire"],
            "predicted_wire_only_over_measured": per_round["wire"] / measured}


LINK_EVENT_ROUND = 4


def link_event(mbit: float, workdir: Path, workers: int = 4) -> list[dict]:
    """The main job's DiLoCo as real processes with worker 1's link cut to a tenth at round
    :data:`LINK_EVENT_ROUND`, and the simulator's prediction for the same plan: s/round before
    and after, measured and predicted."""
    from islands.core.config import load_config
    from islands.metrics.run_dir import read_metrics
    from islands.sim.runner import Simulation

    slow = mbit * 1e5
    plan = (f'faults=[{{kind = "link", worker = 1, round = {LINK_EVENT_ROUND}, '
            f'upload_bps = {slow}, download_bps = {slow}}}]')
    sets = [f"workers={workers}", *MAIN_JOB, "algorithm.name=diloco", "algorithm.sync_every=50",
            "steps=400", f"network.bandwidth_bps={mbit * 1e6}", plan]
    out = workdir / f"link-{mbit:g}-{workers}"
    islands_launch(sets, out)
    cfg = load_config(None, sets)
    summary = json.loads((out / "w0" / "summary.json").read_text())
    step_s = summary["compute_s_by_worker"][0] / cfg.steps
    sim = workdir / f"link-sim-{mbit:g}-{workers}"
    Simulation(cfg.replace(**{"compute.step_time_s": step_s}), out_dir=sim).run()

    def per_round(times: list[float]) -> dict[str, float]:  # round k: its commit - k-1's
        d = {k: b - a for k, (a, b) in enumerate(zip(times, times[1:]), start=1)}
        return {"before": statistics.median(v for k, v in d.items() if k < LINK_EVENT_ROUND),
                "after": statistics.median(v for k, v in d.items() if k >= LINK_EVENT_ROUND)}

    measured = per_round([r["commit_unix"] for r in read_metrics(out / "w0")])
    predicted = per_round([r["virtual_time_s"] for r in read_metrics(sim) if r["worker"] == 0])
    carried = json.loads((out / "summary.json").read_text())["faults_carried_out"]
    return [{"phase": phase, "mbit": mbit, "link_mbit": slow / 1e6, "workers": workers,
             "step_s": step_s, "measured_round_s": measured[phase],
             "predicted_round_s": predicted[phase],
             "predicted_over_measured": predicted[phase] / measured[phase],
             "carried_out": carried} for phase in ("before", "after")]


def print_tables(coll: list[dict], jobs: list[dict]) -> None:
    t = Table(title="collectives over shaped links (medians, one torch thread per worker)")
    for col in ("Mbit/s", "workers", "MB", "codec", "gloo s", "bfly s", "vs gloo",
                "link used (bfly)", "link used (gloo)", "same"):
        t.add_column(col, justify="right")
    for r in coll:
        t.add_row(f"{r['mbit']:g}", str(r["workers"]), f"{r['size_mb']:g}", r["codec"],
                  f"{r['gloo_s']:.2f}", f"{r['butterfly_s']:.2f}", f"{r['vs_gloo']:.2f}x",
                  f"{100 * r['utilization']:.0f}%", f"{100 * r['gloo_utilization']:.0f}%",
                  "yes" if r["identical_on_every_worker"] else "NO")
    j = Table(title="the main job's model as real processes vs the simulator's prediction")
    for col in ("algorithm", "Mbit/s", "workers", "step s", "commit s", "measured s/round",
                "predicted s/round", "predicted / measured", "wire only / measured"):
        j.add_column(col, justify="right")
    for r in jobs:
        j.add_row(r["algorithm"], f"{r['mbit']:g}", str(r["workers"]), f"{r['step_s']:.3f}",
                  f"{r['commit_s']:.3f}", f"{r['measured_round_s']:.3f}",
                  f"{r['predicted_round_s']:.3f}", f"{r['predicted_over_measured']:.2f}",
                  f"{r['predicted_wire_only_over_measured']:.2f}")
    console = Console(width=160)
    for table, rows in ((t, coll), (j, jobs)):
        if rows:
            console.print(table)


def print_link_event(rows: list[dict]) -> None:
    t = Table(title=f"a link event on real processes: worker 1's link falls to a tenth at "
                    f"round {LINK_EVENT_ROUND} (DiLoCo, H = 50)")
    for col in ("Mbit/s", "worker 1 after", "workers", "phase", "measured s/round",
                "predicted s/round", "predicted / measured"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['mbit']:g}", f"{r['link_mbit']:g}", str(r["workers"]), r["phase"],
                  f"{r['measured_round_s']:.3f}", f"{r['predicted_round_s']:.3f}",
                  f"{r['predicted_over_measured']:.2f}")
    Console(width=160).print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bandwidths", type=float, nargs="+", default=[100.0, 1000.0],
                   metavar="MBIT")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[16.0, 128.0])
    p.add_argument("--codecs", nargs="+", default=["identity", "int8", "int4"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--job-workers", type=int, nargs="+", default=[4], metavar="N",
                   help="the main job's worker counts (4: two processes per core here)")
    p.add_argument("--no-collectives", action="store_true")
    p.add_argument("--link-event", action="store_true",
                   help="also the fault plan's link event on real processes (3. above)")
    p.add_argument("--quick", action="store_true",
                   help="100 Mbit/s only, 2 workers, 16 MB, 3 repeats")
    p.add_argument("--json", default="bench-results/wan.json")
    args = p.parse_args()
    if args.quick:
        args.bandwidths, args.workers, args.sizes_mb, args.repeats = [100.0], [2], [16.0], 3
    coll = [] if args.no_collectives else [r for m in args.bandwidths
                                          for r in collectives(m, args)]
    with tempfile.TemporaryDirectory() as tmp:
        commits = {n: commit_time(Path(tmp), n) for n in args.job_workers} if args.jobs \
            else {}
        jobs = [job(a, m, Path(tmp), n, commits[n]) for n in args.job_workers
                for m in args.bandwidths for a in args.jobs]
        link = [r for n in args.job_workers for m in args.bandwidths
                for r in link_event(m, Path(tmp), n)] if args.link_event else []
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"argv": sys.argv, "collectives": coll,
                                           "jobs": jobs, "link_event": link}, indent=2) + "\n")
    print_tables(coll, jobs)
    if link:
        print_link_event(link)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
