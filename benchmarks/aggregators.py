"""Time of every aggregation rule on one stack of contributions, beside a copy of the stack
(the floor: every rule reads all the rows at least once).

Each rule is the object its ``[aggregator]`` section builds (``mean`` is the plain function),
called as the engine calls it, influence report included; CenteredClip starts from the
coordinate median every time (a new key per call), as in a job's first round. The rows are
``--workers`` x ``--params`` float32 draws of a standard normal. Reports the median of
``--repeats`` runs after a warm-up, and ``x copy``: that time as a multiple of a ``copy_`` of
the stack into a preallocated tensor.

Run it:

    python benchmarks/aggregators.py                          # 8 x 10M, torch's threads
    python benchmarks/aggregators.py --threads 1 --repeats 5
    python benchmarks/aggregators.py --workers 16 --params 1000000 --rules median,krum

Writes ``bench-results/aggregators.json`` (``--out`` to move it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
from pathlib import Path

import torch
from collective import median_time

from islands.aggregators import Rule
from islands.core.registry import lookup

# label -> [aggregator] fields
RULES: dict[str, dict] = {
    "mean": {"name": "mean"},
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "trim": 0.25},
    "krum": {"name": "krum", "f": 1},
    "multi_krum": {"name": "multi_krum", "f": 1},
    "bulyan": {"name": "bulyan", "f": 1},
    "centered_clip": {"name": "centered_clip", "tau": None, "iters": 3},
    "sybil": {"name": "sybil"},
}


def measure(label: str, stacked: torch.Tensor, repeats: int) -> dict:
    fields = dict(RULES[label])
    rule = lookup("aggregator", fields.pop("name")).config(**fields).build()
    if isinstance(rule, Rule):
        keys = itertools.count()  # CenteredClip: no center carried from the call before

        def call():
            rule(stacked, None, key=next(keys))
            rule.take_reports()
    else:  # the plain mean function
        def call():
            rule(stacked, None)
    return {"rule": label, "repr": repr(rule) if isinstance(rule, Rule) else rule.__name__,
            "seconds": median_time(call, repeats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--params", type=int, default=10_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated labels")
    p.add_argument("--out", default="bench-results/aggregators.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    stacked = torch.randn(args.workers, args.params, generator=g)
    copy_s = median_time(lambda into=torch.empty_like(stacked): into.copy_(stacked),
                         args.repeats)
    rows = [{"rule": "copy", "repr": "Tensor.copy_", "seconds": copy_s}]
    rows += [measure(label, stacked, args.repeats) for label in args.rules.split(",")]
    print(f"{'rule':14} {'median s':>9} {'x copy':>7}  built")
    for r in rows:
        r["x_copy"] = r["seconds"] / copy_s
        print(f"{r['rule']:14} {r['seconds']:9.4f} {r['x_copy']:7.1f}  {r['repr']}", flush=True)
    env = {"workers": args.workers, "params": args.params, "repeats": args.repeats,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu",
           "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "load_average": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"env: {env}\nwrote {out}")


if __name__ == "__main__":
    main()
