"""Overlapped, streaming and asynchronous DiLoCo against blocking DiLoCo in the simulator, on
the main-job setup (4 workers, 400 inner steps from the shared warm start, H = 50) over slow
links with 50 ms latency.

Each variant is one simulation per link and seed: final eval loss (and its change against
blocking DiLoCo on the same link and seed), virtual time, compute utilization, communication
hidden behind compute and exposed (waited for) per worker, bytes sent per worker, the most
bytes a worker sent in one round (a sync: streaming's carries one fragment), and the
virtual time to reach blocking DiLoCo's final loss + 2% (``-``: never). The plot draws eval
loss against virtual time, one panel per link.

Run it (each simulation takes about 1.5 minutes on one core; ``--jobs 2`` runs two at once):

    python benchmarks/overlap.py --jobs 2
    python benchmarks/overlap.py --bandwidths 20 --seeds 0 1 2 --jobs 2
    python benchmarks/overlap.py --weather --jobs 2 --json bench-results/weather.json

``--weather`` runs the straggler policy and the fault plan instead (100 Mbit/s): one worker 3x
slower, DiLoCo waiting for it against DiLoCo with a quorum of 3 of 4, asynchronous local SGD
and DDP; then the same with a crash every 8 virtual seconds (the crashed worker back 4 s
later); then two workers lost for good
(crashes at 8 and 16 s): DiLoCo waiting, DiLoCo with the delayed overlap, asynchronous local
SGD.

Writes ``bench-results/overlap.json`` and ``.png`` (``--json`` moves both).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

MAIN_JOB = ["steps=400", "init.warm_start_steps=1000", "algorithm.name=diloco",
            "network.latency_s=0.05"]
ASYNC = ["algorithm.name=async_local_sgd", "outer.momentum=0.3"]
# label -> overrides; the overlapped variants with the outer momentum they train best with
# here (0.9, blocking's, is in the table too: one-round-old updates under heavy momentum
# overshoot)
VARIANTS: dict[str, list[str]] = {
    "blocking": [],
    "delayed": ["algorithm.overlap=delayed", "outer.momentum=0.6"],
    "eager": ["algorithm.overlap=eager", "outer.momentum=0.6"],
    # Kale et al.'s update: the worker's fresh share of the average mixed with the others'
    # one-round-old shares, each worker on its own outer SGD
    "eager, paper": ["algorithm.overlap=eager", "algorithm.eager=share", "outer.momentum=0.6"],
    # ... with the gentler outer step it trains best with here (seed 0, 150 Mbit/s, H = 8:
    # lr 0.4 at momentum 0.6 or 0.3, lr 0.7 or 1.0 at 0 and 0.3 were tried)
    "eager, paper, lr 0.4": ["algorithm.overlap=eager", "algorithm.eager=share",
                             "outer.lr=0.4", "outer.momentum=0.6"],
    "delayed, momentum 0.9": ["algorithm.overlap=delayed"],
    # H = 50 per fragment: 5 fragments, a round of 10 steps, each sync landing 5 steps late
    "streaming": ["algorithm.name=streaming_diloco", "algorithm.fragments=5",
                  "algorithm.tau=5", "algorithm.alpha=0.5"],
    # rounds of 5 steps: the last sync, which every run waits for, is half as long
    "streaming, 10 fragments": ["algorithm.name=streaming_diloco", "algorithm.fragments=10",
                                "algorithm.tau=5", "algorithm.alpha=0.5"],
    # asynchronous local SGD with the outer momentum it trains best with here (0.3; stale
    # updates under DiLoCo's 0.9 overshoot)
    "async": [*ASYNC],
    # every update goes to every other worker: (workers - 1) times its size up per update,
    # against about twice its size per round for the all-reduce; int8 makes it 4x smaller
    "async, int8": [*ASYNC, "codec.name=int8"],
}

# --weather: one worker 3x slower throughout, alone or with a fault plan (a crash every
# 8 virtual seconds, the crashed worker back 4 s later), at 100 Mbit/s
SLOW = ["compute.worker=[{id = 3, step_time_s = 0.3}]"]
CRASHES = ("faults=[" + ", ".join(
    f'{{kind = "crash", worker = {w}, at_s = {t}}}, {{kind = "join", worker = {w}, '
    f'at_s = {t + 4}}}' for w, t in ((1, 8), (2, 16), (1, 24), (2, 32))) + "]")
LOSSES = 'faults=[{kind = "crash", worker = 1, at_s = 8}, {kind = "crash", worker = 2, at_s = 16}]'
WEATHER: dict[str, list[str]] = {
    "straggler: DiLoCo waits": [*SLOW],
    "straggler: DiLoCo, quorum 3 of 4": [*SLOW, "algorithm.min_quorum=3"],
    "straggler: DDP waits": [*SLOW, "algorithm.name=ddp"],
    "straggler: async local SGD": [*SLOW, *ASYNC],
    "crashes + straggler: DiLoCo waits": [*SLOW, CRASHES],
    "crashes + straggler: DiLoCo, quorum 3": [*SLOW, CRASHES, "algorithm.min_quorum=3"],
    "crashes + straggler: DDP": [*SLOW, CRASHES, "algorithm.name=ddp"],
    # two workers lost for good (crashes at 8 and 16 virtual seconds, no rejoin), also for
    # the overlapped algorithms, whose fault plan takes no join
    "crashes + straggler: async local SGD": [*SLOW, *ASYNC, CRASHES],
    "losses + straggler: DiLoCo waits": [*SLOW, LOSSES],
    "losses + straggler: DiLoCo, delayed overlap": [*SLOW, LOSSES, *VARIANTS["delayed"]],
    "losses + straggler: async local SGD": [*SLOW, *ASYNC, LOSSES],
}


def run_one(variant: str, mbit: float, seed: int, threads: int, sync_every: int) -> dict:
    import torch

    from islands import load_config, simulate

    torch.set_num_threads(threads)
    sets = [*MAIN_JOB, *{**VARIANTS, **WEATHER}[variant], f"network.bandwidth_bps={mbit * 1e6}",
            f"seed={seed}", *([f"algorithm.sync_every={sync_every}"] if sync_every != 50 else [])]
    t0 = time.perf_counter()
    s = simulate(load_config(None, sets))
    return {"variant": variant, "mbit": mbit, "seed": seed, "sync_every": sync_every,
            "overrides": {**VARIANTS, **WEATHER}[variant],
            "final_eval_loss": s["final_eval_loss"], "virtual_time_s": s["virtual_time_s"],
            "compute_utilization": s["compute_utilization"],
            "comm_hidden_s": statistics.mean(s["comm_hidden_s_by_worker"]),
            "comm_exposed_s": statistics.mean(s["comm_exposed_s_by_worker"]),
            "bytes_sent_per_worker": s["bytes_sent_per_worker"],
            "peak_round_bytes_sent": s["peak_round_bytes_sent"],
            "eval_curve": [(p["virtual_time_s"], p["eval_loss"]) for p in s["eval_curve"]],
            "wall_s": time.perf_counter() - t0}


def link(r: dict) -> str:
    """The link, and H where it is not the main job's (rows written before H was a knob: 50)."""
    h = r.get("sync_every", 50)
    return f"{r['mbit']:g} Mbit/s" + (f", H = {h}" if h != 50 else "")


