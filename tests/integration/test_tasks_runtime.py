"""A user's task by import path in the real runtime, and the drop-in loop: with nothing failing
both end with the simulator's global parameters; the drop-in survives a SIGKILL and restart."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch

from islands.core.config import load_config
from islands.sim.runner import Simulation
from tests.integration.conftest import (
    assert_final_equal,
    assert_per_worker_equal,
    free_port,
    last_round,
    metrics,
    wait_until,
)
from tests.integration.test_churn import assert_hashes_agree

USER = ["task.name='tests.user_task:make_task'", "data.batch_size=16", "device=cpu",
        "inner.lr=0.01", "eval_every=20"]


def _sim(overrides):
    """The simulator's run, with one thread as each worker process has: AdamW turns the
    last-bit differences of another reduction order into lr-sized ones."""
    sim, threads = Simulation(load_config(None, overrides)), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sim, sim.run()
    finally:
        torch.set_num_threads(threads)


def _assert_matches_sim(dirs, sim, summary, algo):
    for i, d in enumerate(dirs):
        assert_final_equal(d, sim.final_state, f"{algo} w{i}")  # buffers included
        got = json.loads((d / "summary.json").read_text())
        assert got["bytes_sent_total"] == summary["bytes_sent_by_worker"][i], algo


def test_launch_with_a_task_by_import_path_matches_the_simulator(tmp_path, procs):
    """ddp, local_sgd and diloco launched side by side (a relaxed heartbeat: 9 processes
    share 2 cores), each against the simulator."""
    launches = {}
    for algo in ("ddp", "local_sgd", "diloco"):
        overrides = [*USER, "workers=2", "steps=20", "algorithm.sync_every=5",
                     f"algorithm.name={algo}", "runtime.heartbeat_timeout_s=5.0"]
        argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "launch"]
        for o in overrides:
            argv += ["--set", o]
        p = procs.start(f"launch-{algo}", argv + ["--out", str(tmp_path / algo)])
        launches[algo] = (p, overrides)
    for algo, (p, overrides) in launches.items():
        sim, summary = _sim(overrides)  # while the workers run
        assert p.wait(timeout=120) == 0, algo
        merged = json.loads((tmp_path / algo / "summary.json").read_text())
        assert len(merged["final_hashes"]) == 1 and merged["task"] == "user_mlp"
        _assert_matches_sim([tmp_path / algo / f"w{i}" for i in range(2)], sim, summary, algo)
        # the same parameters up to float rounding: the same metrics up to a sample whose
        # prediction sits on the boundary
        assert merged["final_eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)
        assert merged["final_eval_accuracy"] == pytest.approx(summary["final_eval_accuracy"],
                                                              abs=1.01 / 120)
        assert (tmp_path / algo / "loss.png").stat().st_size > 10_000  # as islands sim's


def _dropin(procs, i, addr, out, overrides, extra=()):
    argv = [sys.executable, "tests/integration/dropin_worker.py", addr, str(i), str(out / f"w{i}"),
            *extra]
    for o in overrides:
        argv += ["--set", o]
    return procs.start(f"dropin{i}", argv)


# a recipe: a data-parallel phase, an H schedule, outer lr and momentum schedules
RECIPE = ["algorithm.name=diloco", "algorithm.ddp_steps=4",
          "algorithm.sync_every=[[0, 3], [10, 6]]", "outer.lr=[[0, 0.3], [2, 0.7]]",
          "outer.momentum=[[0, 0.0], [2, 0.9]]"]


def test_dropin_loop_with_two_processes_matches_the_simulator(tmp_path, procs, coordinator):
    """The user's loop under diloco, ddp and a DiLoCo recipe, side by side, each against the
    simulator."""
    runs = {}
    for algo, extra in (("diloco", []), ("ddp", ["algorithm.name=ddp"]), ("recipe", RECIPE)):
        overrides = [*USER, "workers=2", "steps=20", "algorithm.sync_every=5",
                     "algorithm.name=diloco", *extra, "runtime.heartbeat_timeout_s=5.0"]
        coord = coordinator(heartbeat_timeout_s=5.0)
        ws = [_dropin(procs, i, f"127.0.0.1:{coord.port}", tmp_path / algo, overrides)
              for i in range(2)]
        runs[algo] = (ws, overrides)
    for algo, (ws, overrides) in runs.items():
        sim, summary = _sim(overrides)
        assert all(p.wait(timeout=120) == 0 for p in ws), algo
        _assert_matches_sim([tmp_path / algo / f"w{i}" for i in range(2)], sim, summary, algo)
        rows = metrics(tmp_path / algo / "w0")
        assert [r["round"] for r in rows] == list(range(summary["rounds"]))
        assert all(r["hash_ok"] for r in rows)
        assert "eval_loss" in rows[-1] and "accuracy" in rows[-1]
        for p in ws:  # the others leaving as they finish is no abort
            assert "abort" not in procs.stderr(p), algo
        job = json.loads((tmp_path / algo / "summary.json").read_text())  # the job's, merged
        assert job["workers_merged"] == [0, 1] and len(job["final_hashes"]) == 1
        assert job["coordinator"]["rounds_committed"] == summary["rounds"]
        assert [e["members"] for e in job["coordinator"]["epochs"]] == [[0, 1]]
        assert_final_equal(tmp_path / algo, sim.final_state, f"{algo}: the job's")
        for d in (tmp_path / algo / "w0", tmp_path / algo / "w1", tmp_path / algo):
            assert (d / "loss.png").stat().st_size > 10_000, d


def test_a_dropin_gossip_job_ends_with_the_simulator_s_per_worker_parameters(tmp_path, procs,
                                                                          coordinator):
    """The user's loop under gossip DiLoCo on a ring of 4: each worker ends with the
    simulator's worker's own parameters, the coordinator held no barrier after the start,
    and the job estimates the consensus distance the simulator computes."""
    overrides = [*USER, "workers=4", "steps=20", "eval_every=5", "algorithm.name=gossip_diloco",
                 "algorithm.sync_every=5", "topology.name=ring",
                 "runtime.heartbeat_timeout_s=5.0"]
    coord = coordinator(heartbeat_timeout_s=5.0)
    ws = [_dropin(procs, i, f"127.0.0.1:{coord.port}", tmp_path, overrides) for i in range(4)]
    sim, summary = _sim(overrides)
    assert all(p.wait(timeout=120) == 0 for p in ws)
    job = assert_per_worker_equal(tmp_path, sim, summary)
    assert len(job["final_hashes"]) == 4 and job["coordinator"]["rounds_committed"] == 0
    assert_final_equal(tmp_path, sim.final_state, "the workers' average")


@pytest.mark.parametrize("policy", [["runtime.round_deadline_s=0.5"],
                                    ["algorithm.min_quorum=2", "algorithm.grace_s=0.5"]],
                         ids=["deadline", "quorum"])
def test_a_dropin_worker_stuck_in_its_step_past_the_deadline_is_left_out(tmp_path, procs,
                                                                         coordinator, policy):
    """3 drop-in workers with runtime.round_deadline_s = 0.5, or the straggler policy (a
    quorum of 2 and a grace window of 0.5 s), set on the workers only (a coordinator started
    without a config adopts it); worker 2 sleeps 3 s inside a step of round 2 while its
    heartbeat goes on: the others commit round 2 without it and go on, and it catches up from
    the committed state; the job ends with one final state."""
    overrides = [*USER, "workers=3", "steps=300", "algorithm.sync_every=5",
                 "algorithm.name=diloco", "eval_every=100", *policy,
                 "runtime.heartbeat_timeout_s=10.0"]
    coord = coordinator(adopt_settings=True)
    addr, out = f"127.0.0.1:{coord.port}", tmp_path / "stuck"
    ws = [_dropin(procs, i, addr, out, overrides,
                  ["--step-s", "0.02", *(["--stall", "2:3"] if i == 2 else [])])
          for i in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in ws)
    # the workers' setting, not silently ignored
    assert (coord.deadline_s, coord.min_quorum) == ((0.5, 0) if "deadline" in policy[0]
                                                    else (None, 2))
    round2 = next(r for r in metrics(out / "w0") if r["round"] == 2)
    assert 2 not in round2["participants"] and 2 in round2["left_out"]
    stuck = json.loads((out / "w2" / "summary.json").read_text())
    assert stuck["excluded_rounds"] >= 1 and stuck["state_transfers"] >= 1
    assert stuck["last_round"] == 59
    job = json.loads((out / "summary.json").read_text())
    assert job["workers_merged"] == [0, 1, 2] and len(job["final_hashes"]) == 1


def test_dropin_survives_a_sigkill_and_restart(tmp_path, procs, coordinator):
    """3 processes of the user's loop; one is SIGKILLed mid-run and restarted: the run
    finishes, every round's hashes agree, and the final eval loss is within 2% of the same
    run without the kill (the simulator's, which the drop-in equals when nothing fails)."""
    # enough data that no worker's share is missed for long
    overrides = [*USER, "workers=3", "steps=600", "algorithm.sync_every=10",
                 "algorithm.name=diloco", "eval_every=100", "data.batch_size=64",
                 "task.kwargs={samples = 20000, hidden = 256}"]
    # a relaxed heartbeat (a test beside it may load both cores): the kill closes the
    # worker's connection, which the coordinator sees at once
    coord = coordinator(heartbeat_timeout_s=5.0)
    addr = f"127.0.0.1:{coord.port}"
    out = tmp_path / "kill"
    # the job waits inside round 6 until the restart is back: a restart (process start,
    # imports) takes seconds on a loaded machine, and the survivors must not end the job first
    go = tmp_path / "go"
    ws = {i: _dropin(procs, i, addr, out, overrides, ["--hold", f"6:{go}"]) for i in range(3)}
    wait_until(lambda: last_round(out / "w2") >= 5, 90, "round 5")
    ws[2].send_signal(signal.SIGKILL)
    assert ws[2].wait() == -signal.SIGKILL, "the job ended before the kill"
    (out / "w2").rename(out / "w2-killed")
    wait_until(lambda: 2 not in coord.status()["live"], 30, "the coordinator to drop worker 2")
    ws[2] = _dropin(procs, 2, addr, out, overrides)
    wait_until(lambda: 2 in coord.status()["live"], 90, "the restarted worker to connect")
    go.touch()
    wait_until(lambda: last_round(out / "w2") >= 0, 60, "the restarted worker's commit")
    first = metrics(out / "w2")[0]
    print(f"restarted worker committed round {first['round']} "
          f"({'healed' if first['observer'] else 'at a boundary'})")
    assert all(p.wait(timeout=120) == 0 for p in ws.values())
    # the reference afterwards: run while the workers did, it kept them from the cores and
    # the whole job could end before the kill
    _, calm = _sim(overrides)
    runs = [json.loads((out / f"w{i}" / "summary.json").read_text()) for i in range(3)]
    assert_hashes_agree([out / f"w{i}" for i in range(3)] + [out / "w2-killed"])
    assert len({s["final_hash"] for s in runs}) == 1
    for i in (0, 1):  # the survivors committed every round, in order
        assert [r["round"] for r in metrics(out / f"w{i}")] == list(range(60))
    kill = runs[0]["final_eval_loss"]
    print(f"final eval loss: {calm['final_eval_loss']:.4f} without the kill, {kill:.4f} with it")
    assert abs(kill / calm["final_eval_loss"] - 1) < 0.02
    assert runs[2]["state_transfers"] >= 1 and runs[2]["last_round"] == 59
    assert runs[2]["rounds_committed"] == 60 - first["round"]  # the rounds it took part in


def test_the_dropin_digits_example_runs_under_torchrun(tmp_path, procs):
    """examples/dropin_digits.py as a user runs it: two ranks, one shared state at the end."""
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "dropin_digits.py"
    argv = [sys.prefix + "/bin/torchrun", "--nproc-per-node", "2", "--master-port",
            str(free_port()), str(example), "--steps", "50"]
    p = procs.start("torchrun", argv, cwd=tmp_path)
    assert p.wait(timeout=120) == 0
    job = tmp_path / "runs" / "dropin_digits-job"
    runs = [json.loads((job / f"w{i}" / "summary.json").read_text()) for i in range(2)]
    assert json.loads((job / "summary.json").read_text())["workers_merged"] == [0, 1]
    assert runs[0]["final_hash"] == runs[1]["final_hash"] and runs[0]["rounds_committed"] == 2
    assert runs[0]["final_eval_accuracy"] > 0.5


def test_a_fault_plan_gives_the_simulators_memberships_with_real_processes(tmp_path, procs,
                                                                         coordinator):
    """One ``[[faults]]`` plan (worker 2 crashes in round 4, a fresh worker 2 joins in round
    8, worker 1 leaves in round 10), run by the simulator and carried out on three drop-in processes
    (``tests/integration/fault_plan.py``): the same committed memberships from the same
    rounds, and final losses within 2% (the real joiner observes its first round with weight
    0, the simulator's trains it)."""
    from tests.integration.fault_plan import carry_out, hold_args

    overrides = [*USER, "workers=3", "steps=120", "algorithm.sync_every=10",
                 "algorithm.name=diloco", "eval_every=40", "data.batch_size=64",
                 "task.kwargs={samples = 20000, hidden = 256}"]
    plan = ['{kind = "crash", worker = 2, round = 4}', '{kind = "join", worker = 2, round = 8}',
            '{kind = "leave", worker = 1, round = 10}']
    _, sim = _sim([*overrides, f"faults=[{', '.join(plan)}]"])
    faults = load_config(None, [f"faults=[{', '.join(plan)}]"]).faults
    coord = coordinator(heartbeat_timeout_s=5.0)
    addr, out = f"127.0.0.1:{coord.port}", tmp_path / "plan"
    holds = hold_args(faults, tmp_path)
    ws = {i: _dropin(procs, i, addr, out, overrides, holds) for i in range(3)}
    carry_out(faults, coord, out, ws, lambda i: _dropin(procs, i, addr, out, overrides),
              tmp_path)
    assert all(p.wait(timeout=120) == 0 for p in ws.values())
    real = [{"members": e["members"], "from_round": e["from_round"]}
            for e in coord.job_view()["epochs"]]
    assert real == [{"members": e["members"], "from_round": e["from_round"]}
                    for e in sim["epochs"]]
    assert real == [{"members": [0, 1, 2], "from_round": 0},
                    {"members": [0, 1], "from_round": 4},
                    {"members": [0, 1, 2], "from_round": 8},
                    {"members": [0, 2], "from_round": 10}]
    job = json.loads((out / "summary.json").read_text())
    print(f"final eval loss: simulator {sim['final_eval_loss']:.4f}, real "
          f"{job['final_eval_loss']:.4f}")
    assert abs(job["final_eval_loss"] / sim["final_eval_loss"] - 1) < 0.02
    assert_hashes_agree([out / f"w{i}" for i in range(3)])
