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
    .venv/bin/python benchmarks/diloco_vs_ddp.py --seeds 3 --warm-start-steps 0 \
        --set-diloco algorithm.ddp_steps=50   # a recipe, each configuration over seeds 0, 1, 2

Prints one table per run and, with ``--seeds`` above 1, one of each configuration's mean ± std
over seeds (the checks then use the means); writes JSON (``--json``, default
bench-results/diloco_vs_ddp.json) and a plot beside it. Runs are simulations: results are
deterministic for a seed; wall times are not.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from islands.core.config import load_config
from islands.engine import resolve_threads
from islands.metrics.compare import comparison_rows, make_console, render_table
from islands.metrics.plots import plot_runs
from islands.metrics.seeds import render_seed_table, seed_rows
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


def device_name(cfg) -> str:
    d = resolve_device(cfg.device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return (f"{platform.processor() or platform.machine()} CPU, "
            f"{resolve_threads(cfg, d)} thread(s) per run")


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
    parser.add_argument("--seeds", type=int, default=1,
                        help="run each configuration with seeds 0..N-1 (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override for every run (a recipe), "
                        "repeatable; those of the DiLoCo runs only with --set-diloco")
    parser.add_argument("--set-diloco", dest="diloco", action="append", default=[],
                        metavar="KEY=VALUE", help="override for the DiLoCo runs only "
                        "(algorithm.ddp_steps, outer.lr, ...), repeatable")
    parser.add_argument("--json", default="bench-results/diloco_vs_ddp.json")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds ({args.seeds}) must be >= 1")

    common = [f"device={args.device}", f"steps={args.steps}",
              f"init.warm_start_steps={args.warm_start_steps}", *args.overrides]
    console = make_console()
    summaries, configs = [], []
    # a DiLoCo run with --set-diloco is labelled a recipe (its H may not be the label's)
    runs = [(f"{label}+recipe" if args.diloco and "algorithm.name=diloco" in overrides
             else label, seed, overrides)
            for label, overrides in grid(args.workers, args.sync_every, args.algorithms)
            for seed in range(args.seeds)]
    started = time.perf_counter()
    for i, (label, seed, overrides) in enumerate(runs, 1):
        extra = args.diloco if "algorithm.name=diloco" in overrides else []
        cfg = load_config(None, [*common, *overrides, *extra, f"name='{label}'",
                                 f"seed={seed}"])
        t0 = time.perf_counter()
        summaries.append(simulate(cfg))
        configs.append(json.loads(json.dumps(cfg.to_dict())))
        console.print(f"[{i}/{len(runs)}] {label} seed {seed}: eval loss "
                      f"{summaries[-1]['final_eval_loss']:.4f} in {time.perf_counter() - t0:.0f} s")
    labels = [f"{label}/s{seed}" if args.seeds > 1 else label for label, seed, _ in runs]
    rows = comparison_rows(summaries, labels)
    device = device_name(load_config(None, common))
    render_table(rows, title=f"DiLoCo vs DDP ({device})", console=console)
    groups = seed_rows(summaries, configs, labels)
    if args.seeds > 1:
        render_seed_table(groups, f"DiLoCo vs DDP over seeds {list(range(args.seeds))}",
                          console)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "torch": torch.__version__,
              "wall_time_s": time.perf_counter() - started, "overrides": common,
              "diloco_overrides": args.diloco, "seeds": args.seeds, "rows": rows,
              "over_seeds": groups, "checks": checks(groups)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_runs(summaries, out.with_suffix(".png"), title="DiLoCo vs DDP", labels=labels)
    for line in result["checks"]:
        console.print(line)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


def checks(groups: list[dict]) -> list[str]:
    """The acceptance figures, stated plainly for every DiLoCo configuration, on the means
    over seeds: eval loss within 5% of DDP's, at least 25x less traffic per worker, below one
    worker alone."""
    single = next(g for g in groups if g["label"].startswith("single"))
    lines = []
    for g in groups:
        if g["algorithm"] != "diloco" or g["loss_vs_baseline"] is None:
            continue
        ok_loss = g["loss_vs_baseline"] <= 0.05
        ok_bytes = g["traffic_reduction_vs_baseline"] >= 25
        ok_single = g["final_eval_loss_mean"] < single["final_eval_loss_mean"]
        lines.append(f"{g['label']} ({len(g['seeds'])} seed(s)): loss "
                     f"{100 * g['loss_vs_baseline']:+.1f}% vs DDP "
                     f"({'ok' if ok_loss else 'ABOVE 5%'}), traffic ÷"
                     f"{g['traffic_reduction_vs_baseline']:.1f} "
                     f"({'ok' if ok_bytes else 'BELOW 25x'}), below single "
                     f"({single['final_eval_loss_mean']:.4f}): {'yes' if ok_single else 'NO'}")
    return lines


if __name__ == "__main__":
    main()
