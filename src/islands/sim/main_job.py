"""The main job: DDP, DiLoCo and LocalSGD with 4 workers, and one worker training alone, on
the default corpus and model with the same inner steps each; then the comparison table.

Run it: ``islands demo`` or ``make demo``. ``--set`` overrides apply to every run
(``islands demo --set steps=100`` for a quick look), except those that would erase what the
rows compare (:data:`FIXED_BY_THE_DEMO`).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from islands.core.config import load_config, parse_overrides
from islands.core.errors import ConfigError
from islands.engine import check_config, resolve_device, threads, warm_start
from islands.metrics.compare import compare, make_console
from islands.metrics.run_dir import RunDir, write_json
from islands.sim.progress import run_with_progress
from islands.tasks import build_task

# What every run of the main job shares, on top of the defaults (4 workers, 100 Mbit/s, 50 ms):
# 400 inner steps each, from one shared warm start of 1000 steps of a single worker (as the
# DiLoCo paper starts its comparisons from a pretrained checkpoint). From a random
# initialization, 500 steps are too few for DiLoCo to catch up with DDP's 4x larger effective
# batch: ``islands sim --set init.warm_start_steps=0 --set steps=500`` shows the cold start.
MAIN_JOB_SETUP = {"steps": 400, "init": {"warm_start_steps": 1000}}

# The keys that make the rows differ: an override of one would run every row alike under the
# rows' old labels (four copies of one configuration), so the demo refuses it.
FIXED_BY_THE_DEMO = ("workers", "algorithm.name", "name")

# name -> overrides on top of MAIN_JOB_SETUP
MAIN_JOB_RUNS = {
    "ddp": {"algorithm": {"name": "ddp"}},
    "diloco": {"algorithm": {"name": "diloco"}},
    "local_sgd": {"algorithm": {"name": "local_sgd"}},
    "single": {"algorithm": {"name": "ddp"}, "workers": 1},
}


def main_job(out_dir: str | Path, overrides: list[str] | None = None,
             console: Console | None = None, progress: bool = True,
             existing: str = "refuse") -> list[dict]:
    """Runs the four runs into ``out_dir/<name>`` and prints and saves the comparison.

    Args:
        existing: what to do with runs already in ``out_dir`` (``"refuse"``, ``"resume"``,
            ``"overwrite"``; see :class:`~islands.sim.runner.Simulation`), checked for every
            run before any runs.
    """
    console = console or make_console()
    for key in parse_overrides(overrides or []):
        if key in FIXED_BY_THE_DEMO:
            raise ConfigError(
                f"islands demo compares ddp, diloco and local_sgd with 4 workers and one worker "
                f"alone: --set {key}=... would give every row the same {key} under the rows' "
                f"own labels. For one run of your own, use `islands sim --set {key}=...`")
    out = Path(out_dir)
    configs = {name: load_config(None, overrides, base={**MAIN_JOB_SETUP, **base, "name": name})
               for name, base in MAIN_JOB_RUNS.items()}
    for name, cfg in configs.items():  # every run (and its folder) is checked before any runs
        check_config(cfg)
        if existing != "overwrite":  # (overwriting removes files: only when a run starts)
            RunDir(out / name).claim(cfg, existing=existing)
    summaries, warmed = [], False
    for name, cfg in configs.items():
        warm = cfg.init.warm_start_steps
        if warm and not warmed and not _finished(out / name, existing):
            warmed = True
            t0 = time.perf_counter()
            device = resolve_device(cfg.device)
            with console.status(f"warm start: {warm} steps of one worker, shared by every run"), \
                    threads(cfg, device):
                warm_start(cfg, build_task(cfg), device)
            console.print(f"warm start: {warm} steps of one worker in "
                          f"{time.perf_counter() - t0:.0f} s, shared by every run")
        console.print(f"[bold]{name}[/]: {cfg.workers} worker(s), {cfg.steps} inner steps, "
                      f"{cfg.algorithm.name}"
                      + (f", from the {warm}-step warm start" if warm else ""))
        summaries.append(run_with_progress(cfg, out / name, console=console, enabled=progress,
                                           existing=existing))
    rows = compare(summaries, out / "comparison.png",
                   title=f"main job: {configs['ddp'].workers} workers, "
                         f"{configs['ddp'].network.bandwidth_bps / 1e6:g} Mbit/s, "
                         f"{1000 * configs['ddp'].network.latency_s:g} ms",
                   console=console)
    write_json(out / "comparison.json", rows)
    console.print(f"run directories, comparison.json and comparison.png in {out}/")
    return rows


def _finished(run_dir: Path, existing: str) -> bool:
    """Whether this run is kept as it is (resumed and finished): no warm start needed for it."""
    return existing == "resume" and (run_dir / "summary.json").is_file()
