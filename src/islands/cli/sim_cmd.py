"""``islands sim`` (one run), ``islands demo`` (the main job) and ``islands compare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from islands.core.config import load_config
from islands.core.errors import ConfigError
from islands.metrics.compare import compare, labels_for, make_console
from islands.metrics.run_dir import read_summary
from islands.metrics.seeds import group_by_seed, read_config, render_seed_table, seed_rows
from islands.sim.main_job import main_job
from islands.sim.progress import run_with_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="simulate one run (no CONFIG: the defaults)")
    p.add_argument("config", nargs="?", help="TOML config file (omit for the defaults)")
    _sets_and_progress(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    existing_flags(p)
    p.set_defaults(func=run_sim)

    d = sub.add_parser("demo", help="the main job: ddp, diloco, local_sgd and one worker alone")
    _sets_and_progress(d)
    d.add_argument("--out", default="runs/main", help="folder of the four run directories")
    existing_flags(d)
    d.set_defaults(func=run_demo)

    c = sub.add_parser("compare", help="compare finished runs side by side (runs that differ "
                                       "only by seed also as mean ± std)")
    c.add_argument("runs", nargs="+", help="run directories (with summary.json)")
    c.add_argument("--out", default="compare.png", help="combined plot (default: compare.png)")
    c.add_argument("--baseline", default=None, metavar="RUN",
                   help="the run the others are compared with (default: the DDP run with as "
                        "many workers)")
    c.add_argument("--per-worker", action="store_true",
                   help="also a table of each worker's bytes, compute and idle time")
    c.set_defaults(func=run_compare)


def existing_flags(p: argparse.ArgumentParser) -> None:
    """``--resume`` / ``--overwrite``: what to do with a run already in the folder (without
    either, another run or this one finished is refused, before anything runs)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="existing", action="store_const", const="resume",
                   default="refuse", help="keep a finished run of this config (nothing runs "
                   "again); start an unfinished one over")
    g.add_argument("--overwrite", dest="existing", action="store_const", const="overwrite",
                   help="remove the run files in the folder first, whatever run they were")


def _sets_and_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set algorithm.sync_every=100")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")


def run_demo(args: argparse.Namespace) -> int:
    main_job(args.out, args.overrides, console=make_console(), progress=not args.no_progress,
             existing=args.existing)
    return 0


def run_sim(args: argparse.Namespace) -> int:
    console = make_console()
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{cfg.label}")
    summary = run_with_progress(cfg, out, console=console, enabled=not args.no_progress,
                                existing=args.existing)
    compare([summary], None, title=cfg.label, console=console)
    console.print(f"run directory: {out}/ (final.safetensors, summary.json, metrics.jsonl, "
                  "loss.png)")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    summaries = [read_summary(r) for r in args.runs]
    labels = labels_for(args.runs)
    baseline = None
    if args.baseline is not None:
        matches = [i for i, (r, label) in enumerate(zip(args.runs, labels))
                   if args.baseline in (r, label) or Path(r) == Path(args.baseline)]
        if not matches:
            raise ConfigError(f"--baseline {args.baseline!r} is not one of the runs compared "
                              f"({', '.join(labels)})")
        baseline = matches[0]
    console = make_console()
    compare(summaries, args.out, title="comparison", labels=labels, baseline=baseline,
            per_worker=args.per_worker, console=console)
    configs = [read_config(r) for r in args.runs]
    if all(configs) and any(len(g) > 1 for g in group_by_seed(configs)):
        rows = seed_rows(summaries, configs, labels, baseline)
        vs = "vs DDP" if baseline is None else f"vs {_group_of(rows, labels[baseline])}"
        render_seed_table(rows, "over seeds (runs whose configs differ only by seed)", console,
                          vs=vs)
    console.print(f"combined plot: {args.out}")
    return 0


def _group_of(rows: list[dict], label: str) -> str:
    return next(r["label"] for r in rows if label in r["runs"])
