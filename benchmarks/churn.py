"""Churn benchmark: 3 workers on loopback, one SIGKILLed mid-run and restarted.

Reports the survivors' stall (kill to their next committed round), the restarted worker's
time from process start to its first committed round, the state-transfer rate it saw, the
final eval loss against the same run without failure, and the rounds whose shared-state
hashes differed between participants; beside them, the floor of ``rejoin_s`` measured in the
same run: the time a fresh process takes to import the runtime (median of 3).

Run it: ``python benchmarks/churn.py --json churn.json`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from islands.metrics.run_dir import read_metrics
from islands.runtime.coordinator import Coordinator

CONFIG = ["workers=3", "steps=300", "algorithm.sync_every=10", "data.max_bytes=1000000",
          "eval_every=100", "device=cpu", "data.eval_batches=4", "runtime.heartbeat_s=0.1",
          "runtime.heartbeat_timeout_s=1.0"]


def start_worker(i: int, addr: str, out: Path, log) -> subprocess.Popen:
    argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "run"]
    for o in CONFIG:
        argv += ["--set", o]
    argv += ["--coordinator", addr, "--worker-id", str(i), "--out", str(out / f"w{i}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
    p.started_unix = time.time()
    return p


def run(out: Path, kill_round: int | None) -> dict:
    """One job; with ``kill_round``, worker 2 is killed once every worker committed it."""
    out.mkdir(parents=True, exist_ok=True)
    coord = Coordinator("127.0.0.1", 0, heartbeat_timeout_s=1.0).start()
    addr = f"127.0.0.1:{coord.port}"
    log = open(out / "workers.log", "w")
    procs = {i: start_worker(i, addr, out, log) for i in range(3)}
    facts: dict = {}
    try:
        if kill_round is not None:
            while min((max((r["round"] for r in read_metrics(out / f"w{i}")), default=-1)
                       for i in range(3))) < kill_round:
                time.sleep(0.01)
            procs[2].send_signal(signal.SIGKILL)
            facts["kill_unix"] = time.time()
            procs[2].wait()
            (out / "w2").rename(out / "w2-killed")
            procs[2] = start_worker(2, addr, out, log)
            facts["restart_unix"] = procs[2].started_unix
        for p in procs.values():
            if p.wait(timeout=600) != 0:
                raise RuntimeError(f"a worker failed; see {out / 'workers.log'}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        coord.stop()
        facts["coordinator"] = coord.status()
    facts["summaries"] = {i: json.loads((out / f"w{i}" / "summary.json").read_text())
                          for i in range(3)}
    return facts


def import_s(repeats: int = 3) -> float:
    """Median seconds for a fresh process to import the runtime (torch included)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import islands.runtime.worker"], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def mismatched_rounds(dirs: list[Path]) -> int:
    by_round: dict[int, set] = {}
    for d in dirs:
        for r in read_metrics(d):
            by_round.setdefault(r["round"], set()).add(r["hash"])
    return sum(1 for hashes in by_round.values() if len(hashes) > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the figures to this file")
    ap.add_argument("--kill-round", type=int, default=8)
    ap.add_argument("--out", default=None, help="keep the run folders here")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="churn-"))
    base = run(root / "baseline", None)
    churn = run(root / "churn", args.kill_round)
    kill, restart = churn["kill_unix"], churn["restart_unix"]
    survivors = [read_metrics(root / "churn" / f"w{i}") for i in (0, 1)]
    stall = max(min(r["commit_unix"] for r in rs if r["commit_unix"] > kill) for rs in survivors)
    w2 = churn["summaries"][2]
    loss = lambda f: sum(s["final_eval_loss"] for s in f["summaries"].values()) / 3  # noqa: E731
    figures = {
        "stall_s": stall - kill,
        "rejoin_s": w2["first_commit_unix"] - restart,
        "import_runtime_s": import_s(),
        "state_transfer_mb_per_s": (w2["state_bytes"] / 1e6) / max(w2["state_transfer_s"], 1e-9),
        "state_bytes": w2["state_bytes"],
        "final_loss_ratio": loss(churn) / loss(base),
        "hash_mismatches": mismatched_rounds([root / "churn" / f"w{i}" for i in range(3)]
                                             + [root / "churn" / "w2-killed"])
        + churn["coordinator"]["hash_mismatches"],
        "final_hashes_identical": len({s["final_hash"] for s in churn["summaries"].values()}) == 1,
        "aborted_attempts": sum(s["aborted_attempts"] for s in churn["summaries"].values()),
        "baseline_final_loss": loss(base), "churn_final_loss": loss(churn),
        "round_s_median": sorted(r["round_s"] for r in survivors[0])[len(survivors[0]) // 2],
        "rejoined_as_observer": bool(read_metrics(root / "churn" / "w2")[0].get("observer")),
        "survivor_round_s_when_healing": max(
            (r["round_s"] for rs in survivors for r in rs if r.get("observers")), default=None),
        "rejoin_setup_note": "rejoin_s runs from the restarted process's start (import torch, "
                             "data, model) to its first committed round: the round in flight, "
                             "joined as a weight-0 observer, or else the next round",
    }
    print(json.dumps(figures), flush=True)  # one JSON object on one line
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
