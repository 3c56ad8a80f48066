"""``islands sim`` and ``islands compare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from islands.core.config import load_config
from islands.metrics.compare import compare, make_console
from islands.metrics.run_dir import read_summary
from islands.sim.main_job import main_job
from islands.sim.progress import run_with_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="simulate a run (no CONFIG: the main job)")
    p.add_argument("config", nargs="?", help="TOML config file (omit for the main job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set algorithm.sync_every=100")
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(func=run_sim)

    c = sub.add_parser("compare", help="compare finished runs side by side")
    c.add_argument("runs", nargs="+", help="run directories (with summary.json)")
    c.add_argument("--out", default="compare.png", help="combined plot (default: compare.png)")
    c.set_defaults(func=run_compare)


def run_sim(args: argparse.Namespace) -> int:
    console = make_console()
    if args.config is None:
        main_job(args.out or "runs/main", args.overrides, console=console,
                 progress=not args.no_progress)
        return 0
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{cfg.label}")
    summary = run_with_progress(cfg, out, console=console, enabled=not args.no_progress)
    compare([summary], None, title=cfg.label, console=console)
    console.print(f"run directory: {out}/ (summary.json, metrics.jsonl, loss.png)")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    summaries = [read_summary(r) for r in args.runs]
    compare(summaries, args.out, title="comparison")
    make_console().print(f"combined plot: {args.out}")
    return 0
