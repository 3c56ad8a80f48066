"""The simulator's fault plan (``[[faults]]``): crashes, leaves, joins, slowdowns and link
changes at rounds or virtual times; asserted on state and membership, never on wall time."""

from __future__ import annotations

import json

import pytest
import torch

from islands.core.errors import ConfigError
from islands.sim.runner import Simulation
from tests.conftest import tiny_config


def _faults(*events: str) -> str:
    return "faults=[" + ", ".join("{" + e + "}" for e in events) + "]"


def _sim(*sets, workers=3):
    sim = Simulation(tiny_config(f"workers={workers}", "steps=20", "eval_every=100",
                                 "algorithm.name=diloco", "algorithm.sync_every=4", *sets))
    return sim, sim.run()


def _live_states_agree(sim) -> bool:
    states = [sim.shared_states[i] for i in sim.live]
    return all(torch.equal(states[0][k], other[k]) for other in states[1:] for k in states[0])


def test_a_crash_commits_the_round_without_the_worker_as_a_leave_does():
    """A crash trains the round and dies before its sync, a leave does not train it: either
    way the round commits without the worker, so the global states are equal; only the
    crashed worker's compute differs."""
    crash, c = _sim(_faults('kind = "crash", worker = 2, round = 1'))
    leave, l_ = _sim(_faults('kind = "leave", worker = 2, round = 1'))
    assert torch.equal(crash.final_params, leave.final_params)
    assert c["epochs"] == l_["epochs"] == [
        {"epoch": 1, "members": [0, 1, 2], "from_round": 0},
        {"epoch": 2, "members": [0, 1], "from_round": 1}]
    assert c["compute_s_by_worker"][2] == pytest.approx(2 * l_["compute_s_by_worker"][2])
    nothing, _ = _sim()
    assert not torch.equal(crash.final_params, nothing.final_params)
    assert crash.live == [0, 1] and _live_states_agree(crash)


def test_a_joiner_gets_the_committed_state_and_rows_from_its_round(tmp_path):
    sim = Simulation(tiny_config("workers=4", "steps=20", "eval_every=100",
                                 "algorithm.name=diloco", "algorithm.sync_every=4",
                                 _faults('kind = "join", worker = 3, round = 2')),
                     out_dir=tmp_path / "run")
    s = sim.run()
    assert s["epochs"] == [{"epoch": 1, "members": [0, 1, 2], "from_round": 0},
                           {"epoch": 2, "members": [0, 1, 2, 3], "from_round": 2}]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert sorted(r["round"] for r in rows if r["worker"] == 3) == [2, 3, 4]
    assert sorted(r["round"] for r in rows if r["worker"] == 0) == [0, 1, 2, 3, 4]
    state_bytes = sum(t.numel() * t.element_size() for t in sim.shared_states[0].values())
    assert s["bytes_sent_by_worker"][0] > s["bytes_sent_by_worker"][1] + state_bytes - 1000
    assert sim.live == [0, 1, 2, 3] and _live_states_agree(sim)
    assert sim.workers[3].steps == sim.workers[0].steps == 20


def test_a_crashed_worker_that_rejoins_holds_the_shared_state_again():
    sim, s = _sim(_faults('kind = "crash", worker = 1, round = 1',
                          'kind = "join", worker = 1, round = 3'))
    assert [e["members"] for e in s["epochs"]] == [[0, 1, 2], [0, 2], [0, 1, 2]]
    assert [e["from_round"] for e in s["epochs"]] == [0, 1, 3]
    assert _live_states_agree(sim)


def test_a_slowdown_and_a_link_change_take_effect_from_their_round_or_time():
    _, base = _sim("compute.step_time_s=0.1")
    _, slow = _sim("compute.step_time_s=0.1",
                   _faults('kind = "slow", worker = 0, round = 2, factor = 3.0'))
    # rounds 2-4 (12 steps) at 0.3 s instead of 0.1 s on worker 0 alone
    assert slow["compute_s_by_worker"][0] == pytest.approx(base["compute_s_by_worker"][0] + 2.4)
    assert slow["compute_s_by_worker"][1] == pytest.approx(base["compute_s_by_worker"][1])
    assert slow["virtual_time_s"] == pytest.approx(base["virtual_time_s"] + 2.4)
    assert slow["final_eval_loss"] == base["final_eval_loss"]  # time, not math
    _, link = _sim("compute.step_time_s=0.1",
                   _faults('kind = "link", worker = 1, at_s = 1.0, upload_bps = 1e5'))
    assert link["virtual_time_s"] > base["virtual_time_s"] + 10
    assert link["final_eval_loss"] == base["final_eval_loss"]


