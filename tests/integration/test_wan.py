"""Real processes over emulated slow links and network faults: workers in network namespaces
of their own (``islands.runtime.wan``) form their group at the address they advertise; the
harness leaves nothing behind, even when its owner is killed; a coordinator gone for good, or
back with another token, ends every worker (exit 3, exit 2) instead of a retry loop; a worker
whose contribution is NaN tells its peers at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from islands.core.config import load_config
from islands.runtime import wan
from islands.sim.runner import Simulation
from tests.integration.conftest import (
    TINY,
    assert_final_equal,
    free_port,
    last_round,
    launch_argv,
    metrics,
    wait_until,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root "
                                "(CI runs as root)")


@needs_root
def test_workers_in_namespaces_form_their_group_at_their_own_address(tmp_path, procs):
    """islands launch --emulate-network: each worker in its own namespace on a bridge, links
    shaped to 50 Mbit/s; gloo binds where each worker is reached (--host), so the group forms
    and the run ends with the simulator's parameters."""
    p = _emulated_launch(procs, tmp_path / "emu", [*TINY, "workers=2",
                                                   "network.bandwidth_bps=50e6"])
    assert not [n for n in wan.owned()["namespaces"] if str(p.pid) in n]


def _emulated_launch(procs, out, sets):
    """``islands launch --emulate-network`` of ``sets`` into ``out``; it ends with the
    simulator's parameters for the same config. Returns the launch's process."""
    p = procs.start("launch", launch_argv(out, sets, "--emulate-network"))
    sim = Simulation(load_config(None, sets))
    sim.run()
    assert p.wait(timeout=120) == 0
    assert_final_equal(out, sim.final_state, str(out))
    return p


@needs_root
def test_launch_carries_out_the_fault_plans_link_and_slow_events(tmp_path, procs):
    """islands launch --emulate-network with a [[faults]] plan: worker 1's link shaped anew
    when round 2 is in flight (tc holds the new rates after), worker 0 slowed 2x from 0.5 s
    on. The workers run without the plan (the coordinator's fingerprint is theirs); the
    events change timing only, so the job ends with the simulator's parameters for the same
    config, plan included, and summary.json lists each event with when it happened."""
    p = _emulated_launch(procs, tmp_path / "plan", [
        *TINY, "workers=2", "network.bandwidth_bps=50e6",
        'faults=[{kind = "link", worker = 1, round = 2, upload_bps = 5e6, '
        'download_bps = 7e6}, {kind = "slow", worker = 0, at_s = 0.5, factor = 2.0}]'])
    done = json.loads((tmp_path / "plan" / "summary.json").read_text())["faults_carried_out"]
    link = next(d for d in done if d["kind"] == "link")
    assert (link["worker"], link["upload_bps"], link["download_bps"]) == (1, 5_000_000, 7_000_000)
    assert link["round"] >= 2
    slow = next(d for d in done if d["kind"] == "slow")
    assert (slow["worker"], slow["factor"]) == (0, 2.0) and slow["at_s"] >= 0.5
    assert "worker 1's link is now 5 Mbit/s up, 7 Mbit/s down" in procs.stderr(p)


@needs_root
def test_the_harness_removes_its_namespaces_when_its_owner_is_killed(tmp_path):
    script = ("import sys, time\nfrom islands.runtime.wan import EmulatedNetwork\n"
              "net = EmulatedNetwork([10e6] * 2, [10e6] * 2).start()\n"
              "print(net.prefix, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    prefix = p.stdout.readline().strip()
    made = [n for names in wan.owned().values() for n in names if n.startswith(prefix)]
    assert len(made) == 2 + 1 + 2  # two namespaces, the bridge, two links
    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_until(lambda: not any(n.startswith(prefix) for names in wan.owned().values()
                               for n in names), 20, "the guardian's cleanup")


def _coordinator(procs, port: int, token_file, name: str):
    argv = [sys.executable, "-m", "islands.cli.main", "coordinator", "--host", "127.0.0.1",
            "--port", str(port), "--token-file", str(token_file)]
    return procs.start(name, argv)


def _workers(procs, port: int, out, token_file, n: int = 2, over=()):
    argv = ["--token-file", str(token_file)]
    return [procs.worker(i, f"127.0.0.1:{port}", out, ["workers=2", "steps=4000",
                                                       "algorithm.sync_every=5", *over], argv)
            for i in range(n)]


def _kill_the_coordinator_mid_run(tmp_path, procs, over=()):
    """A coordinator process and two workers; once both committed round 1 the coordinator
    is SIGKILLed. Returns (port, out, workers)."""
    token = tmp_path / "token"
    token.write_text("first secret")
    port = free_port()
    coord = _coordinator(procs, port, token, "coordinator")
    out = tmp_path / "run"
    ws = _workers(procs, port, out, token, over=over)
    wait_until(lambda: min(last_round(out / f"w{i}") for i in range(2)) >= 1, 90, "round 1")
    coord.send_signal(signal.SIGKILL)
    coord.wait()
    return port, out, ws


def test_a_coordinator_gone_for_good_ends_every_worker(tmp_path, procs):
    _, out, ws = _kill_the_coordinator_mid_run(tmp_path, procs, [
        "runtime.coordinator_timeout_s=3", "runtime.join_timeout_s=2"])
    for p in ws:  # they stop (before: they retried every join_timeout_s, forever)
        assert p.wait(timeout=60) == 3
        assert "has been unreachable for" in procs.stderr(p)
    for i in range(2):  # and write their run directory on the way out
        assert json.loads((out / f"w{i}" / "summary.json").read_text())["removed"]


def test_a_coordinator_back_with_another_token_ends_every_worker_at_once(tmp_path, procs):
    port, _, ws = _kill_the_coordinator_mid_run(tmp_path, procs)
    other = tmp_path / "other"
    other.write_text("another secret")
    _coordinator(procs, port, other, "impostor")
    for p in ws:
        assert p.wait(timeout=60) == 2
        err = procs.stderr(p)
        assert "bad token" in err and err.count("bad token") <= 5  # not thousands of aborts
        assert "every worker needs the coordinator's token" in err


def test_a_nan_contribution_is_told_to_the_peers_at_once_naming_its_worker(tmp_path, procs,
                                                                         coordinator):
    """Worker 2's pseudo-gradient turns NaN at round 2: it cannot encode it and says so in
    place of its messages, so the others end the attempt at once (not after the 30 s
    collective timeout) and retry without it; it is excluded by its own report."""
    coord = coordinator(heartbeat_timeout_s=5.0)
    addr, out = f"127.0.0.1:{coord.port}", tmp_path / "run"
    over = ["workers=3", "steps=40", "algorithm.sync_every=5", "runtime.heartbeat_timeout_s=5.0"]
    ws = [procs.worker(i, addr, out, over) for i in (0, 1)]
    bad = procs.start("nan", [sys.executable, "tests/integration/nan_worker.py",
                              *procs.worker_argv(2, addr, out, over)[4:]])
    assert bad.wait(timeout=90) == 3
    assert all(p.wait(timeout=90) == 0 for p in ws)
    assert "excluded from the run at round 2" in procs.stderr(bad)
    for p in ws:
        err = procs.stderr(p)
        assert "worker 2 gave up the exchange" in err and "NaN/Inf" in err
        assert "no answer within" not in err  # nobody waited for the timeout
    row = next(r for r in metrics(out / "w0") if r["round"] == 2)
    assert row["excluded"][0]["worker"] == 2 and row["attempts"] == 2
    assert coord.status()["excluded"]["2"]["by"] == 2  # its own report named it
