"""Side-by-side comparison of finished runs: a table (printed with rich), a per-worker table,
and a combined plot.

Rows are labelled by run directory (``runs/h10`` -> ``h10``; the whole path where two share a
name). Loss and traffic are compared with a baseline run: the one given, or else the DDP run
with as many workers when one is among the runs.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from islands.metrics.plots import plot_runs


def labels_for(paths: list[str | Path]) -> list[str]:
    """A label per run directory: its name, or the path as given where names collide."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def comparison_rows(summaries: list[dict], labels: list[str] | None = None,
                    baseline: int | None = None) -> list[dict]:
    """One row per run with the figures of the comparison table (also written as JSON).

    Args:
        summaries: the runs' ``summary.json`` contents.
        labels: a label per run (default: each run's name).
        baseline: the index of the run others are compared with (default: per run, the DDP
            run with as many workers, if any).
    """
    labels = labels or [s["name"] for s in summaries]
    ddp, ddp_seed = {}, {}  # the DDP run with as many workers (and the same seed, if any)
    for i, s in enumerate(summaries):
        if s["algorithm"] == "ddp" and s["workers"] > 1:
            ddp[s["workers"]] = ddp_seed[s["workers"], s.get("seed")] = i
    rows = []
    for s, label in zip(summaries, labels):
        d = ddp_seed.get((s["workers"], s.get("seed")), ddp.get(s["workers"]))
        b = baseline if baseline is not None else d
        base = summaries[b] if b is not None else None
        same_ddp = summaries[d] if d is not None else None
        sent = s["bytes_sent_per_worker"]
        rows.append({
            "label": label, "name": s["name"], "algorithm": s["algorithm"],
            "seed": s.get("seed"),
            "workers": s["workers"], "steps": s["steps"], "sync_every": s["sync_every"],
            **({"ddp_steps": s["ddp_steps"]} if s.get("ddp_steps") else {}),
            "codec": s["codec"], "final_eval_loss": s["final_eval_loss"],
            **{k: v for k, v in s.items()
               if k.startswith("final_eval_") and k != "final_eval_loss"},
            "baseline": labels[b] if b is not None else None,
            "loss_vs_baseline": (s["final_eval_loss"] / base["final_eval_loss"] - 1) if base
            else None,
            "bytes_sent_per_worker": sent,
            "traffic_reduction_vs_baseline": (base["bytes_sent_per_worker"] / sent
                                              if base and sent > 0 else None),
            # against the DDP run with as many workers, whatever the baseline (as before)
            "loss_vs_ddp": (s["final_eval_loss"] / same_ddp["final_eval_loss"] - 1)
            if same_ddp else None,
            "traffic_reduction_vs_ddp": (same_ddp["bytes_sent_per_worker"] / sent
                                         if same_ddp and sent > 0 else None),
            "virtual_time_s": s["virtual_time_s"],
            "compute_utilization": s["compute_utilization"],
            "wall_time_s": s["wall_time_s"],
        })
    return rows


def describe_h(sync_every, ddp_steps: int | None = None) -> str:
    """H for a table: ``50``; a schedule as ``10,25@100,50@200`` (H, then H@from-step); a
    data-parallel phase first as ``dp50+``."""
    if isinstance(sync_every, int):
        h = str(sync_every)
    else:
        h = ",".join(str(v) if step == 0 else f"{v}@{step}" for step, v in sync_every)
    return f"dp{ddp_steps}+{h}" if ddp_steps else h


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


def render_table(rows: list[dict], title: str = "comparison", console: Console | None = None,
                 vs: str = "vs DDP") -> None:
    metrics = sorted({k for r in rows for k in r if k.startswith("final_eval_")
                      and k != "final_eval_loss"})
    table = Table(title=title)
    cols = ["run", "workers", "H", "codec", "eval loss",
            *[m.removeprefix("final_eval_") for m in metrics], vs, "sent/worker",
            "traffic ÷", "virtual time", "util.", "wall"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("run", "codec") else "right",
                         no_wrap=True)
    for r in rows:
        table.add_row(
            r["label"], str(r["workers"]), describe_h(r["sync_every"], r.get("ddp_steps")),
            r["codec"],
            f"{r['final_eval_loss']:.4f}",
            *[_metric(r.get(m)) for m in metrics],
            "—" if r["loss_vs_baseline"] is None else f"{100 * r['loss_vs_baseline']:+.1f}%",
            human_bytes(r["bytes_sent_per_worker"]),
            "—" if r["traffic_reduction_vs_baseline"] is None
            else f"{r['traffic_reduction_vs_baseline']:.1f}x",
            f"{r['virtual_time_s']:.1f} s", f"{100 * r['compute_utilization']:.0f}%",
            f"{r['wall_time_s']:.0f} s")
    (console or make_console()).print(table)


def _metric(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def per_worker_rows(summaries: list[dict], labels: list[str]) -> list[dict]:
    """One row per run and worker: bytes sent, compute and idle seconds (a straggler shows
    as the worker the others wait for: little idle time while theirs grows)."""
    rows = []
    for s, label in zip(summaries, labels):
        sent = s.get("bytes_sent_by_worker", [])
        compute = s.get("compute_s_by_worker") or [None] * len(sent)
        idle = s.get("idle_s_by_worker") or [None] * len(sent)
        for w, (b, c, i) in enumerate(zip(sent, compute, idle)):
            rows.append({"label": label, "worker": w, "bytes_sent": b, "compute_s": c,
                         "idle_s": i})
    return rows


def render_per_worker(rows: list[dict], console: Console | None = None) -> None:
    table = Table(title="per worker")
    for col in ("run", "worker", "sent", "compute", "idle", "idle share"):
        table.add_column(col, justify="left" if col == "run" else "right", no_wrap=True)
    for r in rows:
        c, i = r["compute_s"], r["idle_s"]
        share = "—" if c is None or i is None or c + i == 0 else f"{100 * i / (c + i):.0f}%"
        table.add_row(r["label"], str(r["worker"]), human_bytes(r["bytes_sent"]),
                      "—" if c is None else f"{c:.1f} s", "—" if i is None else f"{i:.1f} s",
                      share)
    (console or make_console()).print(table)


def compare(summaries: list[dict], plot_path: str | Path | None = None,
            title: str = "comparison", console: Console | None = None, *,
            labels: list[str] | None = None, baseline: int | None = None,
            per_worker: bool = False) -> list[dict]:
    """Prints the table (and the per-worker table) and writes the combined plot; returns the
    rows.

    Columns: final eval loss of the global parameters (and the task's other metrics), its
    change against the baseline, bytes sent per worker, the baseline's bytes divided by the
    run's ("traffic ÷"), virtual time on the configured network, compute utilization, wall
    time.
    """
    labels = labels or [s["name"] for s in summaries]
    rows = comparison_rows(summaries, labels, baseline)
    render_table(rows, title, console, vs="vs DDP" if baseline is None
                 else f"vs {labels[baseline]}")
    if per_worker:
        render_per_worker(per_worker_rows(summaries, labels), console)
    if plot_path is not None:
        plot_runs(summaries, plot_path, title=title, labels=labels)
    return rows
