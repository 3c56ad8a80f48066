"""Soak: N workers on loopback for a given time under a random schedule of faults, plus one
worker with a mismatched config and one that sends malformed payloads.

The schedule (from ``--seed``) SIGKILLs and restarts workers, SIGSTOPs them (short stalls and
ones past the heartbeat timeout), and makes them leave (SIGTERM) and join again. Worker 0 is
never touched: it is the survivor whose threads, open files and RSS are sampled over time.
At 10% of the run a worker with ``algorithm.sync_every`` changed tries to join (it must be
refused at once); at 20% a worker whose payloads are one value short joins (it must be
excluded and named). A watchdog reads the coordinator's status twice a second: a stretch
with no commit longer than ``--hang-s`` is a hang.

At the end every worker is stopped and the report gives: rounds committed, hangs, hash
mismatches (rounds whose participants reported different shared-state hashes), who was
excluded or refused and why, the survivor's resource slopes (per hour, least squares, after
its first minute) and ranges, and the final eval loss of the global state against the
simulator's fault-free run of as many rounds (the same config and seed; a constant lr, so the
schedule does not depend on length). That reference runs after the soak in this one
process, one worker after another: it takes about as long again as the soak itself (37 to 39
minutes after a 30-minute run on 2 cores).

Run it:
    python benchmarks/soak.py --minutes 10                 # default: 4 workers
    python benchmarks/soak.py --minutes 30 --json bench-results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from islands.core.config import load_config
from islands.metrics.run_dir import read_metrics
from islands.runtime.coordinator import Coordinator
from islands.runtime.fingerprint import config_fingerprint

# a small model on the whole 8 MB corpus: the two spare ids (the bad workers) hold shares of
# the data that nobody trains on, which must not matter for the comparison with the
# simulator's fault-free run of ``workers`` workers
BASE = ["steps=10000000", "algorithm.sync_every=10", "inner.schedule=constant",
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
        "data.eval_batches=8", "eval_every=100000000", "device=cpu",
        "runtime.heartbeat_s=0.1", "runtime.heartbeat_timeout_s=1.0",
        "runtime.collective_timeout_s=10"]


class Soak:
    """One soak run. ``workers`` train; ids ``workers`` and ``workers + 1`` are the bad ones."""

    def __init__(self, workers: int, minutes: float, seed: int, out: Path, hang_s: float):
        self.n, self.seconds, self.out, self.hang_s = workers, 60 * minutes, out, hang_s
        self.rng = random.Random(seed)
        self.config = [f"workers={workers + 2}", *BASE]
        self.cfg = load_config(None, self.config)
        self.coord = Coordinator("127.0.0.1", 0, heartbeat_timeout_s=1.0, join_timeout_s=5.0,
                                 fingerprint=config_fingerprint(self.cfg)).start()
        self.addr = f"127.0.0.1:{self.coord.port}"
        self.log = open(out / "workers.log", "w")
        self.procs: dict[int, subprocess.Popen] = {}
        self.events: list[dict] = []
        self.samples: list[dict] = []
        self.hangs: list[float] = []
        self.exits: dict[str, int] = {}

    # --- processes ---------------------------------------------------------------------

    def argv(self, wid: int, extra: list[str] = ()) -> list[str]:
        argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "run"]
        for o in [*self.config, *extra]:
            argv += ["--set", o]
        return argv + ["--coordinator", self.addr, "--worker-id", str(wid),
                       "--out", str(self.out / f"w{wid}")]

    def start(self, wid: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.procs[wid] = subprocess.Popen(self.argv(wid), stdout=subprocess.DEVNULL,
                                           stderr=self.log, env=env)

    def note(self, what: str, wid: int) -> None:
        self.events.append({"t": round(time.monotonic() - self.t0, 1), "event": what,
                            "worker": wid})

    # --- the schedule --------------------------------------------------------------------

    def fault(self) -> None:
        """One random fault on a worker other than 0 (at least 2 keep training)."""
        wid = self.rng.randrange(1, self.n)
        p = self.procs.get(wid)
        if p is None or p.poll() is not None:
            self.start(wid)
            self.note("join", wid)
            return
        kind = self.rng.choice(["kill", "stall", "long stall", "leave"])
        if kind == "kill":
            p.send_signal(signal.SIGKILL)
            p.wait()
            time.sleep(self.rng.uniform(1, 5))
            self.start(wid)
        elif kind in ("stall", "long stall"):
            p.send_signal(signal.SIGSTOP)
            time.sleep(self.rng.uniform(0.2, 0.8) if kind == "stall" else
                       self.rng.uniform(1.5, 4.0))  # past the 1 s heartbeat timeout
            p.send_signal(signal.SIGCONT)
        else:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
        self.note(kind, wid)

    def bad_actors(self, elapsed: float) -> None:
        if elapsed > 0.1 * self.seconds and "mismatch" not in self.exits:
            self.exits["mismatch"] = -1
            self.procs[self.n] = subprocess.Popen(
                self.argv(self.n, ["algorithm.sync_every=7"]), stdout=subprocess.DEVNULL,
                stderr=self.log)
            self.note("mismatched config joins", self.n)
        if elapsed > 0.2 * self.seconds and "liar" not in self.exits:
            self.exits["liar"] = -1
            liar = [sys.executable, str(Path(__file__).parents[1] / "tests" / "integration" /
                                        "liar_worker.py"), *self.argv(self.n + 1)[4:]]
            self.procs[self.n + 1] = subprocess.Popen(
                liar, stdout=subprocess.DEVNULL, stderr=self.log,
                cwd=Path(__file__).parents[1])
            self.note("malformed payloads join", self.n + 1)

    # --- watching ------------------------------------------------------------------------

    def watchdog(self, stop: threading.Event) -> None:
        last_round, since = -1, time.monotonic()
        next_sample = 0.0
        while not stop.wait(0.5):
            st, now = self.coord.status(), time.monotonic()
            if st["last_round"] > last_round:
                if now - since > self.hang_s:
                    self.hangs.append(round(now - since, 1))
                last_round, since = st["last_round"], now
            if now - self.t0 >= next_sample:
                self.samples.append({"t": now - self.t0, **resources(self.procs[0].pid),
                                     "round": st["last_round"]})
                next_sample += 10.0
        if time.monotonic() - since > self.hang_s:
            self.hangs.append(round(time.monotonic() - since, 1))

    def run(self) -> dict:
        self.t0 = time.monotonic()
        for wid in range(self.n):
            self.start(wid)
        stop = threading.Event()
        dog = threading.Thread(target=self.watchdog, args=(stop,), daemon=True)
        dog.start()
        next_fault = 20.0
        while (elapsed := time.monotonic() - self.t0) < self.seconds:
            self.bad_actors(elapsed)
            if elapsed > next_fault:
                self.fault()
                next_fault = elapsed + self.rng.uniform(10, 30)
            time.sleep(0.2)
        stop.set()  # the watchdog judges the run, not its shutdown
        dog.join()
        for wid in (self.n, self.n + 1):
            if wid in self.procs:
                self.exits["mismatch" if wid == self.n else "liar"] = self.procs[wid].wait(30)
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            p.wait(timeout=120)
        status = self.coord.status()
        self.coord.stop()
        return self.report(status)

    def report(self, status: dict) -> dict:
        hashes: dict[int, set] = {}
        for wid in range(self.n):
            for d in self.out.glob(f"w{wid}*"):
                for row in read_metrics(d):
                    hashes.setdefault(row["round"], set()).add(row["hash"])
        mismatched = sorted(r for r, h in hashes.items() if len(h) > 1)
        rounds = max(hashes) + 1 if hashes else 0
        settled = [x for x in self.samples if x["t"] >= 60]
        final = evaluate_final(self.cfg, self.out / "w0" / "final.safetensors")
        reference = fault_free(self.cfg, rounds, self.n)
        return {
            "workers": self.n, "seconds": self.seconds, "rounds_committed": rounds,
            "hangs_over_s": self.hang_s, "hangs": self.hangs,
            "hash_mismatch_rounds": mismatched,
            "coordinator_hash_mismatches": status["hash_mismatches"],
            "excluded": status["excluded"], "refused_joins": status["refused_joins"],
            "bad_actor_exits": self.exits, "events": self.events,
            "resource_samples": self.samples,
            # after the first minute: process start and first allocations are not a trend
            "slopes_per_hour": {k: slope_per_hour(settled, k) for k in RESOURCES},
            "ranges": {k: [min(v), max(v)] if (v := [x[k] for x in settled
                                                      if x.get(k) is not None]) else None
                       for k in RESOURCES},
            "final_eval_loss": final, "fault_free_eval_loss": reference,
            "final_vs_fault_free": final / reference - 1,
        }


RESOURCES = ("threads", "open_files", "rss_mb")


def resources(pid: int) -> dict:
    """Threads, open files and resident memory (MB) of a process, from /proc."""
    try:
        rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status")
                   if line.startswith("VmRSS:")) / 1024
        return {"threads": len(os.listdir(f"/proc/{pid}/task")),
                "open_files": len(os.listdir(f"/proc/{pid}/fd")), "rss_mb": rss}
    except (OSError, StopIteration):
        return {"threads": None, "open_files": None, "rss_mb": None}


def slope_per_hour(samples: list[dict], key: str) -> float | None:
    """Least-squares slope of ``key`` against time, per hour (None: too few samples)."""
    pts = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mt, mv = sum(t for t, _ in pts) / n, sum(v for _, v in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    return 3600 * sum((t - mt) * (v - mv) for t, v in pts) / var if var else None


def evaluate_final(cfg, path: Path) -> float:
    """The task's eval loss of a worker's final global parameters."""
    import torch

    from islands.engine import build_worker, initial_model
    from islands.runtime import checkpoint
    from islands.tasks import build_task

    task = build_task(cfg)
    worker = build_worker(cfg, 0, initial_model(cfg, task, torch.device("cpu")), data_size=1)
    tensors, _ = checkpoint.load(path)
    worker.load_flat(tensors["global_params"])
    if "global_buffers" in tensors:  # BatchNorm statistics, when the task has them
        worker.load_flat_buffers(tensors["global_buffers"])
    worker.model.eval()
    with torch.no_grad():
        return task.evaluate(worker.model)["eval_loss"]


def fault_free(cfg, rounds: int, workers: int) -> float:
    """The simulator's eval loss after ``rounds`` rounds with ``workers`` workers, no faults."""
    from islands.sim.runner import simulate

    H = cfg.algorithm.sync_every
    return simulate(cfg.replace(**{"workers": workers, "steps": rounds * H,
                                   "eval_every": rounds * H}))["final_eval_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-s", type=float, default=15.0,
                        help="no commit for longer than this is a hang")
    parser.add_argument("--json", default="bench-results/soak.json")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="islands-soak-"))
    result = Soak(args.workers, args.minutes, args.seed, out, args.hang_s).run()
    result["run_folder"] = str(out)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    t = Table(title=f"soak: {args.workers} workers, {args.minutes:g} min, seed {args.seed}")
    t.add_column("figure")
    t.add_column("value")
    t.add_row("rounds committed", str(result["rounds_committed"]))
    t.add_row("faults", ", ".join(f"{k} {v}" for k, v in count(result["events"]).items()))
    t.add_row(f"hangs (> {args.hang_s:g} s without a commit)", str(len(result["hangs"])))
    t.add_row("rounds with differing hashes", str(len(result["hash_mismatch_rounds"])))
    t.add_row("excluded", "; ".join(f"{w} by {e['by']}: {e['why'][:60]}"
                                    for w, e in result["excluded"].items()) or "none")
    t.add_row("refused joins", "; ".join(r["why"][:70] for r in result["refused_joins"])
              or "none")
    t.add_row("bad actors' exit codes", json.dumps(result["bad_actor_exits"]))
    for k, v in result["slopes_per_hour"].items():
        span = result["ranges"][k]
        t.add_row(f"worker 0 {k} per hour (range)", "—" if v is None else
                  f"{v:+.2f} ({span[0]:g} to {span[1]:g})")
    t.add_row("final eval loss vs fault-free",
              f"{result['final_eval_loss']:.4f} vs {result['fault_free_eval_loss']:.4f} "
              f"({100 * result['final_vs_fault_free']:+.2f}%)")
    Console(width=140).print(t)
    print(f"JSON: {args.json}; run folder: {out}")


def count(events: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[e["event"]] = out.get(e["event"], 0) + 1
    return out


if __name__ == "__main__":
    main()
