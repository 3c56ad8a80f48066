"""A slow worker among real processes: DiLoCo waiting for it, DiLoCo with the quorum policy,
and asynchronous local SGD, each through ``islands launch --emulate-compute``.

Three workers (``--workers``) on this machine, one torch thread each, the last one made
``--factor`` times slower (``[compute]`` step time; the launcher stops its process that share
of the time). Every run has the same budget of data, ``workers x steps`` inner steps (DiLoCo's
rounds, asynchronous local SGD's updates, H = ``--sync-every``). Reported per run: the wall
time of the whole launch (start to every worker done), the final eval loss (the workers'
global parameters), the rounds committed or updates applied, and the slow worker's share of
the inner steps that reached the global parameters (DiLoCo trains the same steps on each
worker; with the quorum policy a round goes ahead without the slow one, which catches up from
the committed state, its round's steps lost; once the job has finished without it, it exits
3 and the launch 2, which the table shows). Two references without the slow worker.

Run it: ``python benchmarks/async_real.py`` (about 3 minutes on 2 cores). Writes
``bench-results/async_real.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

MODEL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "data.max_bytes=400000",
         "device=cpu", "threads=1", "runtime.heartbeat_timeout_s=10.0"]
VARIANTS = {
    "DiLoCo, nobody slow": (["algorithm.name=diloco"], False),
    "asynchronous, nobody slow": (["algorithm.name=async_local_sgd", "outer.momentum=0.3"],
                                  False),
    "DiLoCo waits": (["algorithm.name=diloco"], True),
    "DiLoCo, quorum": (["algorithm.name=diloco", "algorithm.min_quorum={quorum}",
                        "algorithm.grace_s=0.05"], True),
    "asynchronous": (["algorithm.name=async_local_sgd", "outer.momentum=0.3"], True),
}


def one(name: str, out: Path, args: argparse.Namespace) -> dict:
    sets, slowed = VARIANTS[name]
    n = args.workers
    over = [*MODEL, f"workers={n}", f"steps={args.steps}",
            f"algorithm.sync_every={args.sync_every}", f"eval_every={args.steps}",
            f"compute.worker=[{{id = {n - 1}, step_time_s = {0.1 * args.factor}}}]",
            *(s.format(quorum=n - 1) for s in sets)]
    argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "launch", "--out", str(out)]
    argv += ["--emulate-compute"] if slowed else []
    for o in over:
        argv += ["--set", o]
    t0 = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    # each worker's own summary (a straggler the job finished without exits 3, and the
    # launch with 2: the others' summaries stand)
    runs = [json.loads((out / f"w{i}" / "summary.json").read_text()) for i in range(n)]
    row = {"run": name, "exit_code": done.returncode, "wall_s": wall,
           "final_eval_loss": runs[0].get("final_eval_loss"),
           "removed": [i for i, r in enumerate(runs) if r.get("removed")]}
    if "inner_steps_by_worker" in runs[0]:  # asynchronous: steps applied per worker
        steps = [r["inner_steps_by_worker"][str(i)] for i, r in enumerate(runs)]
        row.update(updates=runs[0].get("updates_applied"), slow_share=steps[-1] / sum(steps))
    else:  # rounds: the slow worker's steps count where it took part in the commit
        committed = [r["rounds_committed"] for r in runs]
        row.update(updates=max(committed), slow_share=committed[-1] / sum(committed))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--sync-every", type=int, default=20)
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--runs", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", default="bench-results/async_real.json")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="islands-async-real-"))
    rows = []
    for i, name in enumerate(args.runs):
        rows.append(one(name, base / f"r{i}", args))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    t = Table(title=f"worker {args.workers - 1} of {args.workers} {args.factor:g}x slower (real "
                    f"processes, one torch thread each, {args.steps} steps x {args.workers})")
    for col in ("run", "wall s", "final eval loss", "rounds / updates", "slow worker's share",
                "launch exit", "ended without"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["run"], f"{r['wall_s']:.1f}",
                  "-" if r["final_eval_loss"] is None else f"{r['final_eval_loss']:.4f}",
                  str(r.get("updates", "-")),
                  "-" if "slow_share" not in r else f"{r['slow_share']:.3f}",
                  str(r["exit_code"]), str(r["removed"] or "-"))
    Console(width=140).print(t)


if __name__ == "__main__":
    main()
