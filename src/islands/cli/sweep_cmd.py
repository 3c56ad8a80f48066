"""``islands sweep``: a grid or random search over ``--set`` values, over seeds, in parallel
processes, resumable (see :mod:`islands.sweep`)."""

from __future__ import annotations

import argparse

from islands.metrics.compare import make_console
from islands.sweep import sweep


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="grid or random search over --set values, several seeds per point",
        description="Runs every point of a grid (--grid, repeatable) or of random draws "
                    "(--random with --trials) for --seeds seeds, one `islands sim` process per "
                    "run, --jobs at a time; finished runs in --out are skipped. Prints one "
                    "table (mean ± std over seeds, the best point marked) and writes "
                    "sweep.json and sweep.png.")
    p.add_argument("config", nargs="?", help="base TOML config (omit for the defaults)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of one key, repeatable: --grid outer.lr=0.5,0.7,1.0 (TOML "
                        "values; commas inside [...] do not split)")
    p.add_argument("--random", action="append", default=[], metavar="KEY=LO:HI[:log]",
                   help="a range to draw from, repeatable: --random inner.lr=1e-3:1e-2:log "
                        "(ints when LO and HI are ints)")
    p.add_argument("--point", action="append", default=[], metavar="'K=V K2=V2'",
                   help="a point listed whole (a recipe: several keys at once), repeatable; "
                        "'' is the base config")
    p.add_argument("--trials", type=int, default=8, help="random draws (default 8)")
    p.add_argument("--search-seed", type=int, default=0,
                   help="seed of the random draws (default 0)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per point, seeds config.seed .. config.seed + N - 1 (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, repeatable")
    p.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                   help="sets of an extra point every other is compared with, repeatable: "
                        "--baseline algorithm.name=ddp")
    p.add_argument("--min-traffic", type=float, default=None, metavar="X",
                   help="only a point sending at most 1/X of the baseline's bytes per worker "
                        "may be the best (--min-traffic 25: 25x less than DDP)")
    p.add_argument("--by", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run the whole sweep, baseline included, for each value, repeatable: "
                        "--by workers=4,8 --by data.corpus=python-stdlib,python-docs "
                        "(comparisons and the best point per cell)")
    p.add_argument("--out", default="runs/sweep", help="the sweep's folder (default runs/sweep)")
    p.add_argument("--jobs", default="auto",
                   help="processes at once: auto (cores / threads per run) or a number")
    p.add_argument("--dry-run", action="store_true", help="print the runs, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no live progress bars")
    p.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    rows = sweep(args.config, grid=args.grid, random=args.random, point=args.point,
                 min_traffic=args.min_traffic, trials=args.trials,
                 search_seed=args.search_seed, seeds=args.seeds, sets=args.overrides,
                 baseline=args.baseline, by=args.by, out=args.out, jobs=args.jobs,
                 console=make_console(), progress=not args.no_progress, dry_run=args.dry_run)
    return 1 if any(r["failed"] for r in rows) else 0
