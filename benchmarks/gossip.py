"""Gossip against the all-reduce in the simulator: each topology x gossip algorithm on the
main-job setup (400 inner steps from the shared warm start, H = 50, 100 Mbit/s, 50 ms), beside
all-reduce DiLoCo and DDP.

Each run reports the final eval loss of the workers' average model (what the single final
merge, ``algorithm.final_merge``, gives every worker: the merge is that average, exactly) and
of the workers' own models (the mean over a fixed sample of four: what each would keep without
the merge), the consensus distance over rounds, bytes sent per worker, the busiest directed
link's bytes and the virtual time. ``--partition dirichlet`` gives each worker a skewed share
(Dirichlet, ``data.alpha``); ``--modest`` runs MoDeST with and without 80% of the workers
crashing at the middle of the run instead.

Run it (a simulation of 8 workers takes about 1.5 minutes on one core; ``--jobs 2`` runs two
at once):

    python benchmarks/gossip.py --jobs 2
    python benchmarks/gossip.py --workers 16 --topologies ring exponential --jobs 2
    python benchmarks/gossip.py --partition dirichlet --jobs 2
    python benchmarks/gossip.py --modest --workers 10 --jobs 2
    python benchmarks/gossip.py --algorithms noloco --topologies matching --seeds 0 1 2
    python benchmarks/gossip.py --topologies ring --baselines --algorithms \
        "gossip_diloco, cut in half rounds 2-5" "gossip_diloco, variance-corrected"
    python benchmarks/gossip.py --topologies barabasi_albert --baselines --algorithms \
        gossip_diloco "gossip_diloco, cut in half from round 2" \
        "gossip_diloco, half crash at round 2" --seeds 0 1 2 --jobs 2

Writes ``bench-results/gossip.json`` and ``.png`` (``--json`` moves both): eval loss against
bytes sent and against virtual time, one panel per topology.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

MAIN_JOB = ["steps=400", "init.warm_start_steps=1000", "algorithm.sync_every=50",
            "network.latency_s=0.05"]
TOPOLOGIES = ("ring", "torus", "exponential", "regular", "barabasi_albert", "complete",
              "matching", "one_peer_exponential")
# label -> overrides (the topology is added per row)
ALGORITHMS: dict[str, list[str]] = {
    # two exchanges a round: the pseudo-gradients, then the outer steps' results
    "gossip_diloco": ["algorithm.name=gossip_diloco"],
    # one: the parameters after the inner steps (half the bytes)
    "gossip_diloco, send local": ["algorithm.name=gossip_diloco", "algorithm.send=local"],
    "gossip_diloco, send local, 2 gossip steps": [
        "algorithm.name=gossip_diloco", "algorithm.send=local", "topology.gossip_steps=2"],
    "gossip local SGD": ["algorithm.name=dsgd"],  # sync_every 50: local SGD with gossip
    # NoLoCo: one vector a round to a random partner (its own pairing, whatever the topology)
    "noloco": ["algorithm.name=noloco"],
    "noloco, heavy-ball 0.3": ["algorithm.name=noloco", "outer.nesterov=false",
                               "outer.momentum=0.3"],
    "gossip_diloco, variance-corrected": ["algorithm.name=gossip_diloco",
                                          "topology.variance_correction=true"],
    # NoLoCo's pull toward the pair's global parameters at another weight than the
    # pseudo-gradient's (the paper's γ/β): two vectors a round
    "noloco, pull 0.5": ["algorithm.name=noloco", "algorithm.pull=0.5"],
    "noloco, pull 2": ["algorithm.name=noloco", "algorithm.pull=2"],
}
# a gossip DiLoCo ring cut in half (workers [0, n/2) | the rest) at round 2, healed at round 6
# of 8 or never: the fault plan's partition and heal
PARTITIONS: dict[str, tuple[int, int | None]] = {
    "gossip_diloco, cut in half rounds 2-5": (2, 6),
    "gossip_diloco, cut in half from round 2": (2, None),
}
# the disaster-scenario contrast: from round 2 of 8, half the workers lose their links to the
# others (the partition above: every worker's data stays) or crash (their data is gone; the
# survivors regroup on a new graph of their own)
CRASHES: dict[str, int] = {"gossip_diloco, half crash at round 2": 2}
BASELINES: dict[str, list[str]] = {
    "all-reduce DiLoCo": ["algorithm.name=diloco"],
    "DDP": ["algorithm.name=ddp"],
}
# --modest: a sample of 20% trains and averages each round; 80% of the workers crash at the
# middle of the run (the simulator's crash: the round they compute is their last)
MODEST = ["algorithm.name=modest", "algorithm.sample_fraction=0.2"]


def crash_faults(gone, round: int) -> str:
    return "faults=[" + ", ".join(f"{{kind='crash', worker={w}, round={round}}}"
                                  for w in gone) + "]"


def modest_crash(workers: int, steps: int = 400, h: int = 50) -> str:
    return crash_faults(range(workers - max(1, round(0.8 * workers)), workers), steps // h // 2)


def partition_faults(workers: int, cut: int, heal: int | None) -> str:
    events = [f"{{kind='partition', workers={list(range(workers // 2))}, round={cut}}}"]
    if heal is not None:
        events.append(f"{{kind='heal', round={heal}}}")
    return "faults=[" + ", ".join(events) + "]"


def run_one(label: str, topology: str | None, workers: int, seed: int, partition: str,
            threads: int) -> dict:
    import torch

    from islands import load_config, simulate

    torch.set_num_threads(threads)
    sets = [*MAIN_JOB, f"workers={workers}", f"seed={seed}", f"data.partition={partition}",
            *overrides(label, topology, workers)]
    t0 = time.perf_counter()
    s = simulate(load_config(None, sets))
    curve = s["eval_curve"]
    return {"label": label, "topology": topology, "workers": workers, "seed": seed,
            "partition": partition, "overrides": overrides(label, topology, workers),
            "final_eval_loss": s["final_eval_loss"],
            "final_eval_loss_own": s.get("final_eval_loss_own", s["final_eval_loss"]),
            "spectral_gap": s.get("topology", {}).get("spectral_gap"),
            "consensus": [(p["step"], p.get("consensus_distance", 0.0)) for p in curve],
            "bytes_sent_per_worker": s["bytes_sent_per_worker"],
            "busiest_link_bytes": s["busiest_link_bytes"],
            "virtual_time_s": s["virtual_time_s"],
            "eval_curve": [(p["virtual_time_s"], p["bytes_sent_per_worker"], p["eval_loss"])
                           for p in curve],
            "wall_s": time.perf_counter() - t0}


def overrides(label: str, topology: str | None, workers: int) -> list[str]:
    if label in BASELINES:
        return BASELINES[label]
    if label.startswith("MoDeST"):
        return [*MODEST, *([modest_crash(workers)] if "crash" in label else [])]
    if label in PARTITIONS:
        return ["algorithm.name=gossip_diloco", f"topology.name={topology}",
                partition_faults(workers, *PARTITIONS[label])]
    if label in CRASHES:
        return ["algorithm.name=gossip_diloco", f"topology.name={topology}",
                crash_faults(range(workers // 2, workers), CRASHES[label])]
    return [*ALGORITHMS[label], f"topology.name={topology}"]


def table(rows: list[dict]) -> Table:
    t = Table(title="Gossip in the simulator (mean over seeds ± std; vs: the average model "
                    "against all-reduce DiLoCo, same workers, partition and seed)")
    for col in ("workers", "algorithm", "topology", "gap", "seeds", "average model", "vs",
                "own models", "consensus", "MB/worker", "busiest link MB", "virtual s"):
        t.add_column(col, justify="left" if col in ("algorithm", "topology") else "right")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workers"], r["partition"], r["label"], r["topology"]),
                          []).append(r)
    for (workers, partition, label, topology), rs in groups.items():
        def stat(key, fmt):
            xs = [r[key] for r in rs if r.get(key) is not None]
            if not xs:
                return "-"
            sd = f" ± {statistics.stdev(xs):{fmt.lstrip('+')}}" if len(xs) > 1 else ""
            return f"{statistics.mean(xs):{fmt}}{sd}"
        gap = rs[0]["spectral_gap"]
        t.add_row(f"{workers}{'' if partition == 'iid' else ' ' + partition}", label,
                  topology or "-", "-" if gap is None else f"{gap:.3f}", str(len(rs)),
                  stat("final_eval_loss", ".4f"), stat("vs_allreduce_pct", "+.2f") + "%",
                  stat("final_eval_loss_own", ".4f"),
                  f"{statistics.mean(r['consensus'][-1][1] for r in rs):.3g}",
                  f"{rs[0]['bytes_sent_per_worker'] / 1e6:.1f}",
                  f"{rs[0]['busiest_link_bytes'] / 1e6:.1f}", stat("virtual_time_s", ".1f"))
    return t


def add_comparisons(rows: list[dict]) -> None:
    base = {(r["workers"], r["partition"], r["seed"]): r for r in rows
            if r["label"] == "all-reduce DiLoCo"}
    for r in rows:
        b = base.get((r["workers"], r["partition"], r["seed"]))
        r["vs_allreduce_pct"] = (None if b is None else
                                 100 * (r["final_eval_loss"] / b["final_eval_loss"] - 1))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topologies = sorted({r["topology"] for r in rows if r["topology"]}) or ["-"]
    seed = min(r["seed"] for r in rows)
    labels = sorted({(r["label"], r["workers"], r["partition"]) for r in rows})
    color = {key: plt.get_cmap("tab10")(i % 10) for i, key in enumerate(labels)}
    cols = min(4, len(topologies))
    per = -(-len(topologies) // cols)  # rows of panels per measure
    fig, axes = plt.subplots(3 * per, cols, figsize=(4.5 * cols, 3.6 * 3 * per),
                             squeeze=False)
    for k, topology in enumerate(topologies):
        by_bytes, by_time = axes[k // cols][k % cols], axes[per + k // cols][k % cols]
        spread = axes[2 * per + k // cols][k % cols]
        for r in rows:
            if r["seed"] != seed or r["topology"] not in (topology, None):
                continue
            t, b, loss = zip(*r["eval_curve"])
            skew = "" if r["partition"] == "iid" else f", {r['partition']}"
            name = f"{r['label']} ({r['workers']}{skew})"
            kw = {"marker": ".", "label": name,
                  "color": color[(r["label"], r["workers"], r["partition"])],
                  "linestyle": "--" if r["topology"] is None else "-"}
            by_bytes.plot([x / 1e6 for x in b], loss, **kw)
            by_time.plot(t, loss, **kw)
            if r["topology"] is not None:
                spread.plot(*zip(*r["consensus"]), **kw)
        by_bytes.set(title=f"{topology}: loss against bytes", xlabel="MB sent per worker",
                     ylabel="eval loss (average model)", xscale="symlog")
        by_time.set(title=f"{topology}: loss against time", xlabel="virtual time (s)",
                    ylabel="eval loss (average model)")
        spread.set(title=f"{topology}: consensus distance", xlabel="inner step",
                   ylabel="mean distance to the average")
        by_bytes.legend(fontsize=6)
    for k in range(len(topologies), per * cols):  # empty panels
        axes[k // cols][k % cols].axis("off")
        axes[per + k // cols][k % cols].axis("off")
        axes[2 * per + k // cols][k % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[8])
    p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    p.add_argument("--algorithms", nargs="+", default=["gossip_diloco"],
                   choices=[*ALGORITHMS, *PARTITIONS, *CRASHES])
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES))
    p.add_argument("--modest", action="store_true",
                   help="MoDeST with and without 80%% of the workers crashing mid-run instead")
    p.add_argument("--partition", default="iid", choices=("iid", "dirichlet"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="simulations at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per simulation")
    p.add_argument("--json", default="bench-results/gossip.json")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge the rows of earlier --json files into --json, its "
                        "table and its plot")
    args = p.parse_args()
    if args.modest:
        runs = [(label, None) for label in ("MoDeST", "MoDeST, 80% crash mid-run")]
    else:
        runs = [(b, None) for b in args.baselines] + [
            (a, t) for a in args.algorithms for t in args.topologies]
    todo = [(label, t, n, s) for n in args.workers for s in args.seeds for label, t in runs]
    rows = []
    if args.report:
        todo = []
        for path in args.report:
            rows += json.loads(Path(path).read_text())["rows"]
    console = Console(width=200)
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, label, t, n, s, args.partition, args.threads)
                   for label, t, n, s in todo]
        for i, f in enumerate(futures, 1):
            r = f.result()
            rows.append(r)
            console.print(f"[{i}/{len(todo)}] {r['workers']} workers, {r['label']}"
                          f"{', ' + r['topology'] if r['topology'] else ''}, seed {r['seed']}: "
                          f"average {r['final_eval_loss']:.4f}, own "
                          f"{r['final_eval_loss_own']:.4f} ({r['wall_s']:.0f} s)")
    add_comparisons(rows)
    console.print(table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": MAIN_JOB, "threads_per_simulation": args.threads,
                               "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
