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
from islands.sim.runner import simulate


def run_with_progress(cfg, out_dir: str | Path | None, *, console: Console | None = None,
                      enabled: bool = True) -> dict:
    """Runs :func:`simulate` with a live bar (disabled: silent)."""
    if not enabled:
        return simulate(cfg, out_dir)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("rounds  loss {task.fields[loss]}  sent {task.fields[sent]}/worker"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(cfg.label, total=None, loss="—", sent="0 B")

        def on_round(p: dict) -> None:
            loss = p["eval_loss"] if p["eval_loss"] is not None else p["train_loss"]
            bar.update(task, completed=p["round"], total=p["rounds"], loss=f"{loss:.3f}",
                       sent=human_bytes(p["bytes_sent_per_worker"]))

        return simulate(cfg, out_dir, on_round=on_round)
