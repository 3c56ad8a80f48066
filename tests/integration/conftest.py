"""Helpers for the real-process tests: free ports, worker processes, a timeout on every test,
and every process's stderr printed when a test fails (as torchft's manager_integ_test)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from islands.metrics.run_dir import read_metrics
from tests.integration import zygote

TEST_TIMEOUT_S = 150

# A tiny run: every integration test finishes in seconds on 2 cores.
TINY = ["steps=20", "algorithm.sync_every=5", "model.n_layer=1", "model.n_embd=32",
        "data.max_bytes=200000", "eval_every=10", "device=cpu", "data.eval_batches=2"]


def final_state(run_dir: Path) -> dict:
    """A run directory's ``final.safetensors``: the model's state_dict."""
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "final.safetensors")


def assert_final_equal(run_dir: Path, expected: dict, what: str = "") -> None:
    """``final.safetensors`` holds ``expected``'s names and, bit for bit, its tensors."""
    import torch

    got = final_state(run_dir)
    assert list(got) == list(expected) or sorted(got) == sorted(expected), what
    for k, v in expected.items():
        assert torch.equal(got[k], v.cpu()), f"{what}: {k} differs from the simulator's"


def assert_per_worker_equal(job_dir: Path, sim, summary: dict) -> dict:
    """A gossip job: each worker's ``final.safetensors`` holds the simulator's worker's own
    global parameters bit for bit, and it sent the same bytes; at every evaluation the
    job's consensus distance (estimated from its workers' sketches) is the simulator's
    exact one within 5%. Returns the job's summary."""
    import json

    import torch

    job = json.loads((job_dir / "summary.json").read_text())
    names = [n for n, q in sim.workers[0].model.named_parameters() if q.requires_grad]
    for w in sim.workers:
        state = final_state(job_dir / f"w{w.id}")
        got = torch.cat([state[n].reshape(-1).float() for n in names])
        assert torch.equal(got, w.global_params.detach()), f"worker {w.id}"
    assert job["bytes_sent_by_worker"] == summary["bytes_sent_by_worker"]
    if "topology" in summary:  # parameters of their own (not MoDeST's)
        exact = {p["step"]: p["consensus_distance"] for p in summary["eval_curve"]}
        estimated = {p["step"]: p.get("consensus_distance") for p in job["eval_curve"]}
        assert estimated.keys() == exact.keys() and max(exact.values()) > 0
        for step, d in exact.items():
            assert estimated[step] == pytest.approx(d, rel=0.05, abs=1e-6), step
    return job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Starts processes with stderr captured to files; dumps them all on failure."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.items: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen:
        err = self.tmp / f"{name}.{len(self.items)}.stderr"
        with open(err, "w") as f:
            p = popen(argv, stdout=subprocess.PIPE, stderr=f.fileno(), cwd=cwd)
        p.started_unix = time.time()
        self.items.append((name, p, err))
        return p

    def worker(self, i: int, addr: str, out: Path, overrides=(), extra=()) -> subprocess.Popen:
        return self.start(f"w{i}", self.worker_argv(i, addr, out, overrides, extra))

    @staticmethod
    def worker_argv(i: int, addr: str, out: Path, overrides=(), extra=()) -> list[str]:
        """``islands run``'s command line for worker ``i`` (the TINY run, then overrides)."""
        argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "run"]
        for o in [*TINY, *overrides]:
            argv += ["--set", o]
        return argv + ["--coordinator", addr, "--worker-id", str(i), "--out",
                       str(out / f"w{i}"), *extra]

    def stderr(self, p: subprocess.Popen) -> str:
        return next(e for _, q, e in self.items if q is p).read_text()

    def dump(self) -> None:
        for name, p, err in self.items:
            print(f"\n===== {name} (pid {p.pid}, rc {p.poll()}) stderr =====")
            print(err.read_text()[-6000:])

    def stop_all(self) -> None:
        for _, p, _ in self.items:
            if p.poll() is None:
                p.kill()
                p.wait()


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
_zygote: zygote.Zygote | None = None


def popen(argv: list[str], *, stdout, stderr, cwd: Path | None = None,
          env: dict[str, str] | None = None, stdin=subprocess.DEVNULL):
    """A process as ``subprocess.Popen(argv)`` (one torch thread unless ``env`` says); a
    Python one is forked from the session's zygote (:mod:`tests.integration.zygote`: no 2 s
    of imports each), whose processes read nothing from stdin."""
    global _zygote
    env = env or ENV
    if argv[0] != sys.executable or not zygote.enabled():
        return subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, text=True, cwd=cwd,
                                stdin=stdin)
    if _zygote is None:
        _zygote = zygote.Zygote(ENV)
    stdout, stderr = (f.fileno() if hasattr(f, "fileno") else f for f in (stdout, stderr))
    return _zygote.spawn(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr)


