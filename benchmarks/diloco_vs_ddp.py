"""DiLoCo against DDP (and LocalSGD, and one worker alone) on the main job's setup (400 inner
steps from a shared 1000-step warm start), at 4 and 8 workers with sync_every 50 and 100:
final eval loss, bytes per worker, traffic reduction, and virtual time on a 100 Mbit/s, 50 ms
network.

Run it:
    .venv/bin/python benchmarks/diloco_vs_ddp.py                 # full grid (~15 min on 2 cores)
    .venv/bin/python benchmarks/diloco_vs_ddp.py --warm-start-steps 0 --steps 500   # cold start
    .venv/bin/python benchmarks/diloco_vs_ddp.py --steps 100     # quick look
    .venv/bin/python benchmarks/diloco_vs_ddp.py --algorithms diloco   # without LocalSGD
    .venv/bin/python benchmarks/diloco_vs_ddp.py --device cuda   # on a GPU

Prints one table and writes JSON (``--json``, default bench-results/diloco_vs_ddp.json) and a
plot beside it. Runs are simulations: results are deterministic for a seed; wall times are not.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from islands.core.config import load_config
from islands.metrics.compare import comparison_rows, make_console, render_table
from islands.metrics.plots import plot_runs
from islands.sim.main_job import MAIN_JOB_SETUP
from islands.sim.runner import resolve_device, simulate


def grid(workers: list[int], sync_every: list[int], algorithms: list[str]
         ) -> list[tuple[str, list[str]]]:
    """(label, overrides) for every run of the benchmark."""
    runs = [("single", ["workers=1", "algorithm.name=ddp"])]
    for n in workers:
        runs.append((f"ddp-{n}w", [f"workers={n}", "algorithm.name=ddp"]))
        for h in sync_every:
            for algo in algorithms:
                runs.append((f"{algo}-{n}w-H{h}", [f"workers={n}", f"algorithm.name={algo}",
                                                    f"algorithm.sync_every={h}"]))
    return runs


def device_name(device: str) -> str:
    d = resolve_device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--sync-every", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--algorithms", nargs="+", default=["diloco", "local_sgd"],
                        choices=["diloco", "local_sgd"], help="compared with DDP and single")
    parser.add_argument("--steps", type=int, default=MAIN_JOB_SETUP["steps"],
                        help="inner steps per worker (default: the main job's)")
    parser.add_argument("--warm-start-steps", type=int,
                        default=MAIN_JOB_SETUP["init"]["warm_start_steps"],
                        help="steps of the shared warm start (default: the main job's; 0: none)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", default="bench-results/diloco_vs_ddp.json")
    args = parser.parse_args()

    common = [f"device={args.device}", f"steps={args.steps}",
              f"init.warm_start_steps={args.warm_start_steps}"]
    console = make_console()
    summaries = []
    runs = grid(args.workers, args.sync_every, args.algorithms)
    started = time.perf_counter()
    for i, (label, overrides) in enumerate(runs, 1):
        cfg = load_config(None, [*common, *overrides, f"name='{label}'"])
        t0 = time.perf_counter()
        summaries.append(simulate(cfg))
        console.print(f"[{i}/{len(runs)}] {label}: eval loss "
                      f"{summaries[-1]['final_eval_loss']:.4f} in {time.perf_counter() - t0:.0f} s")
    rows = comparison_rows(summaries)
    render_table(rows, title=f"DiLoCo vs DDP ({device_name(args.device)})", console=console)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name(args.device), "torch": torch.__version__,
              "wall_time_s": time.perf_counter() - started, "rows": rows,
              "checks": checks(rows)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_runs(summaries, out.with_suffix(".png"), title="DiLoCo vs DDP")
    for line in result["checks"]:
        console.print(line)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


def checks(rows: list[dict]) -> list[str]:
    """The issue's acceptance figures, stated plainly for every DiLoCo run."""
    single = next(r for r in rows if r["name"] == "single")
    lines = []
    for r in rows:
        if r["algorithm"] != "diloco" or r["loss_vs_ddp"] is None:
            continue
        ok_loss = r["loss_vs_ddp"] <= 0.05
        ok_bytes = r["traffic_reduction_vs_ddp"] >= 0.9 * r["sync_every"]
        ok_single = r["final_eval_loss"] < single["final_eval_loss"]
        lines.append(f"{r['name']}: loss {100 * r['loss_vs_ddp']:+.1f}% vs DDP "
                     f"({'ok' if ok_loss else 'ABOVE 5%'}), traffic ÷"
                     f"{r['traffic_reduction_vs_ddp']:.1f} ({'ok' if ok_bytes else 'LOW'}), "
                     f"below single ({single['final_eval_loss']:.4f}): "
                     f"{'yes' if ok_single else 'NO'}")
    return lines


if __name__ == "__main__":
    main()
