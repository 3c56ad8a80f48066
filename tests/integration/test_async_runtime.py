"""Asynchronous local SGD over real processes: one order of updates, the coordinator's, so
every replica ends bit for bit equal, and equal to the simulator's replay of that order; the
members regroup when one is killed and when one joins, and still end equal."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from islands.core.config import load_config
from islands.sim.runner import Simulation
from tests.integration.conftest import (
    TINY,
    assert_final_equal,
    checkpointed_run,
    final_state,
    free_port,
    launch_argv,
    metrics,
    wait_until,
)

ASYNC = ["algorithm.name=async_local_sgd", "outer.momentum=0.3", "algorithm.max_staleness=2",
         "runtime.heartbeat_timeout_s=5.0"]


DIGITS = ["task.name=digits_cnn", "algorithm.sync_every=5", "eval_every=10", "device=cpu"]


@pytest.mark.parametrize("task", [TINY, DIGITS], ids=["byte_gpt", "digits_cnn"])
def test_an_async_job_ends_with_one_replica_the_simulators_replay_of_its_order(tmp_path,
                                                                              procs, task):
    """Three workers post as they finish; some updates arrive too stale and are dropped.
    Every worker ends with the same parameters, and the simulator, posting the same updates
    in the coordinator's order, ends with them too, bit for bit (with BatchNorm's running
    statistics, the poster's, for the CNN)."""
    overrides = [*task, "workers=3", "steps=40", *ASYNC]
    assert procs.start("launch", launch_argv(tmp_path / "job", overrides)).wait(timeout=120) == 0
    job = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert len(job["final_hashes"]) == 1
    order = json.loads((tmp_path / "job" / "w0" / "summary.json").read_text()
                       )["coordinator"]["async_posts"]
    assert sum(p["steps"] for p in order) == 3 * 40  # the budget, spent once
    assert {p["worker"] for p in order} == {0, 1, 2}
    rows = [r for i in range(3) for r in metrics(tmp_path / "job" / f"w{i}")]
    assert sorted(r["seq"] for r in rows if not r["dropped"]) == list(range(
        sum(p["seq"] is not None for p in order)))
    sim = Simulation(load_config(None, overrides), post_order=order)
    summary = sim.run()
    for i in range(3):
        assert_final_equal(tmp_path / "job" / f"w{i}", sim.final_state, f"w{i}")
    assert summary["async_dropped_updates"] == sum(p["seq"] is None for p in order)


def test_async_members_regroup_when_one_is_killed_and_when_one_joins(tmp_path, procs,
                                                                     coordinator):
    """Worker 2 is killed mid-run: the others' transfers with it fail, they regroup from
    the replica holding the most updates and go on; a new worker 2 then joins (it receives
    that replica) and the three finish the budget. Every survivor ends with the same
    parameters."""
    coord = coordinator()
    addr, out = f"127.0.0.1:{coord.port}", tmp_path / "run"
    over = ["workers=3", "steps=1500", "algorithm.sync_every=10", "eval_every=100000", *ASYNC,
            "runtime.heartbeat_timeout_s=1.0"]
    ws = {i: procs.worker(i, addr, out, over) for i in range(3)}
    wait_until(lambda: len(metrics(out / "w2")) >= 3, 90, "three updates of worker 2")
    ws[2].send_signal(signal.SIGKILL)
    ws[2].wait()
    seen = len(metrics(out / "w0"))
    wait_until(lambda: len(metrics(out / "w0")) >= seen + 3, 60, "updates without worker 2")
    ws[2] = procs.worker(2, addr, out / "again", over)
    assert all(ws[i].wait(timeout=120) == 0 for i in range(3))
    summaries = [json.loads((d / "summary.json").read_text())
                 for d in (out / "w0", out / "w1", out / "again" / "w2")]
    assert len({s["final_hash"] for s in summaries}) == 1
    assert all(s["aborted_attempts"] >= 2 for s in summaries[:2])  # the kill, the join
    assert summaries[2]["state_transfers"] == 1