@pytest.mark.parametrize("event, key", [
    ('kind = "crash", worker = 5, round = 1', "faults\\[0\\].worker"),
    ('kind = "boom", worker = 1, round = 1', "faults\\[0\\].kind"),
    ('kind = "slow", worker = 1, round = 1', "faults\\[0\\].factor"),
    ('kind = "crash", worker = 1', "faults\\[0\\].round"),
    ('kind = "crash", worker = 1, round = 1, at_s = 2.0', "faults\\[0\\].round"),
    ('kind = "link", worker = 1, round = 1', "faults\\[0\\].upload_bps"),
    ('kind = "leave", worker = 1, round = 1, latency_s = 0.1', "faults\\[0\\].kind"),
])
def test_a_bad_fault_names_its_entry_and_key(event, key):
    with pytest.raises(ConfigError, match=key):
        tiny_config("workers=3", _faults(event))


def test_a_plan_that_leaves_nobody_is_refused():
    with pytest.raises(ConfigError, match="no worker"):
        _sim(_faults(*(f'kind = "leave", worker = {i}, round = 2' for i in range(3))))


OVERLAPPED = {"delayed": ["algorithm.overlap=delayed"],
              "eager": ["algorithm.overlap=eager"],
              "streaming": ["algorithm.name=streaming_diloco", "algorithm.fragments=2",
                            "algorithm.tau=1"]}


@pytest.mark.parametrize("name", sorted(OVERLAPPED))
def test_an_overlapped_run_commits_a_crashed_round_without_the_worker_as_a_leave_does(name):
    """The crashed worker's round is lost; its previous round, committed and still in flight
    when it dies, lands in every survivor: a crash at round 2 ends where a leave at round 2
    does, not where a leave at round 1 (whose round-1 contribution never existed) does."""
    sets = [*OVERLAPPED[name], "compute.step_time_s=0.1"]
    crash, c = _sim(*sets, _faults('kind = "crash", worker = 2, round = 2'))
    leave, _ = _sim(*sets, _faults('kind = "leave", worker = 2, round = 2'))
    earlier, _ = _sim(*sets, _faults('kind = "leave", worker = 2, round = 1'))
    assert torch.equal(crash.final_params, leave.final_params)
    assert not torch.equal(crash.final_params, earlier.final_params)
    assert [e["members"] for e in c["epochs"]] == [[0, 1, 2], [0, 1]]
    assert crash.live == [0, 1] and _live_states_agree(crash)


@pytest.mark.parametrize("name", sorted(OVERLAPPED))
def test_an_overlapped_joiner_applies_the_sync_in_flight_and_holds_everyone_s_state(name):
    """A joiner takes the committed state, which the sync in flight (issued the round
    before) does not include yet: it applies that sync's result when it lands, as the
    others do, so every replica ends identical; so does a crashed worker back."""
    sets = [*OVERLAPPED[name], "compute.step_time_s=0.1"]
    sim, s = _sim(*sets, _faults('kind = "join", worker = 2, round = 2'))
    assert [e["members"] for e in s["epochs"]] == [[0, 1], [0, 1, 2]]
    assert sim.live == [0, 1, 2] and _live_states_agree(sim)
    sim, s = _sim(*sets, _faults('kind = "crash", worker = 1, round = 1',
                                 'kind = "join", worker = 1, round = 3'))
    assert [e["members"] for e in s["epochs"]] == [[0, 1, 2], [0, 2], [0, 1, 2]]
    assert sim.live == [0, 1, 2] and _live_states_agree(sim)


@pytest.mark.parametrize("name", sorted(OVERLAPPED))
def test_a_slowdown_in_an_overlapped_run_moves_its_times_not_its_math(name):
    sets = [*OVERLAPPED[name], "compute.step_time_s=0.1"]
    _, base = _sim(*sets)
    _, slow = _sim(*sets, _faults('kind = "slow", worker = 0, round = 2, factor = 3.0'))
    assert slow["final_eval_loss"] == base["final_eval_loss"]
    # from round 2 on (streaming's rounds are H / fragments = 2 steps) at 0.3 s, not 0.1 s
    extra = 0.2 * (20 - 2 * (2 if name == "streaming" else 4))
    assert slow["compute_s_by_worker"][0] == pytest.approx(base["compute_s_by_worker"][0] + extra)
    assert slow["virtual_time_s"] > base["virtual_time_s"] + extra - 0.5  # the others wait
    assert slow["idle_s_by_worker"][1] > base["idle_s_by_worker"][1] + extra / 2


# --- the straggler policy: a minimum quorum and a grace window --------------------------

STRAGGLER = ["workers=4", "compute.step_time_s=0.1", "compute.worker=[{id = 3, step_time_s = 0.3}]"]


