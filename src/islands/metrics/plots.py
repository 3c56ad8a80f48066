"""Plots: eval loss against inner steps and against bytes sent per worker (log x)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_runs(summaries: list[dict], path: str | Path, title: str = "") -> Path:
    """Draws each run's eval curve twice: by inner step, and by bytes sent per worker."""
    fig, (ax_steps, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in summaries:
        curve = s["eval_curve"]
        label = f"{s['name']} ({s['workers']}w)"
        steps = [p["step"] for p in curve]
        losses = [p["eval_loss"] for p in curve]
        line, = ax_steps.plot(steps, losses, marker=".", label=label)
        pts = [(p["bytes_sent_per_worker"], p["eval_loss"]) for p in curve
               if p["bytes_sent_per_worker"] > 0]
        if pts:
            ax_bytes.plot(*zip(*pts), marker=".", color=line.get_color(), label=label)
    ax_steps.set(xlabel="inner steps", ylabel="eval loss (nats/byte)", title="by steps")
    ax_bytes.set(xlabel="bytes sent per worker (log)", ylabel="eval loss", xscale="log",
                 title="by bytes on the wire")
    for ax in (ax_steps, ax_bytes):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