def run_ranks(script: str, n: int, *args: str) -> list[tuple[subprocess.Popen, str, str]]:
    """``python -c script RANK n args...`` for every rank, to their end: (process, stdout,
    stderr) of each."""
    ps = [popen([sys.executable, "-c", script, str(r), str(n), *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(n)]
    return [(p, *p.communicate(timeout=120)) for p in ps]


@pytest.fixture(scope="session", autouse=True)
def _stop_the_zygote():
    """The session's zygote goes (and its folder) once the last test is done."""
    global _zygote
    yield
    if _zygote is not None:
        _zygote.close()
        _zygote = None


@pytest.fixture(scope="session", autouse=True)
def _no_namespace_left():
    """Every network namespace and link an emulated network made is gone at the end: any a
    dead owner left behind fails the session (and is removed)."""
    yield
    if os.geteuid() == 0:
        from islands.runtime import wan

        assert wan.remove_stale() == [], "namespaces or links left behind by a test"


def wait_exit(p: subprocess.Popen, timeout_s: float = 90) -> int:
    return p.wait(timeout=timeout_s)


def launch_argv(out: Path, sets, *flags: str) -> list[str]:
    """``islands launch --out OUT FLAGS --set S ...``'s command line."""
    return [sys.executable, "-m", "islands.cli.runtime_cmd", "launch", "--out", str(out),
            *flags, *(a for s in sets for a in ("--set", s))]


def checkpointed_run(procs: "Procs", coordinator, workers: int, out: Path, ck: Path,
                     overrides, every: int = 1, timeout_s: float = 120) -> None:
    """``workers`` workers under a coordinator of their own, each writing a checkpoint every
    ``every`` rounds (updates) into ``ck/w<i>/``, all kept; returns once each exited 0."""
    c = coordinator()
    ws = [procs.worker(i, f"127.0.0.1:{c.port}", out,
                       [*overrides, f"runtime.checkpoint_every={every}",
                        "runtime.keep_checkpoints=off"], ["--checkpoint-dir", str(ck)])
          for i in range(workers)]
    assert all(p.wait(timeout=timeout_s) == 0 for p in ws)


def wait_until(pred, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


metrics = read_metrics  # the rows of a worker's metrics.jsonl so far


def last_round(run_dir: Path) -> int:
    return max((r["round"] for r in metrics(run_dir)), default=-1)


# a model big enough that an all-reduce takes a while, so a signal can land inside one
BIG = ["steps=5000", "algorithm.sync_every=1", "model.n_layer=2", "model.n_embd=512",
       "model.n_head=4"]


def kill(workers: dict, i: int, out: Path) -> tuple[float, int]:
    """SIGKILLs worker ``i`` and sets its run folder aside (``w{i}-killed``) for a restart's;
    returns the time of the kill and the last round it committed."""
    workers[i].send_signal(signal.SIGKILL)
    t_kill = time.time()
    workers[i].wait()
    last = last_round(out / f"w{i}")
    (out / f"w{i}").rename(out / f"w{i}-killed")
    return t_kill, last


def workers_in_a_collective(procs: "Procs", addr: str, out: Path, n: int,
                            overrides=()) -> dict:
    """Start ``n`` workers of the BIG model; return once all committed round 1 and the last
    one has just entered a collective (its log says so)."""
    ws = {i: procs.worker(i, addr, out, [f"workers={n}", *BIG, *overrides]) for i in range(n)}
    wait_until(lambda: min(last_round(out / f"w{i}") for i in range(n)) >= 1, 90, "round 1")
    seen = procs.stderr(ws[n - 1]).count("collective starts")
    wait_until(lambda: procs.stderr(ws[n - 1]).count("collective starts") > seen, 30,
               f"worker {n - 1} entering a collective")
    return ws


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def procs(request, tmp_path):
    """Worker processes of one test; killed at the end, their stderr printed on failure."""
    ps = Procs(tmp_path)
    yield ps
    ps.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        ps.dump()


@pytest.fixture(autouse=True)
def _timeout():
    """A hard timeout on every integration test (no plugin needed)."""
    def fire(*_):
        raise TimeoutError(f"integration test exceeded {TEST_TIMEOUT_S} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(TEST_TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def coordinator():
    """An in-process coordinator on a free port (fast heartbeat timeout)."""
    from islands.runtime.coordinator import Coordinator

    def make(**kw):
        c = Coordinator("127.0.0.1", 0, **{"heartbeat_timeout_s": 1.0, **kw}).start()
        made.append(c)
        return c

    made = []
    yield make
    for c in made:
        c.stop()
