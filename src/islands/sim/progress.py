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
                      enabled: bool = True, task=None, existing: str = "refuse") -> dict:
    """Runs a simulation with a live bar (disabled: silent). The config and the run directory
    are checked before the bar appears, so a bad setting prints only its error; ``existing``
    as :class:`~islands.sim.runner.Simulation` takes it (a finished run kept: no bar)."""
    sim = Simulation(cfg, out_dir, task=task, existing=existing)
    if not enabled or sim.found == "finished":
        if sim.found == "finished" and console is not None:
            console.print(f"{out_dir}: this run finished before; kept (--overwrite runs it "
                          "again)")
        return sim.run()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("rounds  loss {task.fields[loss]}  sent {task.fields[sent]}/worker"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    bar = Progress(*columns, console=console, transient=False)
    row = bar.add_task(cfg.label, total=None, loss="—", sent="0 B")

    def on_round(p: dict) -> None:
        loss = p["eval_loss"] if p["eval_loss"] is not None else p["train_loss"]
        bar.update(row, completed=p["round"], total=p["rounds"], loss=f"{loss:.3f}",
                   sent=human_bytes(p["bytes_sent_per_worker"]))

    sim.on_round = on_round
    with bar:
        return sim.run()