def test_an_async_worker_asked_to_stop_leaves_and_the_others_finish(tmp_path, procs,
                                                                   coordinator):
    """SIGTERM to worker 1 mid-run: it stops with exit 0 and its files written; the other
    two regroup without it, finish the budget and end with the same parameters."""
    coord = coordinator()
    addr, out = f"127.0.0.1:{coord.port}", tmp_path / "run"
    over = ["workers=3", "steps=600", "algorithm.sync_every=10", "eval_every=100000", *ASYNC]
    ws = {i: procs.worker(i, addr, out, over) for i in range(3)}
    wait_until(lambda: len(metrics(out / "w1")) >= 3, 90, "three updates of worker 1")
    ws[1].send_signal(signal.SIGTERM)
    assert ws[1].wait(timeout=60) == 0
    assert (out / "w1" / "summary.json").exists()
    assert ws[0].wait(timeout=120) == 0 and ws[2].wait(timeout=120) == 0
    s0, s2 = (json.loads((out / f"w{i}" / "summary.json").read_text()) for i in (0, 2))
    assert s0["final_hash"] == s2["final_hash"] and s0["aborted_attempts"] >= 1
    assert s0["updates_applied"] == s2["updates_applied"]


def test_a_worker_slowed_3x_by_the_fault_plan_takes_far_less_than_its_share_in_both_worlds(
        tmp_path, procs):
    """One ``[[faults]]`` plan (worker 2 three times slower from the start), run by the
    simulator and carried out by ``islands launch`` on three real processes (its process
    stopped two thirds of the time): with ``dynamic_steps`` the slow worker's updates carry
    fewer inner steps, in proportion to its measured speed, so it takes far less than its
    even share (1/3) of the budget in both worlds: about 1/7 in the simulator, less on two
    cores, where the stopped process also loses its turns to the others (0.057 in one
    run)."""
    sets = [*TINY, "workers=3", "steps=300", "algorithm.sync_every=10", "eval_every=100000",
            *ASYNC, "faults=[{kind = 'slow', worker = 2, at_s = 0.0, factor = 3.0}]"]
    sim = Simulation(load_config(None, sets)).run()
    sim_share = sim["inner_steps_by_worker"][2] / sum(sim["inner_steps_by_worker"])
    out = tmp_path / "run"
    assert procs.start("launch", launch_argv(out, sets)).wait(timeout=180) == 0
    done = json.loads((out / "summary.json").read_text())["faults_carried_out"]
    assert [(d["kind"], d["worker"], d["factor"]) for d in done] == [("slow", 2, 3.0)]
    steps = [json.loads((out / f"w{i}" / "summary.json").read_text())["inner_steps_by_worker"]
             [str(i)] for i in range(3)]
    real_share = steps[2] / sum(steps)
    print(f"slow worker's share of the inner steps: simulator {sim_share:.3f}, real "
          f"{real_share:.3f} ({steps})")
    assert sum(steps) == 3 * 300 and 0.09 < sim_share < 0.2
    assert real_share < 0.2
    rows = {i: [r["inner_steps"] for r in metrics(out / f"w{i}")][1:] for i in range(3)}
    mean = {i: sum(v) / len(v) for i, v in rows.items()}
    assert mean[2] < 0.5 * min(mean[0], mean[1]), mean  # its updates carry fewer steps


def test_launch_emulates_a_slow_worker_from_compute(tmp_path, procs):
    """``islands launch --emulate-compute`` slows worker 2 by its ``[compute]`` step time
    over the others' (3x): under asynchronous local SGD it takes far less than its even
    share of the inner steps; without the flag the same config gives it about its share."""
    over = [*TINY, "workers=3", "steps=300", "algorithm.sync_every=10", "eval_every=100000",
            *ASYNC, "compute.worker=[{id = 2, step_time_s = 0.3}]"]

    def share(flags: list[str], name: str) -> float:
        assert procs.start(name, launch_argv(tmp_path / name, over, *flags)
                           ).wait(timeout=180) == 0
        steps = json.loads((tmp_path / name / "w2" / "summary.json").read_text()
                           )["inner_steps_by_worker"]["2"]
        return steps / (3 * 300)

    slowed, even = share(["--emulate-compute"], "slowed"), share([], "even")
    print(f"worker 2's share of the inner steps: {slowed:.3f} slowed 3x, {even:.3f} not")
    assert slowed < 0.2 < even


