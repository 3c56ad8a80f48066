"""Runs that differ only by their seed, taken together: the mean ± std of each figure over
seeds, which is what a claim ("DiLoCo within x% of DDP") must rest on, not one seed's luck.

Two runs belong to one group when their resolved configs (``config.json``) are equal apart
from ``seed``. The std is the sample standard deviation (n − 1); with one seed there is none.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from islands.core.config import normalized
from islands.metrics.compare import describe_h, human_bytes, make_console

# what a DDP baseline group must share with a group to be its baseline
_BASELINE_KEYS = ("workers", "steps", "task", "model", "data", "init", "network", "compute")


def without_seed(config: dict) -> str:
    """The config as a key for grouping: everything but the seed."""
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True,
                      default=str)


def group_by_seed(configs: list[dict]) -> list[list[int]]:
    """Indices of runs grouped by config apart from ``seed``, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(without_seed(c), []).append(i)
    return list(groups.values())


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def group_label(labels: list[str]) -> str:
    """A name for a group of runs: one run's own label; several runs' labels without a
    trailing seed marker (``ddp-s0``, ``ddp-s1`` -> ``ddp``; ``sweep/p1/seed0`` ->
    ``sweep/p1``) when they agree, else the first label and how many more."""
    if len(labels) == 1:
        return labels[0]
    stripped = {re.sub(r"[-_/.]?(seed|s)?\d+$", "", label) for label in labels}
    if len(stripped) == 1 and next(iter(stripped)):
        return stripped.pop()
    return f"{labels[0]} +{len(labels) - 1}"


def seed_rows(summaries: list[dict], configs: list[dict], labels: list[str],
              baseline: int | None = None) -> list[dict]:
    """One row per group of seeds: each figure's mean (and the eval loss's std).

    Args:
        summaries: the runs' ``summary.json`` contents.
        configs: their ``config.json`` contents (the grouping).
        labels: a label per run.
        baseline: a run whose group the others are compared with (default: per group, the
            DDP group with the same workers, steps, task, model, data, init and network).
    """
    groups = group_by_seed(configs)
    rows = [_row(summaries, configs, labels, g) for g in groups]
    for row, g in zip(rows, groups):
        b = (next(i for i, h in enumerate(groups) if baseline in h) if baseline is not None
             else _ddp_group(configs, groups, g[0]))
        base = rows[b] if b is not None else None
        row["baseline"] = base["label"] if base else None
        row["loss_vs_baseline"] = (row["final_eval_loss_mean"] / base["final_eval_loss_mean"]
                                   - 1) if base else None
        row["traffic_reduction_vs_baseline"] = (
            base["bytes_sent_per_worker"] / row["bytes_sent_per_worker"]
            if base and row["bytes_sent_per_worker"] > 0 else None)
    return rows


def _row(summaries, configs, labels, members: list[int]) -> dict:
    runs = [summaries[i] for i in members]
    losses = [s["final_eval_loss"] for s in runs]
    mean, std = mean_std(losses)
    first = runs[0]
    return {
        "label": group_label([labels[i] for i in members]),
        "runs": [labels[i] for i in members], "seeds": [configs[i]["seed"] for i in members],
        "algorithm": first["algorithm"], "workers": first["workers"],
        "sync_every": first["sync_every"], "ddp_steps": first.get("ddp_steps"),
        "codec": first["codec"], "final_eval_loss_mean": mean, "final_eval_loss_std": std,
        "final_eval_losses": losses,
        "bytes_sent_per_worker": mean_std([s["bytes_sent_per_worker"] for s in runs])[0],
        "virtual_time_s": mean_std([s["virtual_time_s"] for s in runs])[0],
        "compute_utilization": mean_std([s["compute_utilization"] for s in runs])[0],
        "wall_time_s": mean_std([s["wall_time_s"] for s in runs])[0],
    }


def _ddp_group(configs: list[dict], groups: list[list[int]], i: int) -> int | None:
    me = configs[i]
    for k, g in enumerate(groups):
        c = configs[g[0]]
        if c["algorithm"]["name"] == "ddp" and c["workers"] > 1 and all(
                c.get(key) == me.get(key) for key in _BASELINE_KEYS):
            return k
    return None


def plus_minus(mean: float, std: float | None, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def render_seed_table(rows: list[dict], title: str = "over seeds",
                      console: Console | None = None, vs: str = "vs DDP") -> None:
    """Prints the groups: eval loss mean ± std, the change of the mean against the baseline,
    bytes per worker, traffic reduction, virtual time."""
    table = Table(title=title)
    for col in ("runs", "seeds", "workers", "H", "eval loss (mean ± std)", vs, "sent/worker",
                "traffic ÷", "virtual time"):
        table.add_column(col, justify="left" if col == "runs" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["label"], str(len(r["seeds"])), str(r["workers"]),
            describe_h(r["sync_every"], r.get("ddp_steps")),
            plus_minus(r["final_eval_loss_mean"], r["final_eval_loss_std"]),
            "—" if r["loss_vs_baseline"] is None else f"{100 * r['loss_vs_baseline']:+.1f}%",
            human_bytes(r["bytes_sent_per_worker"]),
            "—" if r["traffic_reduction_vs_baseline"] is None
            else f"{r['traffic_reduction_vs_baseline']:.1f}x",
            f"{r['virtual_time_s']:.1f} s")
    (console or make_console()).print(table)


def read_config(run_dir: str | Path) -> dict | None:
    """A run directory's resolved config (``config.json``; None where there is none, as in
    the folder of a launch that merges its workers' summaries)."""
    path = Path(run_dir) / "config.json"
    # as this release records it: a run written by an older one groups with its seeds here
    return normalized(json.loads(path.read_text())) if path.is_file() else None
