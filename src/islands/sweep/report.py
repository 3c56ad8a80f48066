"""A sweep's results: one row per point (mean ± std over its seeds of the final eval loss,
bytes sent per worker, virtual time), the best point marked, printed with rich and written as
``sweep.json`` and ``sweep.png`` (each point's mean ± std, and its mean eval-loss curve).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from islands.metrics.compare import human_bytes  # noqa: E402
from islands.metrics.run_dir import write_json  # noqa: E402
from islands.metrics.seeds import mean_std, plus_minus  # noqa: E402
from islands.sweep.runner import Run  # noqa: E402


def point_rows(runs: list[Run], min_traffic: float | None = None) -> list[dict]:
    """One row per point, in sweep order; the best of each cell (lowest mean eval loss among
    the points that are not the baseline, lost no seed and, with ``min_traffic``, send at most
    1/``min_traffic`` of the baseline's bytes) has ``best = True``."""
    by_point: dict[str, list[Run]] = {}
    for run in runs:
        by_point.setdefault(run.point.name, []).append(run)
    rows = [_row(group) for group in by_point.values()]
    for cell in dict.fromkeys(r["cell"] for r in rows):
        _compare([r for r in rows if r["cell"] == cell], min_traffic)
    return rows


def _compare(rows: list[dict], min_traffic: float | None) -> None:
    """Within one cell: each point against the cell's baseline, and the best marked."""
    base = next((r for r in rows if r["baseline"] and r["final_eval_loss_mean"] is not None),
                None)
    for r in rows:
        ok = r["final_eval_loss_mean"] is not None and base is not None
        r["loss_vs_baseline"] = (r["final_eval_loss_mean"] / base["final_eval_loss_mean"] - 1
                                 if ok else None)
        r["traffic_reduction_vs_baseline"] = (
            base["bytes_sent_per_worker"] / r["bytes_sent_per_worker"]
            if ok and r["bytes_sent_per_worker"] else None)
    candidates = [r for r in rows if not r["baseline"] and not r["failed"]
                  and r["final_eval_loss_mean"] is not None and (
                      min_traffic is None
                      or (r["traffic_reduction_vs_baseline"] or 0) >= min_traffic)]
    if candidates:
        min(candidates, key=lambda r: r["final_eval_loss_mean"])["best"] = True


def _row(group: list[Run]) -> dict:
    done = [r.summary for r in group if r.summary is not None]
    losses = [s["final_eval_loss"] for s in done if s.get("final_eval_loss") is not None]
    mean, std = mean_std(losses) if losses else (None, None)

    def avg(key):
        return mean_std([s[key] for s in done])[0] if done else None

    walls = [r.wall_s for r in group if r.wall_s is not None]
    point = group[0].point
    return {"point": point.name, "sets": list(point.sets), "own": list(point.own),
            "cell": point.cell, "baseline": point.baseline,
            "seeds": [r.seed for r in group], "finished": len(done),
            "failed": [r.seed for r in group if r.status == "failed"],
            "final_eval_loss_mean": mean, "final_eval_loss_std": std,
            "final_eval_losses": losses, "bytes_sent_per_worker": avg("bytes_sent_per_worker"),
            "virtual_time_s": avg("virtual_time_s"),
            # the process's, start-up included (None for runs finished before)
            "process_wall_s": mean_std(walls)[0] if walls else None,
            "runs": [str(r.dir) for r in group], "best": False}


def render(rows: list[dict], console: Console, title: str) -> None:
    """The table, one per ``--by`` cell: a row per point, the best marked ★."""
    for cell in dict.fromkeys(r["cell"] for r in rows):
        _table([r for r in rows if r["cell"] == cell], console,
               f"{title}: {cell}" if cell else title)


def _table(rows: list[dict], console: Console, title: str) -> None:
    table = Table(title=title)
    for col in ("point", "seeds", "eval loss (mean ± std)", "vs baseline", "sent/worker",
                "traffic ÷", "virtual time", "wall/run"):
        table.add_column(col, justify="left" if col == "point" else "right",
                         overflow="fold", no_wrap=col != "point")
    for r in rows:
        loss = ("—" if r["final_eval_loss_mean"] is None
                else plus_minus(r["final_eval_loss_mean"], r["final_eval_loss_std"]))
        seeds = f"{r['finished']}/{len(r['seeds'])}" + (" ✗" if r["failed"] else "")
        table.add_row(label(r), seeds, loss,
            "—" if r["loss_vs_baseline"] is None else f"{100 * r['loss_vs_baseline']:+.1f}%",
            "—" if r["bytes_sent_per_worker"] is None else human_bytes(r["bytes_sent_per_worker"]),
            "—" if r["traffic_reduction_vs_baseline"] is None
            else f"{r['traffic_reduction_vs_baseline']:.1f}x",
            "—" if r["virtual_time_s"] is None else f"{r['virtual_time_s']:.1f} s",
            "—" if r["process_wall_s"] is None else f"{r['process_wall_s']:.0f} s")
    console.print(table)


def label(row: dict) -> str:
    """A point as its sets (``baseline: algorithm.name=ddp``), the best marked ★."""
    sets = ", ".join(row["own"]) or "(the base config)"
    return ("★ " if row["best"] else "") + ("baseline: " if row["baseline"] else "") + sets


def write(rows: list[dict], runs: list[Run], out: Path, facts: dict) -> None:
    """``sweep.json`` (the facts of the sweep, every point's row, every run) and
    ``sweep.png``."""
    best = {r["cell"]: r["point"] for r in rows if r["best"]}
    write_json(out / "sweep.json", {
        **facts, "best": best.get("") if not any(best) else None, "best_by_cell": best,
        "points": rows,
        "runs": [{"point": r.point.name, "seed": r.seed, "dir": str(r.dir), "status": r.status,
                  "final_eval_loss": r.summary.get("final_eval_loss") if r.summary else None,
                  "error": r.error} for r in runs]})
    plot(rows, runs, out / "sweep.png")


def mean_curve(summaries: list[dict]) -> tuple[list[int], list[float]]:
    """The eval loss averaged over seeds at the steps every seed evaluated."""
    curves = [{p["step"]: p["eval_loss"] for p in s["eval_curve"]} for s in summaries]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [sum(c[x] for c in curves) / len(curves) for x in steps]


def plot(rows: list[dict], runs: list[Run], path: Path) -> None:
    """Saves ``draw(rows, runs)`` as ``path``."""
    fig = draw(rows, runs)
    try:
        fig.savefig(path, dpi=100)
    finally:  # pyplot keeps every open figure: one left per failed save would add up
        plt.close(fig)


def draw(rows: list[dict], runs: list[Run]) -> Figure:
    """One row of panels per ``--by`` cell, each point in one colour across the row (the
    caller closes the figure). Left: each point's mean ± std final eval loss (the baseline a
    dashed line). Middle: mean eval loss against bytes sent per worker. Right: each point's
    mean eval-loss curve over inner steps. The best point is a large black-edged star in its
    own colour: a colour alone could be another point's."""
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    fig, axes = plt.subplots(len(cells), 3, figsize=(17, 4.8 * len(cells)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.3, 1, 1]})
    summaries: dict[str, list[dict]] = {}
    for run in runs:
        if run.summary is not None:
            summaries.setdefault(run.point.name, []).append(run.summary)
    for cell, (left, mid, right) in zip(cells, axes):
        shown = [r for r in rows if r["cell"] == cell and r["final_eval_loss_mean"] is not None]
        colours = point_colours(len(shown))
        _points_panel(left, shown, cell, colours)
        _bytes_panel(mid, shown, colours)
        _curves_panel(right, shown, colours, summaries)
        for ax in (left, mid, right):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def point_colours(n: int) -> list:
    """``n`` distinct colours, one per point of a cell: matplotlib's ten-colour cycle while it
    lasts, evenly spaced samples of a colour map past it (the cycle would repeat)."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = plt.get_cmap("turbo")
    return [cmap(i / (n - 1)) for i in range(n)]


def _marker(row: dict) -> dict:
    """The best point by its shape (a big star, black-edged), every other a plain dot."""
    if row["best"]:
        return {"fmt": "*", "ms": 16, "mec": "black", "mew": 1, "zorder": 5}
    return {"fmt": "o"}


def _best_handle() -> Line2D:
    """The "★ best" legend entry: the shape alone, since the star keeps its point's colour."""
    return Line2D([], [], ls="", marker="*", ms=12, mfc="white", mec="black", label="★ best")


