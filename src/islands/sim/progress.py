"""A progress bar for long simulations: rounds, loss, bytes, ETA."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from islands.metrics.compare import human_bytes
from islands.sim.runner import Simulation


def run_with_progress(cfg, out_dir: str | Path | None, *, console: Console | None = None,
                      enabled: bool = True, task=None) -> dict:
    """Runs a simulation with a live bar (disabled: silent). The config is checked before the
    bar appears, so a bad setting prints only its error."""
    if not enabled:
        return Simulation(cfg, out_dir, task=task).run()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("rounds  loss {task.fields[loss]}  sent {task.fields[sent]}/worker"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    bar = Progress(*columns, console=console, transient=False)
    row = bar.add_task(cfg.label, total=None, loss="—", sent="0 B")

    def on_round(p: dict) -> None:
        loss = p["eval_loss"] if p["eval_loss"] is not None else p["train_loss"]
        bar.update(row, completed=p["round"], total=p["rounds"], loss=f"{loss:.3f}",
                   sent=human_bytes(p["bytes_sent_per_worker"]))

    sim = Simulation(cfg, out_dir, on_round, task=task)
    with bar:
        return sim.run()
