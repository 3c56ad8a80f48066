"""Plots of one or more runs: eval loss against inner steps, bytes sent per worker (the step-0
point included: the axis is linear up to the first sync's bytes, log beyond) and time; the
train loss of every round; and one panel per further metric the task reports (accuracy).

Time has two clocks that never share an axis: a simulator run's times are modelled seconds
(``"clock": "virtual"`` in its summary), a real run's are measured wall-clock seconds
(``"measured"``). Each gets its own panel, drawn only when some run has that clock. Loss axes
turn logarithmic when the losses span more than a decade, so late progress stays visible.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# facts of an eval point that are not metrics
_FACTS = ("step", "worker", "bytes_sent_per_worker", "virtual_time_s")

# clock -> (panel title, x label); summaries written before "clock" existed are the simulator's
_TIME_PANELS = {
    "virtual": ("by virtual time (modelled)",
                "virtual time (s), modelled by the network and compute model"),
    "measured": ("by measured time (wall clock)", "wall-clock time (s), measured"),
}


def default_labels(summaries: list[dict]) -> list[str]:
    return [f"{s['name']} ({s['workers']}w)" for s in summaries]


def clock(summary: dict) -> str:
    """``"virtual"`` (modelled seconds) or ``"measured"`` (wall-clock seconds): what the
    summary's ``virtual_time_s`` values are. A summary without the field predates real runs
    and is the simulator's."""
    return summary.get("clock", "virtual")


def loss_scale(values: list[float]) -> str:
    """``"log"`` when the finite values are all positive and span more than a decade
    (max/min > 10), else ``"linear"``: on a linear axis such a curve's late progress looks
    flat. A zero or negative value cannot go on a log axis, so it keeps the axis linear."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return "linear"
    return "log" if max(finite) / min(finite) > 10 else "linear"


def _series(summary: dict, label: str, pick_x, pick_y, curve: str) -> tuple:
    """``(label, xs, ys)`` of one run, points missing x or y left out."""
    pts = [(pick_x(p), pick_y(p)) for p in summary.get(curve, [])]
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    return label, [x for x, _ in pts], [y for _, y in pts]


def _step(point: dict):
    return point["step"]


def _eval_loss(point: dict):
    return point.get("eval_loss")


def panels(summaries: list[dict], labels: list[str]) -> dict[str, dict]:
    """What each panel draws, in drawing order.

    Returns:
        ``{title: {"x": label, "y": label, "series": [(run label, xs, ys)], "runs": [index of
        each series' run in summaries], "loss": whether y is a loss}}``. There is one time
        panel per clock the runs use (see ``clock``); ``"runs"`` lets a run keep its colour
        in a panel that leaves other runs out.
    """
    every = range(len(summaries))

    def panel(x, y, pick_y, *, pick_x=_step, runs=every, curve="eval_curve", loss=True):
        return {"x": x, "y": y, "loss": loss, "runs": list(runs), "series": [
            _series(summaries[i], labels[i], pick_x, pick_y, curve) for i in runs]}

    made = {"eval loss by steps": panel("inner steps", "eval loss", _eval_loss),
            "by bytes on the wire": panel("bytes sent per worker", "eval loss", _eval_loss,
                                          pick_x=lambda p: p["bytes_sent_per_worker"])}
    for kind, (title, x) in _TIME_PANELS.items():
        runs = [i for i in every if clock(summaries[i]) == kind]
        if runs:
            made[title] = panel(x, "eval loss", _eval_loss, runs=runs,
                                pick_x=lambda p: p.get("virtual_time_s"))
    made["train loss per round"] = panel("inner steps", "train loss (mean of the round)",
                                         lambda p: p.get("train_loss"), curve="train_curve")
    for metric in _extra_metrics(summaries):
        made[f"{metric} by steps"] = panel("inner steps", metric,
                                           lambda p, m=metric: p.get(m), loss=False)
    return made


def _extra_metrics(summaries: list[dict]) -> list[str]:
    """The task's further eval metrics (accuracy), sorted."""
    return sorted({k for s in summaries for p in s["eval_curve"] for k in p
                   if k not in _FACTS and k != "eval_loss"})


def _draw(ax, name: str, panel: dict) -> None:
    """One panel: each series in its run's colour, the loss axis log when it spans a decade."""
    runs = panel.get("runs", range(len(panel["series"])))
    for i, (label, xs, ys) in zip(runs, panel["series"]):
        ax.plot(xs, ys, color=f"C{i}", label=label,
                **({"linewidth": 1} if name.startswith("train") else {"marker": "."}))
    ax.set(xlabel=panel["x"], ylabel=panel["y"], title=name)
    if name == "by bytes on the wire":
        first = min((x for _, xs, _ in panel["series"] for x in xs if x > 0), default=1.0)
        ax.set_xscale("symlog", linthresh=first)  # 0 (the start) stays on the axis
    if panel.get("loss"):
        ax.set_yscale(loss_scale([y for _, _, ys in panel["series"] for y in ys]))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_runs(summaries: list[dict], path: str | Path, title: str = "",
              labels: list[str] | None = None) -> Path:
    """Saves ``draw_runs(summaries, title, labels)`` as ``path``."""
    fig = draw_runs(summaries, title, labels)
    try:
        fig.savefig(path, dpi=100)
    finally:  # pyplot keeps every open figure: one left per failed save would add up
        plt.close(fig)
    return Path(path)


def draw_runs(summaries: list[dict], title: str = "",
              labels: list[str] | None = None) -> Figure:
    """Each run's curves on shared panels (one colour per run, the same in every panel); the
    caller saves and closes the figure."""
    labels = labels or default_labels(summaries)
    drawn = panels(summaries, labels)
    cols = 3 if len(drawn) > 4 else 2
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    axes = axes.reshape(-1)
    for ax, (name, panel) in zip(axes, drawn.items()):
        _draw(ax, name, panel)
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
