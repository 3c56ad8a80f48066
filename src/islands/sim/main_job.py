"""The main job: DDP, DiLoCo and LocalSGD with 4 workers, and one worker training alone, on
the default corpus and model with the same inner steps each; then the comparison table.

Run it: ``islands sim`` (no config) or ``make demo``. ``--set`` overrides apply to every run
(``islands sim --set steps=100`` for a quick look).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from islands.core.config import load_config
from islands.metrics.compare import compare, make_console
from islands.metrics.run_dir import write_json
from islands.sim.progress import run_with_progress

# name -> overrides on top of the defaults (workers = 4, steps = 500, 100 Mbit/s, 50 ms)
MAIN_JOB_RUNS = {
    "ddp": {"algorithm": {"name": "ddp"}},
    "diloco": {"algorithm": {"name": "diloco"}},
    "local_sgd": {"algorithm": {"name": "local_sgd"}},
    "single": {"algorithm": {"name": "ddp"}, "workers": 1},
}


def main_job(out_dir: str | Path, overrides: list[str] | None = None,
             console: Console | None = None, progress: bool = True) -> list[dict]:
    """Runs the four runs into ``out_dir/<name>`` and prints and saves the comparison."""
    console = console or make_console()
    out = Path(out_dir)
    configs = {name: load_config(None, overrides, base={**base, "name": name})
               for name, base in MAIN_JOB_RUNS.items()}  # validate all before running any
    summaries = []
    for name, cfg in configs.items():
        console.print(f"[bold]{name}[/]: {cfg.workers} worker(s), {cfg.steps} inner steps, "
                      f"{cfg.algorithm.name}")
        summaries.append(run_with_progress(cfg, out / name, console=console, enabled=progress))
    rows = compare(summaries, out / "comparison.png",
                   title=f"main job: {configs['ddp'].workers} workers, "
                         f"{configs['ddp'].network.bandwidth_bps / 1e6:g} Mbit/s, "
                         f"{1000 * configs['ddp'].network.latency_s:g} ms",
                   console=console)
    write_json(out / "comparison.json", rows)
    console.print(f"run directories, comparison.json and comparison.png in {out}/")
    return rows
