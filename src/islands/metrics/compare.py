"""Side-by-side comparison of finished runs: a table (printed with rich) and a combined plot.

Traffic reduction is measured against the DDP run with the same number of workers when one is
among the runs compared.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from islands.metrics.plots import plot_runs


def comparison_rows(summaries: list[dict]) -> list[dict]:
    """One row per run with the figures of the comparison table (also written as JSON)."""
    ddp = {s["workers"]: s for s in summaries if s["algorithm"] == "ddp" and s["workers"] > 1}
    rows = []
    for s in summaries:
        base = ddp.get(s["workers"])
        sent = s["bytes_sent_per_worker"]
        rows.append({
            "name": s["name"], "algorithm": s["algorithm"], "workers": s["workers"],
            "steps": s["steps"], "sync_every": s["sync_every"], "codec": s["codec"],
            "final_eval_loss": s["final_eval_loss"],
            "loss_vs_ddp": (s["final_eval_loss"] / base["final_eval_loss"] - 1) if base else None,
            "bytes_sent_per_worker": sent,
            "traffic_reduction_vs_ddp": (base["bytes_sent_per_worker"] / sent
                                         if base and sent > 0 else None),
            "virtual_time_s": s["virtual_time_s"],
            "compute_utilization": s["compute_utilization"],
            "wall_time_s": s["wall_time_s"],
        })
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def make_console(**kwargs) -> Console:
    """A console that does not squeeze tables when output goes to a file or pipe."""
    console = Console(**kwargs)
    if not console.is_terminal:
        console = Console(width=max(console.width, 140), **kwargs)
    return console


def render_table(rows: list[dict], title: str = "comparison", console: Console | None = None
                 ) -> None:
    table = Table(title=title)
    for col in ("run", "workers", "H", "codec", "eval loss", "vs DDP", "sent/worker",
                "traffic ÷", "virtual time", "util.", "wall"):
        table.add_column(col, justify="left" if col in ("run", "codec") else "right",
                         no_wrap=True)
    for r in rows:
        table.add_row(
            r["name"], str(r["workers"]), str(r["sync_every"]), r["codec"],
            f"{r['final_eval_loss']:.4f}",
            "—" if r["loss_vs_ddp"] is None else f"{100 * r['loss_vs_ddp']:+.1f}%",
            human_bytes(r["bytes_sent_per_worker"]),
            "—" if r["traffic_reduction_vs_ddp"] is None
            else f"{r['traffic_reduction_vs_ddp']:.1f}x",
            f"{r['virtual_time_s']:.1f} s", f"{100 * r['compute_utilization']:.0f}%",
            f"{r['wall_time_s']:.0f} s")
    (console or make_console()).print(table)


def compare(summaries: list[dict], plot_path: str | Path | None = None,
            title: str = "comparison", console: Console | None = None) -> list[dict]:
    """Prints the table and writes the combined plot; returns the rows.

    Columns: final eval loss of the global parameters, its change against the DDP run with as
    many workers, bytes sent per worker, DDP's bytes divided by the run's ("traffic ÷"),
    virtual time on the configured network, compute utilization, wall time of the simulation.
    """
    rows = comparison_rows(summaries)
    render_table(rows, title, console)
    if plot_path is not None:
        plot_runs(summaries, plot_path, title=title)
    return rows
