"""Pieces of the slow-link harness and of the network fault handling, in process: the harness
refuses clearly without root; a give-up header names its worker and why; a lost coordinator
ends the retries; a checkpoint whose private state is NaN is refused; the collective a job
runs (runtime.trust) must be the same on every worker."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from islands.core.config import load_config
from islands.core.errors import ConfigError, PeerGaveUp
from islands.runtime import launch, wan
from islands.runtime.fingerprint import config_fingerprint, refusal
from islands.runtime.membership import CoordinatorClient, CoordinatorLost
from islands.transports import wire


def test_emulated_compute_slows_each_worker_by_its_step_time_over_the_fastest():
    cfg = load_config(None, ["workers=3", "compute.step_time_s=0.2",
                             "compute.worker=[{id = 1, step_time_s = 0.6}, "
                             "{id = 2, step_time_s = 0.1}]"])
    assert launch.compute_factors(cfg) == pytest.approx({0: 2.0, 1: 6.0, 2: 1.0})
    assert launch.throttle(None, 1.0) is None  # the fastest runs as it is


def test_the_harness_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(wan.os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="needs root: run it as root"):
        wan.check_available()
    monkeypatch.setattr(wan.shutil, "which", lambda tool: None)
    with pytest.raises(ConfigError, match="needs iproute2's ip and tc"):
        wan.check_available()
    assert wan.tbf_burst(100e6) == 125_000 and wan.tbf_burst(1e6) == 1 << 16


def test_a_give_up_header_names_its_worker_and_why():
    buf = torch.zeros(wire.MAX_HEADER_BYTES, dtype=torch.uint8)
    void = wire.pack_void("all-reduce/reduce-scatter: worker 2's own contribution holds NaN")
    buf[:void.numel()] = void
    with pytest.raises(PeerGaveUp, match="worker 2 gave up the exchange: .* holds NaN") as e:
        wire.unpack_header(buf, 2)
    assert e.value.sender == 2


def test_a_coordinator_unreachable_past_its_timeout_is_gone_for_good():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = CoordinatorClient(f"127.0.0.1:{port}", b"", 0, ["127.0.0.1", 1], reconnect_s=0.2,
                               coordinator_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(CoordinatorLost, match=r"unreachable for .*coordinator_timeout_s = 0.5"):
        for _ in range(10):  # each failed attempt is a CommError (the round aborts, retries)
            try:
                client._reconnect()
            except CoordinatorLost:
                raise
            except Exception:  # noqa: BLE001 (a CommError: not yet given up)
                continue
    assert time.monotonic() - t0 < 5


def test_a_checkpoint_whose_inner_state_is_nan_is_refused(tmp_path):
    from islands.algorithms import DiLoCo
    from islands.algorithms.base import Worker
    from islands.codecs.cast import Identity
    from islands.runtime import checkpoint, state

    model = torch.nn.Linear(2, 2)
    w = Worker(0, model, torch.optim.Adam(model.parameters()), Identity())
    algo = DiLoCo(2)
    algo.attach(w)
    model(torch.ones(1, 2)).sum().backward()
    w.inner.step()
    w.inner.state[next(iter(w.inner.state))]["exp_avg"].fill_(float("nan"))
    shared = algo.shared_state(w)
    path = tmp_path / "round-1.safetensors"
    checkpoint.save(path, shared, {"round": 1, "hash": state.digest(shared)}, w)
    tensors, facts = checkpoint.load(path)
    checkpoint.verify(path, checkpoint.shared_part(tensors), facts, 4)  # the hash agrees
    with pytest.raises(ConfigError, match=r"inner/0/exp_avg holds NaN/Inf \(this worker's own "
                                          r"state, which the hash does not cover\)"):
        checkpoint.verify(path, checkpoint.shared_part(tensors), facts, 4,
                          private=checkpoint.worker_part(tensors))


def test_every_worker_must_run_the_same_collective():
    job = config_fingerprint(load_config(None, []))
    mine = config_fingerprint(load_config(None, ["runtime.trust=cluster"]))
    assert "runtime.trust is 'open' in the job and 'cluster' here" in refusal(job, mine)
    assert refusal(job, config_fingerprint(load_config(None, ["runtime.heartbeat_s=0.2"]))) \
        is None


@pytest.mark.parametrize("event, emulate, match", [
    ('kind = "partition", workers = [0], round = 2', True,
     r"faults\[0\] \(kind = 'partition'\).*simulator only"),
    ('kind = "join", worker = 1, round = 2', True, r"faults\[0\]: worker 1 joins without"),
    ('kind = "link", worker = 1, round = 2, upload_bps = 1e6', False, "--emulate-network"),
    ('kind = "link", worker = 1, round = 2, latency_s = 0.05', True, r"faults\[0\].latency_s"),
])
def test_launch_refuses_a_fault_it_cannot_carry_out_before_anything_starts(event, emulate,
                                                                          match, tmp_path):
    cfg = load_config(None, ["workers=2", f"faults=[{{{event}}}]"])
    with pytest.raises(ConfigError, match=match):
        launch.launch(cfg, tmp_path / "out", lambda *a: [], emulate_network=emulate)
    assert not (tmp_path / "out").exists()  # nothing written
    launch.check_launch_faults(load_config(None, [  # what it carries out
        "workers=2", 'faults=[{kind = "slow", worker = 0, at_s = 1.0, factor = 3.0}, '
        '{kind = "crash", worker = 1, round = 2}, {kind = "join", worker = 1, round = 4}, '
        '{kind = "leave", worker = 0, at_s = 9.0}]']), False)


class _Proc:
    def __init__(self) -> None:
        self.signals, self.alive = [], True

    def poll(self):
        return None if self.alive else 0

    def send_signal(self, sig) -> None:
        self.signals.append(sig)


class _Workers:
    def __init__(self, n: int) -> None:
        self.procs = {i: _Proc() for i in range(n)}
        self.calls: list[tuple[str, int]] = []

    def crash(self, i: int) -> None:
        self.procs[i].alive = False
        self.calls.append(("crash", i))

    def start(self, i: int) -> None:
        self.procs[i] = _Proc()
        self.calls.append(("start", i))


class _Coord:
    def __init__(self) -> None:
        self.now = {"epoch": 0, "last_round": -1, "round_in_flight": None}

    def status(self) -> dict:
        return dict(self.now)


def test_launch_s_fault_runner_carries_out_each_event_at_its_round_in_order():
    """A crash at round 2 and a join at round 4 happen once the coordinator has those rounds
    in flight, not before; a leave whose time never comes is listed as skipped at the end."""
    import signal as signals

    cfg = load_config(None, ["workers=2", 'faults=[{kind = "join", worker = 1, round = 4}, '
                             '{kind = "crash", worker = 1, round = 2}, '
                             '{kind = "leave", worker = 0, at_s = 1000.0}]'])
    workers, coord = _Workers(2), _Coord()
    runner = launch.FaultRunner(cfg.faults, workers, launch.Throttles(workers.procs), None,
                                coord).start()
    try:
        coord.now.update(epoch=1, round_in_flight=1)
        time.sleep(3 * launch.POLL_S)
        assert workers.calls == []  # round 1: nothing due yet
        coord.now.update(last_round=1, round_in_flight=2)
        _wait(lambda: workers.calls == [("crash", 1)])
        coord.now.update(last_round=3, round_in_flight=4)
        _wait(lambda: workers.calls == [("crash", 1), ("start", 1)])
    finally:
        runner.stop()
    assert [(d["kind"], d["round"]) for d in runner.carried_out[:2]] == [("crash", 2),
                                                                       ("join", 4)]
    assert runner.carried_out[2] == {"fault": 2, "kind": "leave", "worker": 0,
                                     "skipped": "the job ended first"}
    assert signals.SIGTERM not in workers.procs[0].signals


def _wait(ok, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)
