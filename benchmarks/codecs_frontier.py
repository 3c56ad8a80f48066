"""The loss-versus-bytes frontier of the codecs: DiLoCo (pseudo-gradients) and DDP (gradients)
on the main-job setup, one simulation per codec, final eval loss against bytes sent per worker
(payloads, scales, indices and every message header counted by the transport).

Every run is reported, including those that diverge or stop on a NaN/Inf (their loss is shown
as such, not dropped). The table gives each codec's loss change and byte reduction against
fp32 (``identity``) of the same algorithm; the plot marks the Pareto frontier.

Run it (each main-job simulation takes 4-10 minutes on 2 CPU cores: the 16 DiLoCo runs took an
hour with ``--jobs 2``; ``--report`` merges the JSON of separate runs into one table and plot):

    python benchmarks/codecs_frontier.py
    python benchmarks/codecs_frontier.py --algorithms diloco --codecs identity,int8,int4 --steps 200
    python benchmarks/codecs_frontier.py --algorithms ddp --steps 200 --json bench-results/ddp.json
    python benchmarks/codecs_frontier.py --report bench-results/diloco.json bench-results/ddp.json

Writes ``bench-results/codecs_frontier.json`` and ``.png`` (``--json`` moves both).

``--sparse`` runs the sparse frontier instead: SparseLoCo, DeMo-style DCT top-k and MuLoCo
beside DDP and DiLoCo fp32/int8/int4/fp4 (``METHODS``), on the main job's setup (4 workers,
400 inner steps from the shared 1000-step warm start; ``--sync-every`` sets H) or from the
cold-start recipe (``--setup cold``: ``examples/cold_start_recipe.toml``, its H schedule), over
``--seeds``; the table gives each method's mean ± std final eval loss, upload and download per
worker, and its loss change and byte reduction against fp32 DiLoCo and bytes against fp32 DDP
(measured when a ``ddp`` row is there, else DiLoCo's bytes per round times the inner steps:
the same all-reduce every step). About 1.5 minutes per simulation on one core:

    python benchmarks/codecs_frontier.py --sparse --seeds 0 1 2 --jobs 2
    python benchmarks/codecs_frontier.py --sparse --sync-every 25 --methods diloco,"sparseloco 3%"
    python benchmarks/codecs_frontier.py --sparse --setup cold --seeds 0
    python benchmarks/codecs_frontier.py --sparse --report bench-results/sparse_*.json

Writes ``bench-results/sparse_frontier.json`` and ``.png`` (``--json`` moves both).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# label -> config overrides of the [codec] section
CODECS: dict[str, list[str]] = {
    "identity": [],
    "int8": ["codec.name='int8'"],
    "int4": ["codec.name='int4'"],
    "fp4": ["codec.name='fp4'"],
    "fp16": ["codec.name='fp16'"],
    "int4+ef": ["codec.name='int4'", "codec.error_feedback=true"],
    "fp4+ef": ["codec.name='fp4'", "codec.error_feedback=true"],
    "bf16": ["codec.name='bf16'"],
    "int8+zstd": ["codec.name='int8'", "codec.entropy=true"],
    "topk1%": ["codec.name='topk'", "codec.fraction=0.01"],
    "topk1%+ef": ["codec.name='topk'", "codec.fraction=0.01", "codec.error_feedback=true"],
    "topk10%+ef": ["codec.name='topk'", "codec.fraction=0.1", "codec.error_feedback=true"],
    "randomk10%+ef": ["codec.name='randomk'", "codec.fraction=0.1",
                      "codec.error_feedback=true"],
    "sign": ["codec.name='sign'", "codec.block=256"],
    "sign+ef": ["codec.name='sign'", "codec.block=256", "codec.error_feedback=true"],
    "powersgd4+ef": ["codec.name='powersgd'", "codec.rank=4", "codec.error_feedback=true"],
}
DDP_DEFAULT = ["identity", "fp16", "int8", "int4", "fp4", "topk1%+ef", "sign+ef", "powersgd4+ef"]


def run_one(algorithm: str, label: str, steps: int | None, threads: int) -> dict:
    """One simulation; returns a result row (a failure is a row too, with its error)."""
    import torch

    from islands import load_config, simulate

    torch.set_num_threads(threads)
    overrides = [f"algorithm.name='{algorithm}'", *CODECS[label], f"name='{algorithm}/{label}'"]
    if steps is not None:
        overrides.append(f"steps={steps}")
    started = time.perf_counter()
    row = {"algorithm": algorithm, "codec": label, "overrides": CODECS[label]}
    try:
        s = simulate(load_config(None, overrides), out_dir=None)
        row.update(final_eval_loss=s["final_eval_loss"],
                   bytes_sent_per_worker=s["bytes_sent_per_worker"], steps=s["steps"],
                   eval_curve=[(p["step"], p["eval_loss"]) for p in s["eval_curve"]],
                   error=None)
    except Exception as err:  # noqa: BLE001 (a codec that breaks training is a result)
        row.update(final_eval_loss=float("nan"), bytes_sent_per_worker=float("nan"),
                   steps=steps, eval_curve=[], error=f"{type(err).__name__}: {err}")
    row["wall_s"] = time.perf_counter() - started
    return row


def add_ratios(rows: list[dict]) -> None:
    """Loss change (%) and byte reduction (x) against identity of the same algorithm."""
    base = {r["algorithm"]: r for r in rows if r["codec"] == "identity" and not r["error"]}
    for r in rows:
        b = base.get(r["algorithm"])
        ok = b is not None and math.isfinite(r["final_eval_loss"])
        r["loss_vs_fp32_pct"] = (100 * (r["final_eval_loss"] / b["final_eval_loss"] - 1)
                                 if ok else float("nan"))
        r["bytes_reduction_x"] = (b["bytes_sent_per_worker"] / r["bytes_sent_per_worker"]
                                  if ok else float("nan"))


def table(rows: list[dict]) -> str:
    lines = [(f"{'algorithm':9} {'codec':14} {'eval loss':>9} {'vs fp32':>8} "
             f"{'MB/worker':>10} {'fewer bytes':>11}  note")]
    for r in rows:
        note = r["error"] or ("diverged" if not math.isfinite(r["final_eval_loss"]) else "")
        lines.append(f"{r['algorithm']:9} {r['codec']:14} {r['final_eval_loss']:9.4f} "
                     f"{r['loss_vs_fp32_pct']:+7.2f}% {r['bytes_sent_per_worker'] / 1e6:10.3f} "
                     f"{r['bytes_reduction_x']:10.2f}x  {note[:60]}")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """The targets of the codec work, checked on the DiLoCo rows present."""
    targets = {"int8": (0.5, 3.5), "int4": (2.0, 6.5), "fp4": (2.0, 6.5),
               "int4+ef": (2.0, 6.5), "fp4+ef": (2.0, 6.5)}
    out = []
    for r in rows:
        if r["algorithm"] == "diloco" and r["codec"] in targets:
            loss_pct, ratio = targets[r["codec"]]
            ok = abs(r["loss_vs_fp32_pct"]) <= loss_pct and r["bytes_reduction_x"] >= ratio
            out.append(f"diloco/{r['codec']}: loss {r['loss_vs_fp32_pct']:+.2f}% "
                       f"(target within {loss_pct}%), {r['bytes_reduction_x']:.2f}x fewer bytes "
                       f"(target >= {ratio}x): {'MET' if ok else 'MISSED'}")
    return out


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both bytes and loss, sorted by bytes."""
    front, best = [], float("inf")
    for b, loss in sorted(points):
        if loss < best:
            front.append((b, loss))
            best = loss
    return front


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = sorted({r["algorithm"] for r in rows})
    fig, axes = plt.subplots(1, len(algorithms), figsize=(6.5 * len(algorithms), 5),
                             squeeze=False)
    for ax, algo in zip(axes[0], algorithms):
        good = [r for r in rows if r["algorithm"] == algo and math.isfinite(r["final_eval_loss"])]
        for r in good:
            ax.scatter(r["bytes_sent_per_worker"], r["final_eval_loss"], s=18)
            ax.annotate(r["codec"], (r["bytes_sent_per_worker"], r["final_eval_loss"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto([(r["bytes_sent_per_worker"], r["final_eval_loss"]) for r in good])
        if front:
            ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto frontier")
        failed = [r["codec"] for r in rows if r["algorithm"] == algo and r not in good]
        title = f"{algo}" + (f" (failed: {', '.join(failed)})" if failed else "")
        ax.set(xscale="log", xlabel="bytes sent per worker", ylabel="final eval loss",
               title=title)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import sys

    if "--sparse" in sys.argv:
        import sparse_frontier

        sys.argv.remove("--sparse")
        sparse_frontier.main()
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", default="diloco,ddp", help="comma-separated")
    p.add_argument("--codecs", default=None,
                   help=(f"comma-separated labels of {list(CODECS)} (default: all for "
                         f"diloco, {DDP_DEFAULT} for ddp)").replace("%", "%%"))
    p.add_argument("--steps", type=int, default=None, help="inner steps (default: the config's)")
    p.add_argument("--ddp-steps", type=int, default=None, help="steps for ddp (default: --steps)")
    p.add_argument("--jobs", type=int, default=1, help="simulations run at once")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per simulation (more than the free cores slows a run "
                        "down many times over: OpenMP threads wait on each other)")
    p.add_argument("--json", default="bench-results/codecs_frontier.json")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge the rows of earlier --json files into --json and "
                        "its plot")
    args = p.parse_args()
    if args.report:
        rows = [r for f in args.report for r in json.loads(Path(f).read_text())["rows"]]
        finish(rows, Path(args.json))
        return

    jobs = []
    for algo in args.algorithms.split(","):
        labels = args.codecs.split(",") if args.codecs else (
            DDP_DEFAULT if algo == "ddp" else list(CODECS))
        unknown = sorted(set(labels) - set(CODECS))
        if unknown:
            p.error(f"unknown codec labels {unknown}; known: {list(CODECS)}")
        steps = args.ddp_steps if algo == "ddp" and args.ddp_steps else args.steps
        jobs += [(algo, label, steps) for label in labels]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, a, c, s, args.threads) for a, c, s in jobs]
        for i, f in enumerate(futures):
            r = f.result()
            rows.append(r)
            print(f"[{i + 1}/{len(jobs)}] {r['algorithm']}/{r['codec']}: loss "
                  f"{r['final_eval_loss']:.4f}, {r['bytes_sent_per_worker'] / 1e6:.3f} MB/worker, "
                  f"{r['wall_s']:.0f} s{'  ' + r['error'] if r['error'] else ''}", flush=True)
            add_ratios(rows)
            out.write_text(json.dumps({"rows": rows}, indent=1))
    finish(rows, out)


def finish(rows: list[dict], out: Path) -> None:
    """Prints the table and the targets, writes the JSON and the plot."""
    add_ratios(rows)
    print(table(rows))
    for line in verdicts(rows):
        print(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out.with_suffix(".png"))
    out.write_text(json.dumps({"rows": rows, "verdicts": verdicts(rows)}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