def _points_panel(ax, shown: list[dict], cell: str, colours: list) -> None:
    ys = list(range(len(shown)))
    for y, r, colour in zip(ys, shown, colours):
        ax.errorbar(r["final_eval_loss_mean"], y, xerr=r["final_eval_loss_std"] or 0,
                    color=colour, capsize=3, label=_short(label(r)), **_marker(r))
        if r["baseline"]:
            ax.axvline(r["final_eval_loss_mean"], ls="--", color="gray")
    ax.set_yticks(ys, [_short(label(r)) for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="final eval loss (mean ± std over seeds)",
           title=f"points: {cell}" if cell else "points")
    if any(r["best"] for r in shown):  # the point labels are the ticks: only the star's key
        ax.legend(handles=[_best_handle()], fontsize=6)


def _bytes_panel(ax, shown: list[dict], colours: list) -> None:
    for r, colour in zip(shown, colours):
        ax.errorbar(r["bytes_sent_per_worker"], r["final_eval_loss_mean"],
                    yerr=r["final_eval_loss_std"] or 0, color=colour, capsize=3,
                    label=_short(label(r)), **_marker(r))
    sent = [r["bytes_sent_per_worker"] for r in shown]
    if sent and min(sent) > 0:
        ax.set_xscale("log")
    else:  # a single worker sends nothing: 0 stays on the axis
        ax.set_xscale("symlog", linthresh=min((b for b in sent if b), default=1.0))
    ax.set(xlabel="bytes sent per worker (mean)", ylabel="final eval loss",
           title="loss by bytes on the wire")
    if shown:
        handles, _ = ax.get_legend_handles_labels()
        best = [_best_handle()] if any(r["best"] for r in shown) else []
        ax.legend(handles=handles + best, fontsize=6)


def _curves_panel(ax, shown: list[dict], colours: list, summaries: dict) -> None:
    for r, colour in zip(shown, colours):
        steps, losses = mean_curve(summaries.get(r["point"], []))
        ax.plot(steps, losses, color=colour, label=_short(label(r)),
                ls="--" if r["baseline"] else "-", lw=2.2 if r["best"] else 1.5)
    ax.set(xlabel="inner steps", ylabel="eval loss (mean over seeds)", title="curves")
    if shown:
        ax.legend(fontsize=6)


def _short(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."
