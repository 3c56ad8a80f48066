"""Straggler: what a 3x slower worker costs the fast ones, with and without a round deadline.

``--workers`` (3) on loopback; the last one is made 3x slower by SIGSTOP 0.3 s / SIGCONT 0.15 s for
the whole run. Three runs of the same length: no straggler (the floor), the straggler with no
deadline (everyone waits for it), and with ``runtime.round_deadline_s`` (the fast workers go
on without it at ``ready`` and ``start``; it catches up from the committed state). Reported:
the fast workers' median round time (commit to commit), the rounds the straggler committed,
and whether every process exited cleanly.

Run it: ``python benchmarks/straggler.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from islands.metrics.run_dir import read_metrics
from islands.runtime.coordinator import Coordinator
from islands.runtime.launch import throttle

CONFIG = ["steps=100000", "algorithm.sync_every=50", "model.n_layer=1",
          "model.n_embd=32", "model.n_head=2", "data.max_bytes=300000", "device=cpu",
          "eval_every=100000000", "runtime.heartbeat_s=0.1",
          "runtime.heartbeat_timeout_s=10.0"]


def one(out: Path, seconds: float, straggler: bool, deadline_s: float | None,
        workers: int) -> dict:
    out.mkdir(parents=True)
    coord = Coordinator("127.0.0.1", 0, heartbeat_timeout_s=10.0, deadline_s=deadline_s).start()
    log = open(out / "workers.log", "w")
    procs, slow = [], workers - 1
    for i in range(workers):
        argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "run"]
        for o in [f"workers={workers}", *CONFIG]:
            argv += ["--set", o]
        argv += ["--coordinator", f"127.0.0.1:{coord.port}", "--worker-id", str(i),
                 "--out", str(out / f"w{i}")]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    while coord.status()["last_round"] < 2:  # all three set up and training
        time.sleep(0.1)
    t0, stop = time.time(), threading.Event()
    # 3x slower: stopped 0.3 s, running 0.15 s
    cycler = throttle(procs[slow], 3.0, period_s=0.45, stop=stop) if straggler else None
    time.sleep(seconds)
    stop.set()
    if cycler is not None:
        cycler.join()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    coord.stop()
    fast = [[r["commit_unix"] for r in read_metrics(out / f"w{i}") if r["commit_unix"] > t0]
            for i in range(slow)]
    late = [r for r in read_metrics(out / f"w{slow}") if r["commit_unix"] > t0]
    gaps = [b - a for commits in fast for a, b in zip(commits, commits[1:])]  # commit to commit
    return {"workers": workers, "straggler": straggler, "deadline_s": deadline_s,
            "fast_round_s_median": statistics.median(gaps),
            "fast_rounds_per_worker": sum(map(len, fast)) / slow, "straggler_rounds": len(late),
            "exit_codes": codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=25)
    parser.add_argument("--deadline-s", type=float, default=0.1,
                        help="below the straggler's lag (a deadline longer than it waits for it "
                             "anyway)")
    parser.add_argument("--workers", type=int, default=3, help="the last one is the straggler")
    parser.add_argument("--json", default="bench-results/straggler.json")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="islands-straggler-"))
    results = [one(base / "none", args.seconds, False, None, args.workers),
               one(base / "wait", args.seconds, True, None, args.workers),
               one(base / "deadline", args.seconds, True, args.deadline_s, args.workers)]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    t = Table(title=f"a 3x straggler among {args.workers} workers (one torch thread each)")
    for col in ("run", "fast workers' median round", "rounds (fast)", "rounds (straggler)",
                "exit codes"):
        t.add_column(col)
    names = ["no straggler", "straggler, no deadline",
             f"straggler, round_deadline_s = {args.deadline_s:g}"]
    for name, r in zip(names, results):
        t.add_row(name, f"{r['fast_round_s_median']:.2f} s", f"{r['fast_rounds_per_worker']:.0f}",
                  str(r["straggler_rounds"]), str(r["exit_codes"]))
    Console(width=140).print(t)


if __name__ == "__main__":
    main()
