"""The cold-start recipe search, every sweep behind the recipe, in the order it was run.

Each stage is one ``islands sweep`` over ``examples/cold_start.toml`` (4 workers, 400 inner
steps, no warm start) into ``OUT/<stage>/``; a finished run is skipped, so the command resumes
after Ctrl-C and a second call only prints. Stages 1-6 and 9 are one seed each (a cheap look at
many points), 7, 8 and 10 three seeds, and ``confirm`` is the bar itself: DDP at the defaults,
DDP with the recipe's inner lr and warm-up, and the recipe, 3 seeds each, at 4 and 8 workers on
two corpora. docs/recipes.md reads every table this prints.

Run it: ``python benchmarks/recipes.py`` (all stages: 88 runs, about 2 CPU-hours at one
thread a run, so an hour on 2 cores); ``--only confirm`` for the bar alone (36 runs, about an
hour of CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from islands.cli.main import main as islands_main

PLAIN = "outer.lr=1.0 outer.momentum=0.0 outer.nesterov=false"
ROUNDS = "algorithm.ddp_steps=24 algorithm.sync_every=[[0,3],[100,5],[250,8]]"
RECIPE = f"codec.name=int4 {PLAIN} inner.lr=5e-3 inner.warmup_steps=50 {ROUNDS}"
DDP = "algorithm.name=ddp"

# (stage, what it asks, sweep arguments). Each stage's points come from the ones before it.
STAGES: list[tuple[str, str, list[str]]] = [
    ("s1-rounds-int8", "H = 8 fits 25x at int8: does syncing often help at the default outer?",
     ["--baseline", DDP, "--min-traffic", "25",
      "--point", "codec.name=int8 algorithm.sync_every=8",
      "--point", "codec.name=int8 algorithm.sync_every=[[0,4],[100,8],[200,16]]"]),
    ("s2-outer", "with H = 8 int8: which outer lr and momentum?",
     ["--set", "codec.name=int8", "--set", "algorithm.sync_every=8", "--baseline", DDP,
      "--point", PLAIN, "--point", "outer.lr=0.8 outer.momentum=0.5",
      "--point", "outer.lr=1.0 outer.momentum=0.3", "--point", "outer.lr=0.5 outer.momentum=0.8"]),
    ("s3-plain", "plain averaging: a higher lr, a higher inner lr, a DP phase, int4 H = 4",
     ["--set", "outer.momentum=0.0", "--set", "outer.nesterov=false",
      "--point", "codec.name=int8 algorithm.sync_every=8 outer.lr=1.0 inner.lr=6e-3",
      "--point", "codec.name=int8 algorithm.sync_every=8 outer.lr=1.3",
      "--point", "codec.name=int8 algorithm.sync_every=10 outer.lr=1.0 algorithm.ddp_steps=20",
      "--point", "codec.name=int4 algorithm.sync_every=4 outer.lr=1.0"]),
    ("s4-4bit", "at H = 4: int4 or fp4, some momentum, a lower inner lr, an H schedule",
     ["--set", "outer.lr=1.0",
      "--point", "codec.name=int4 algorithm.sync_every=4 outer.momentum=0.0 "
                 "outer.nesterov=false inner.lr=2e-3",
      "--point", "codec.name=fp4 algorithm.sync_every=4 outer.momentum=0.0 outer.nesterov=false",
      "--point", "codec.name=int4 algorithm.sync_every=4 outer.momentum=0.3",
      "--point", "codec.name=int4 algorithm.sync_every=[[0,2],[40,4],[200,8]] "
                 "outer.momentum=0.0 outer.nesterov=false"]),
    ("s5-fewer-bits", "sign codes with error feedback at H = 1-2; int4 with a DP phase",
     ["--set", "outer.lr=1.0", "--set", "outer.momentum=0.0", "--set", "outer.nesterov=false",
      "--point", "codec.name=sign codec.error_feedback=true algorithm.sync_every=2",
      "--point", "codec.name=sign codec.error_feedback=true algorithm.sync_every=1",
      "--point", "codec.name=int4 codec.error_feedback=true algorithm.sync_every=4",
      "--point", "codec.name=int4 algorithm.sync_every=5 algorithm.ddp_steps=40"]),
    ("s6-phase-schedule", "int4, plain averaging: a DP phase then an H schedule",
     ["--set", "outer.momentum=0.0", "--set", "outer.nesterov=false", "--set", "codec.name=int4",
      "--point", "outer.lr=1.0 algorithm.ddp_steps=40 algorithm.sync_every=[[0,4],[200,8]]",
      "--point", "outer.lr=1.2 algorithm.sync_every=4",
      "--point", f"outer.lr=1.0 {ROUNDS}",
      "--point", "outer.lr=1.1 algorithm.ddp_steps=40 algorithm.sync_every=5"]),
    ("s7-warmup", "the best of s6 over 3 seeds, with and without an inner warm-up of 50",
     ["--seeds", "3", "--baseline", DDP,
      "--point", f"codec.name=int4 {PLAIN} {ROUNDS}",
      "--point", f"codec.name=int4 {PLAIN} inner.warmup_steps=50 {ROUNDS}"]),
    ("s8-ddp-warmup", "is the warm-up of 50 as good for DDP?",
     ["--seeds", "3", "--point", "algorithm.name=ddp inner.warmup_steps=50"]),
    ("s9-inner-lr", "with the warm-up: the inner lr, the schedule, the outer lr",
     ["--set", "codec.name=int4", "--set", "outer.lr=1.0", "--set", "outer.momentum=0.0",
      "--set", "outer.nesterov=false", "--set", "inner.warmup_steps=50",
      "--point", f"inner.lr=4e-3 {ROUNDS}",
      "--point", "algorithm.ddp_steps=60 algorithm.sync_every=[[0,6],[200,10]]",
      "--point", f"outer.lr=1.1 {ROUNDS}",
      "--point", "algorithm.ddp_steps=24 algorithm.sync_every=[[0,2],[60,4],[200,8]]"]),
    ("s10-inner-lr", "inner lr 4e-3 and 5e-3 for the recipe, and for DDP, 3 seeds",
     ["--set", "inner.warmup_steps=50", "--seeds", "3", "--baseline", DDP,
      "--point", "algorithm.name=ddp inner.lr=4e-3",
      "--point", f"codec.name=int4 {PLAIN} inner.lr=4e-3 {ROUNDS}",
      "--point", f"codec.name=int4 {PLAIN} inner.lr=5e-3 {ROUNDS}"]),
    ("confirm", "the bar: DDP (defaults and tuned) and the recipe, 3 seeds, 4 cells",
     ["--seeds", "3", "--baseline", DDP, "--min-traffic", "25",
      "--point", "algorithm.name=ddp inner.lr=5e-3 inner.warmup_steps=50",
      "--point", RECIPE,
      "--by", "workers=4,8", "--by", "data.corpus=python-stdlib,python-docs"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/recipes")
    ap.add_argument("--only", action="append", default=[],
                    help="run only this stage (repeatable): " + ", ".join(s for s, _, _ in STAGES))
    ap.add_argument("--jobs", default="auto")
    ap.add_argument("--config", default="examples/cold_start.toml")
    ap.add_argument("--json", default="bench-results/recipes.json")
    args = ap.parse_args()
    names = [s for s, _, _ in STAGES]
    unknown = [s for s in args.only if s not in names]
    if unknown:
        sys.exit(f"--only {unknown[0]!r}: no such stage; the stages are {', '.join(names)}")
    chosen = [s for s in STAGES if not args.only or s[0] in args.only]
    console, results = Console(), {}
    for stage, question, sweep_args in chosen:
        console.rule(f"{stage}: {question}")
        out = Path(args.out) / stage
        cmd = ["islands", "sweep", args.config, *sweep_args, "--jobs", args.jobs,
               "--out", str(out)]
        if islands_main(cmd[1:]):
            sys.exit(f"{stage}: the sweep failed (its runs' logs are under {out}/)")
        results[stage] = {"question": question, "command": cmd,
                          "sweep": json.loads((out / "sweep.json").read_text())}
    table = Table(title="the recipe search: each stage's best point (mean over its seeds)")
    for col in ("stage", "cell", "best point", "seeds", "eval loss", "vs DDP", "traffic ÷"):
        table.add_column(col, justify="right" if col in ("seeds", "eval loss", "vs DDP",
                                                         "traffic ÷") else "left")
    for stage, r in results.items():
        for p in r["sweep"]["points"]:
            if not p["best"]:
                continue
            vs, tr = p.get("loss_vs_baseline"), p.get("traffic_reduction_vs_baseline")
            table.add_row(stage, p["cell"] or "-", " ".join(p["own"]), str(p["finished"]),
                          f"{p['final_eval_loss_mean']:.4f}",
                          "-" if vs is None else f"{100 * vs:+.1f}%",
                          "-" if tr is None else f"{tr:.1f}x")
    console.print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