def test_a_quorum_leaves_a_3x_straggler_out_and_it_catches_up(tmp_path):
    _, wait = _sim(*STRAGGLER, workers=4)
    sim = Simulation(tiny_config("steps=20", "eval_every=100", "algorithm.name=diloco",
                                 "algorithm.sync_every=4", *STRAGGLER,
                                 "algorithm.min_quorum=3"), out_dir=tmp_path / "q")
    s = sim.run()
    assert s["virtual_time_s"] < wait["virtual_time_s"] / 2
    rows = [json.loads(line) for line in (tmp_path / "q" / "metrics.jsonl").open()]
    assert not [r for r in rows if r["worker"] == 3]  # never in time: never committed
    assert all(r["left_out"] == [3] for r in rows)
    # it abandons each round when the others commit: its compute stops there
    assert s["compute_s_by_worker"][3] < wait["compute_s_by_worker"][3] / 2
    assert _live_states_agree(sim)  # it holds the committed state after every round


def test_a_grace_window_that_covers_the_straggler_waits_for_it():
    plain, p = _sim(*STRAGGLER, workers=4)
    graced, g = _sim(*STRAGGLER, "algorithm.min_quorum=3", "algorithm.grace_s=1.0", workers=4)
    assert torch.equal(graced.final_params, plain.final_params)
    assert g["virtual_time_s"] == p["virtual_time_s"]


def test_the_fault_plan_is_refused_by_the_runtime_and_the_quorum_is_not():
    from islands.runtime.member import refuse_simulator_only

    refuse_simulator_only(tiny_config("algorithm.min_quorum=2"))  # the coordinator's rule
    with pytest.raises(ConfigError, match="faults"):
        refuse_simulator_only(tiny_config("workers=3",
                                          _faults('kind = "leave", worker = 1, round = 2')))
    with pytest.raises(ConfigError, match="algorithm.min_quorum"):
        tiny_config("algorithm.min_quorum=2", "algorithm.overlap=delayed")


def test_a_warm_start_ignores_the_runs_per_worker_settings():
    """The warm start trains one worker alone; a straggler, a link and a fault naming worker 2
    of the run must not refuse it (they did: 'compute.worker[0].id (2) must name a worker in
    [0, 0]')."""
    _, s = _sim("init.warm_start_steps=2", "compute.worker=[{id = 2, step_time_s = 0.3}]",
                "network.worker=[{id = 2, upload_bps = 1e6}]",
                _faults('kind = "leave", worker = 2, round = 3'))
    assert s["epochs"][-1]["members"] == [0, 1]


def test_a_crash_in_virtual_time_hits_the_round_in_progress_and_a_rejoin_follows_it():
    """Rounds of 4 steps at 0.1 s: a crash at 0.2 s hits round 0 (in progress), a join at
    0.3 s takes effect at round 1 (the first starting after it, the crash being over)."""
    _, s = _sim("compute.step_time_s=0.1",
                _faults('kind = "crash", worker = 1, at_s = 0.2',
                        'kind = "join", worker = 1, at_s = 0.3'))
    assert [(e["from_round"], e["members"]) for e in s["epochs"]] == [
        (0, [0, 2]), (1, [0, 1, 2])]


# --- the asynchronous loop's fault plan (no rounds: events at virtual times) ------------

ASYNC = ["algorithm.name=async_local_sgd", "algorithm.sync_every=4",
         "algorithm.dynamic_steps=false", "compute.step_time_s=0.1",
         "network.bandwidth_bps=1e15", "network.latency_s=0.0"]  # updates of 0.4 s each


def _async(*events: str, workers: int = 3):
    sim = Simulation(tiny_config(f"workers={workers}", "steps=20", "eval_every=100", *ASYNC,
                                 *([_faults(*events)] if events else [])))
    return sim, sim.run()


def test_an_async_crash_loses_the_update_in_progress_and_the_others_spend_its_steps():
    """Updates of 0.4 s: a crash at 1.0 s hits worker 2's third (0.8-1.2 s), never posted;
    the others spend the run's 60 inner steps without it."""
    crash, c = _async('kind = "crash", worker = 2, at_s = 1.0')
    assert c["inner_steps_by_worker"][2] == 8
    assert sum(c["inner_steps_by_worker"]) == 3 * 20
    assert c["compute_s_by_worker"][2] == pytest.approx(1.0)  # it computed until its crash
    assert c["epochs"] == [{"epoch": 1, "members": [0, 1, 2], "from_update": 0, "at_s": 0.0},
                           {"epoch": 2, "members": [0, 1], "from_update": 6, "at_s": 1.0}]
    assert crash.live == [0, 1] and _live_states_agree(crash)
    _, plain = _async()  # 5 updates posted without the crash, 2 with it
    assert c["bytes_sent_by_worker"][2] == plain["bytes_sent_by_worker"][2] * 2 // 5