def add_comparisons(rows: list[dict]) -> None:
    """Loss change against the baseline on the same link and seed (blocking DiLoCo; in the
    weather rows, DiLoCo waiting for the straggler); time to its loss + 2%."""
    def baseline(variant: str) -> str:
        if variant.startswith(("crashes", "losses")):
            return f"{variant.split(':')[0]}: DiLoCo waits"
        return "straggler: DiLoCo waits" if variant.startswith("straggler") else "blocking"

    base = {(r["variant"], link(r), r["seed"]): r for r in rows}
    for r in rows:
        b = base.get((baseline(r["variant"]), link(r), r["seed"]))
        if b is None:
            r["loss_vs_blocking_pct"] = r["time_to_target_s"] = None
            continue
        r["loss_vs_blocking_pct"] = 100 * (r["final_eval_loss"] / b["final_eval_loss"] - 1)
        target = 1.02 * b["final_eval_loss"]
        r["time_to_target_s"] = next((t for t, loss in r["eval_curve"] if loss <= target),
                                     None)


def table(rows: list[dict]) -> Table:
    t = Table(title="The main job in the simulator (mean over seeds, ± std; vs: against "
                    "blocking DiLoCo, or DiLoCo waiting for the straggler)")
    for col in ("link", "variant", "seeds", "eval loss", "vs", "virtual s",
                "utilization", "hidden s", "exposed s", "MB/worker", "peak MB/sync",
                "s to blocking +2%"):
        t.add_column(col, justify="left" if col in ("link", "variant") else "right")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((link(r), r["variant"]), []).append(r)
    for (where, variant), rs in groups.items():
        def stat(key, fmt):
            xs = [r[key] for r in rs if r[key] is not None]
            if not xs:
                return "-"
            sd = (f" ± {statistics.stdev(xs):{fmt.lstrip('+')}}" if len(xs) > 1 else "")
            return f"{statistics.mean(xs):{fmt}}{sd}"
        t.add_row(where, variant, str(len(rs)), stat("final_eval_loss", ".4f"),
                  stat("loss_vs_blocking_pct", "+.2f") + "%", stat("virtual_time_s", ".1f"),
                  stat("compute_utilization", ".3f"), stat("comm_hidden_s", ".2f"),
                  stat("comm_exposed_s", ".2f"),
                  f"{rs[0]['bytes_sent_per_worker'] / 1e6:.1f}",
                  f"{rs[0]['peak_round_bytes_sent'] / 1e6:.2f}",
                  stat("time_to_target_s", ".1f"))
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = sorted({link(r) for r in rows}, key=lambda w: float(w.split()[0]))
    fig, axes = plt.subplots(1, len(links), figsize=(6 * len(links), 4.5), squeeze=False)
    for ax, where in zip(axes[0], links):
        for r in rows:
            if link(r) == where and r["seed"] == min(x["seed"] for x in rows):
                ax.plot(*zip(*r["eval_curve"]), marker=".", label=r["variant"])
        ax.set(title=f"{where}, 50 ms", xlabel="virtual time (s)",
               ylabel="eval loss", yscale="log", xscale="log" if any(
                   r["variant"].startswith(("straggler", "crashes", "losses"))
                   for r in rows) else "linear")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bandwidths", type=float, nargs="+", default=[20, 100, 1000],
                   help="links in Mbit/s")
    p.add_argument("--variants", nargs="+", default=None, choices=[*VARIANTS, *WEATHER],
                   metavar="VARIANT", help=f"of {list(VARIANTS)} (default: all), or with "
                   f"--weather of {list(WEATHER)}")
    p.add_argument("--weather", action="store_true",
                   help="the straggler and fault-plan scenarios instead (100 Mbit/s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sync-every", type=int, default=50, metavar="H",
                   help="inner steps per round (algorithm.sync_every; streaming: per fragment)")
    p.add_argument("--jobs", type=int, default=1, help="simulations at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per simulation")
    p.add_argument("--json", default="bench-results/overlap.json")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge the rows of earlier --json files into --json, its "
                        "table and its plot")
    args = p.parse_args()
    if args.variants is None:
        args.variants = list(WEATHER if args.weather else VARIANTS)
    if args.weather and args.bandwidths == p.get_default("bandwidths"):
        args.bandwidths = [100]
    todo = [(v, m, s) for m in args.bandwidths for s in args.seeds for v in args.variants]
    console = Console(width=180)
    rows = []
    if args.report:
        todo = []
        for path in args.report:
            rows += json.loads(Path(path).read_text())["rows"]
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, v, m, s, args.threads, args.sync_every) for v, m, s in todo]
        for i, f in enumerate(futures, 1):
            r = f.result()
            rows.append(r)
            console.print(f"[{i}/{len(todo)}] {r['mbit']:g} Mbit/s {r['variant']} seed "
                          f"{r['seed']}: eval loss {r['final_eval_loss']:.4f}, utilization "
                          f"{r['compute_utilization']:.3f} ({r['wall_s']:.0f} s)")
    add_comparisons(rows)
    console.print(table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads_per_simulation": args.threads, "rows": rows},
                              indent=1, default=lambda x: None if isinstance(x, float)
                              and math.isnan(x) else x) + "\n")
    plot(rows, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
