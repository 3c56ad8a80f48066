"""Plots of one or more runs: eval loss against inner steps, bytes sent per worker (the step-0
point included: the axis is linear up to the first sync's bytes, log beyond) and virtual time;
the train loss of every round; and one panel per further metric the task reports (accuracy).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# facts of an eval point that are not metrics
_FACTS = ("step", "worker", "bytes_sent_per_worker", "virtual_time_s")


def default_labels(summaries: list[dict]) -> list[str]:
    return [f"{s['name']} ({s['workers']}w)" for s in summaries]


def panels(summaries: list[dict], labels: list[str]) -> dict[str, dict]:
    """What each panel draws: ``{title: {"x": label, "y": label, "series": [(run label, xs,
    ys)]}}``, in drawing order."""
    extra = sorted({k for s in summaries for p in s["eval_curve"] for k in p
                    if k not in _FACTS and k != "eval_loss"})

    def series(pick_x, pick_y, curve="eval_curve"):
        out = []
        for s, label in zip(summaries, labels):
            pts = [(pick_x(p), pick_y(p)) for p in s.get(curve, [])]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            out.append((label, [x for x, _ in pts], [y for _, y in pts]))
        return out

    loss = lambda p: p.get("eval_loss")  # noqa: E731
    made = {
        "eval loss by steps": {"x": "inner steps", "y": "eval loss",
                               "series": series(lambda p: p["step"], loss)},
        "by bytes on the wire": {"x": "bytes sent per worker", "y": "eval loss",
                                 "series": series(lambda p: p["bytes_sent_per_worker"], loss)},
        "by (virtual) time": {"x": "virtual time (s)", "y": "eval loss",
                              "series": series(lambda p: p.get("virtual_time_s"), loss)},
        "train loss per round": {"x": "inner steps", "y": "train loss (mean of the round)",
                                 "series": series(lambda p: p["step"],
                                                  lambda p: p.get("train_loss"),
                                                  "train_curve")},
    }
    for metric in extra:
        made[f"{metric} by steps"] = {"x": "inner steps", "y": metric,
                                      "series": series(lambda p: p["step"],
                                                       lambda p, m=metric: p.get(m))}
    return made


def plot_runs(summaries: list[dict], path: str | Path, title: str = "",
              labels: list[str] | None = None) -> Path:
    """Draws each run's curves on shared panels (one colour per run) and saves ``path``."""
    labels = labels or default_labels(summaries)
    drawn = panels(summaries, labels)
    cols = 3 if len(drawn) > 4 else 2
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    axes = axes.reshape(-1)
    for ax, (name, panel) in zip(axes, drawn.items()):
        for i, (label, xs, ys) in enumerate(panel["series"]):
            ax.plot(xs, ys, color=f"C{i}", label=label,
                    **({"linewidth": 1} if name.startswith("train") else {"marker": "."}))
        ax.set(xlabel=panel["x"], ylabel=panel["y"], title=name)
        if name == "by bytes on the wire":
            first = min((x for _, xs, _ in panel["series"] for x in xs if x > 0), default=1.0)
            ax.set_xscale("symlog", linthresh=first)  # 0 (the start) stays on the axis
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