def test_an_async_leave_posts_the_update_in_progress_then_is_gone():
    leave, s = _async('kind = "leave", worker = 2, at_s = 1.0')
    assert s["inner_steps_by_worker"][2] == 12  # its third update (0.8-1.2 s) was posted
    assert sum(s["inner_steps_by_worker"]) == 3 * 20
    # gone once it posted that update (the 9th: the three workers' third ones end alike)
    assert s["epochs"][-1] == {"epoch": 2, "members": [0, 1], "from_update": 9,
                               "at_s": pytest.approx(1.2)}
    assert leave.live == [0, 1] and _live_states_agree(leave)
    _, plain = _async()  # the posts of 1.6 s on go to the two left: a third fewer bytes
    assert s["bytes_sent_by_worker"][0] < plain["bytes_sent_by_worker"][0]


def test_an_async_slowdown_applies_from_the_next_update_that_starts_after_it():
    _, s = _async('kind = "slow", worker = 0, at_s = 1.0, factor = 2.0')
    steps = s["inner_steps_by_worker"]
    # three updates at 0.1 s a step (the third started at 0.8 s), the rest at 0.2 s
    assert s["compute_s_by_worker"][0] == pytest.approx(1.2 + 0.2 * (steps[0] - 12))
    _, plain = _async()
    assert sum(steps) == 3 * 20 and s["virtual_time_s"] > plain["virtual_time_s"] + 0.7


def test_an_async_joiner_takes_the_live_replica_and_its_share_of_the_steps_left():
    """Worker 2 is absent until 1.0 s: it downloads the global state (one way, counted),
    then trains and receives every post; the run's 60 inner steps are spent all the same,
    and every replica ends identical."""
    sim, s = _async('kind = "join", worker = 2, at_s = 1.0')
    assert [e["members"] for e in s["epochs"]] == [[0, 1], [0, 1, 2]]
    assert s["epochs"][1]["at_s"] == 1.0
    steps = s["inner_steps_by_worker"]
    assert 0 < steps[2] < steps[0] and sum(steps) == 3 * 20
    assert sim.live == [0, 1, 2] and _live_states_agree(sim)
    state = sum(t.numel() * t.element_size() for t in sim.shared_states[0].values())
    assert s["bytes_sent_by_worker"][0] - s["bytes_sent_by_worker"][1] >= state - 64
    # a crash, then the same worker back: the same replica as everyone's at the end
    sim, s = _async('kind = "crash", worker = 1, at_s = 0.5',
                    'kind = "join", worker = 1, at_s = 1.5')
    assert [e["members"] for e in s["epochs"]] == [[0, 1, 2], [0, 2], [0, 1, 2]]
    assert sim.live == [0, 1, 2] and _live_states_agree(sim)
    assert sum(s["inner_steps_by_worker"]) == 3 * 20


def test_an_async_partition_cuts_its_side_from_the_run_until_the_heal():
    """Workers 0 and 1 cut from the coordinator (with worker 2) from 0.5 s to 1.5 s: out of
    the run as if crashed at the cut (their updates in progress lost), back at the heal as
    joiners taking worker 2's replica (not each other's stale one); the same run as those
    crashes and joins written out, and every replica ends identical."""
    sim, s = _async('kind = "partition", workers = [0, 1], at_s = 0.5',
                    'kind = "heal", at_s = 1.5')
    assert [e["members"] for e in s["epochs"]] == [[0, 1, 2], [2], [0, 1, 2]]
    assert [e["at_s"] for e in s["epochs"]] == [0.0, 0.5, 1.5]
    assert sim.live == [0, 1, 2] and _live_states_agree(sim)
    assert sum(s["inner_steps_by_worker"]) == 3 * 20
    spelled, t = _async(*(f'kind = "crash", worker = {w}, at_s = 0.5' for w in (0, 1)),
                        *(f'kind = "join", worker = {w}, at_s = 1.5' for w in (0, 1)))
    assert torch.equal(sim.final_params, spelled.final_params)
    assert s["bytes_sent_by_worker"] == t["bytes_sent_by_worker"]
    assert [e["members"] for e in t["epochs"]] == [[0, 1, 2], [1, 2], [2], [0, 2], [0, 1, 2]]
    with pytest.raises(ConfigError, match="leaves no worker"):  # none on the coordinator's
        _async('kind = "crash", worker = 0, at_s = 0.3',
               'kind = "partition", workers = [1, 2], at_s = 0.5')


@pytest.mark.parametrize("event, match", [
    ('kind = "crash", worker = 1, round = 2', r"faults\[0\].round \(2\).*no rounds.*at_s"),
])
def test_an_async_plan_names_what_it_cannot_carry_out(event, match):
    with pytest.raises(ConfigError, match=match):
        _async(event)


def test_an_async_plan_that_leaves_nobody_is_refused():
    with pytest.raises(ConfigError, match="leaves no worker"):
        _async(*(f'kind = "crash", worker = {i}, at_s = 0.5' for i in range(3)))