def test_async_members_go_on_with_a_coordinator_started_anew(tmp_path, procs):
    """The coordinator is killed mid-run and a new one starts on the same port: the members
    regroup with it, which numbers on from their replica and hands out only what is left of
    the budget; every worker ends with the same parameters, the budget spent once."""
    port = free_port()
    argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "coordinator", "--port",
            str(port), "--host", "127.0.0.1"]
    coord = procs.start("coordinator", argv)
    addr, out = f"127.0.0.1:{port}", tmp_path / "run"
    over = ["workers=3", "steps=600", "algorithm.sync_every=10", "eval_every=100000", *ASYNC]
    ws = {i: procs.worker(i, addr, out, over) for i in range(3)}
    wait_until(lambda: min(len(metrics(out / f"w{i}")) for i in range(3)) >= 3, 90,
               "three updates of every worker")
    coord.send_signal(signal.SIGKILL)
    coord.wait()
    before = max(r["seq"] for i in range(3) for r in metrics(out / f"w{i}") if not r["dropped"])
    time.sleep(1.0)
    procs.start("coordinator2", argv)
    assert all(ws[i].wait(timeout=180) == 0 for i in range(3))
    runs = [json.loads((out / f"w{i}" / "summary.json").read_text()) for i in range(3)]
    assert len({r["final_hash"] for r in runs}) == 1
    assert all(r["aborted_attempts"] >= 1 for r in runs)  # each regrouped
    rows = [r for i in range(3) for r in metrics(out / f"w{i}")]
    # the new coordinator numbered on: updates past the kill's were applied, every number
    # once; the steps trained cover the budget (updates lost to the kill are trained again)
    assert runs[0]["updates_applied"] == len({r["seq"] for r in rows if not r["dropped"]})
    assert runs[0]["updates_applied"] > before + 3
    assert sum(r["inner_steps"] for r in rows) >= 3 * 600


def test_an_async_run_resumed_from_its_checkpoints_ends_where_the_whole_run_does(tmp_path,
                                                                              procs,
                                                                              coordinator):
    """One worker (its updates' order is its own: the run is deterministic) with a checkpoint
    after every update: the run resumed from its fourth checkpoint under a new coordinator
    ends with the whole run's parameters, bit for bit, posting only the updates after it (the
    replica, the delayed Nesterov state, the inner optimizer and the budget spent are all in
    the checkpoint)."""
    over = ["workers=1", "steps=40", "algorithm.sync_every=5", "eval_every=100000", *ASYNC]
    full, part, ck = tmp_path / "full", tmp_path / "part", tmp_path / "ck"
    checkpointed_run(procs, coordinator, 1, full, ck, over)
    assert sorted(int(f.stem.split("-")[1]) for f in (ck / "w0").iterdir()) == list(range(1, 9))
    c2 = coordinator()
    w = procs.worker(0, f"127.0.0.1:{c2.port}", part, over,
                     ["--resume", str(ck / "w0" / "round-4.safetensors")])
    assert w.wait(timeout=90) == 0
    assert_final_equal(part / "w0", final_state(full / "w0"), "resumed")
    assert [r["seq"] for r in metrics(part / "w0")] == [4, 5, 6, 7]
    resumed = json.loads((part / "w0" / "summary.json").read_text())
    assert resumed["updates_applied"] == 8


def test_async_workers_resumed_from_unequal_checkpoints_go_on_from_the_newest(tmp_path, procs,
                                                                             coordinator):
    """Three workers resumed under a new coordinator, each from a checkpoint of its own at a
    different update: the members go on from the replica holding the most updates (the
    others receive it), the new coordinator hands out only what is left of the budget, and
    every worker ends with the same parameters."""
    over = ["workers=3", "steps=60", "algorithm.sync_every=5", "eval_every=100000", *ASYNC]
    full, part, ck = tmp_path / "full", tmp_path / "part", tmp_path / "ck"
    checkpointed_run(procs, coordinator, 3, full, ck, over, every=2)
    # each worker's second checkpoint (its 4th update): the replicas hold unequal counts
    picks = [sorted((ck / f"w{i}").iterdir(), key=lambda f: int(f.stem.split("-")[1]))[1]
             for i in range(3)]
    held = [int(f.stem.split("-")[1]) for f in picks]
    c2 = coordinator()
    ws = [procs.worker(i, f"127.0.0.1:{c2.port}", part, over, ["--resume", str(picks[i])])
          for i in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in ws)
    runs = [json.loads((part / f"w{i}" / "summary.json").read_text()) for i in range(3)]
    assert len({r["final_hash"] for r in runs}) == 1
    rows = [r for i in range(3) for r in metrics(part / f"w{i}")]
    numbered = sorted(r["seq"] for r in rows if not r["dropped"])
    assert numbered == list(range(max(held), max(held) + len(numbered)))  # on from the newest
    assert runs[0]["updates_applied"] == max(held) + len(numbered)
    behind = [i for i in range(3) if held[i] < max(held)]
    assert behind and all(runs[i]["state_transfers"] >= 1 for i in behind)
    # the budget: the inner steps in the newest replica, and those handed out since, once
    from islands.runtime.checkpoint import load

    spent = load(picks[held.index(max(held))])[1]["spent"]
    order = runs[0]["coordinator"]["async_posts"]
    assert spent + sum(p["steps"] for p in order) == 3 * 60
