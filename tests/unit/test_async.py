"""Asynchronous local SGD (``algorithm.name = "async_local_sgd"``) in the simulator: delayed
Nesterov, one-way posts on the timeline clock, staleness, dynamic local steps."""

from __future__ import annotations

import json

import pytest
import torch

from islands import load_config
from islands.algorithms.asynchronous import DelayedNesterov
from islands.core.errors import ConfigError
from islands.engine import check_config
from islands.runtime.join import join
from islands.runtime.member import refuse_simulator_only
from islands.runtime.state import digest
from islands.sim.runner import Simulation
from islands.transports.sim import NetworkModel, VirtualClock
from tests.conftest import tiny_config

ASYNC = ("workers=3", "steps=16", "eval_every=8", "algorithm.name=async_local_sgd",
         "algorithm.sync_every=4", "outer.lr=0.5", "outer.momentum=0.3")


def _sim(*sets):
    sim = Simulation(tiny_config(*ASYNC, *sets))
    return sim, sim.run()


def _step(opt, p, g):
    p.grad = g.clone()
    opt.step()


def _pair(seed: int, lr: float, momentum: float, every: int):
    """Six random gradients, and DelayedNesterov beside torch's Nesterov SGD, from zeros."""
    torch.manual_seed(seed)
    grads = [torch.randn(5) for _ in range(6)]
    a, b = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    return (grads, a, b, DelayedNesterov([a], lr=lr, momentum=momentum, every=every),
            torch.optim.SGD([b], lr=lr, momentum=momentum, nesterov=True))


def test_delayed_nesterov_every_step_is_torchs_nesterov_sgd():
    grads, a, b, mine, theirs = _pair(0, 0.7, 0.9, every=1)
    for g in grads:
        _step(mine, a, g)
        _step(theirs, b, g)
    torch.testing.assert_close(a.detach(), b.detach())


def test_delayed_nesterov_window_is_one_nesterov_step_on_the_mean():
    grads, a, b, delayed, sync = _pair(1, 0.5, 0.8, every=3)
    for window in (grads[:3], grads[3:]):
        for g in window:
            _step(delayed, a, g)
        _step(sync, b, torch.stack(window).mean(0))
        torch.testing.assert_close(a.detach(), b.detach())
    # between momentum steps only the plain part lands
    before = a.detach().clone()
    _step(delayed, a, grads[0])
    torch.testing.assert_close(a.detach(), before - 0.5 * grads[0] / 3)


def test_a_post_is_hidden_from_its_sender_and_waited_for_by_a_receiver_that_needs_it():
    clock = VirtualClock(3)
    net = NetworkModel(bandwidth_bps=8e6, latency_s=0.5)  # 1 MB/s, 0.5 s one way
    clock.compute(0, 1.0)
    clock.compute(1, 1.2)
    clock.compute(2, 5.0)
    clock.post(0, 2_000_000, {1: 1_000_000, 2: 1_000_000}, net)  # 2 s up, from 1.0
    assert clock.now == [1.0, 1.2, 5.0] and clock.up_free[0] == 3.0
    assert clock.arrives[1] == clock.arrives[2] == 3.5
    clock.await_posts(1)  # needs it at 1.2: waits 2.3 s, its 1 s download all exposed
    clock.await_posts(2)  # at 5.0 it is there: nothing waited, its download hidden
    assert clock.now == [1.0, 3.5, 5.0]
    assert clock.comm_s == [0.0, pytest.approx(2.3), 0.0]
    assert clock.hidden_s == [2.0, 0.0, 1.0]
    clock.post(0, 1_000_000, {1: 1_000_000}, net)  # its upload is busy until 3.0
    assert clock.up_free[0] == 4.0 and clock.arrives[1] == 4.5


def test_replicas_stay_identical_and_the_budget_is_spent_exactly():
    sim, s = _sim()
    assert len({digest(state) for state in sim.shared_states}) == 1
    assert sum(s["inner_steps_by_worker"]) == 3 * 16
    assert s["async_updates"] + s["async_dropped_updates"] == s["rounds"]
    # equal speeds: the first three posts are 0, 1 and 2 updates stale, then each is 2
    assert s["staleness_max"] == 2
    assert [p["step"] for p in s["eval_curve"]] == [0, 8, 16]
    assert s["final_eval_loss"] < s["eval_curve"][0]["eval_loss"]
    # each post goes to the two others: header plus payload, twice
    assert s["peak_round_bytes_sent"] == s["bytes_sent_per_worker"] / (s["rounds"] / 3)
    again = _sim()[1]
    assert again["final_eval_loss"] == s["final_eval_loss"]  # a function of the config
    assert again["virtual_time_s"] == s["virtual_time_s"]


def test_a_slow_worker_takes_fewer_steps_per_update_and_nobody_waits_for_it():
    slow = "compute.worker=[{id = 2, step_time_s = 0.3}]"
    s = _sim(slow)[1]
    steps = s["inner_steps_by_worker"]
    assert steps[2] < steps[0] and steps[2] < steps[1]
    sync = Simulation(tiny_config(*ASYNC, slow, "algorithm.name=diloco")).run()
    assert s["virtual_time_s"] < sync["virtual_time_s"]
    fixed = _sim(slow, "algorithm.dynamic_steps=false")[1]
    assert fixed["inner_steps_by_worker"][2] == 4 * (fixed["inner_steps_by_worker"][2] // 4)


def test_an_update_staler_than_max_staleness_is_dropped_unsent():
    s = _sim("algorithm.max_staleness=0")[1]
    assert s["async_dropped_updates"] > 0 and s["staleness_max"] == 0
    kept = _sim("algorithm.max_staleness=2")[1]
    per_update = kept["bytes_sent_total"] / kept["async_updates"]
    assert s["bytes_sent_total"] == per_update * s["async_updates"]


@pytest.mark.parametrize("sets, key", [
    (["outer.optimizer=adam", "outer.momentum=0.9", "outer.nesterov=true"],
     "outer.optimizer"),
    (["outer.nesterov=false"], "outer.nesterov"),
    (["outer.lr=[[0, 0.1], [4, 0.5]]"], "outer.lr"),
    (["algorithm.sync_every=[[0, 2], [8, 4]]"], "algorithm.sync_every"),
    (["algorithm.max_staleness=-1"], "algorithm.max_staleness"),
    (['faults=[{kind = "crash", worker = 1, round = 2}]'], "faults[0].round"),
])
def test_async_settings_are_checked(sets, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        check_config(tiny_config(*ASYNC, *sets))


def test_real_processes_take_async_local_sgd_and_the_drop_in_refuses_it(tmp_path):
    refuse_simulator_only(load_config(None, ["algorithm.name=async_local_sgd"]))
    with pytest.raises(ConfigError, match="async_local_sgd.*no rounds for the drop-in"):
        join("127.0.0.1:1", overrides=["algorithm.name=async_local_sgd"], worker_id=0,
             token="t", out=tmp_path / "w0")


def test_the_simulator_replays_a_given_order_of_updates_bit_for_bit(tmp_path):
    """The order a run's metrics rows record (worker and inner steps of each update),
    given back as ``post_order``, gives the same parameters; another order does not."""
    sim = Simulation(tiny_config(*ASYNC, "algorithm.max_staleness=1"), out_dir=tmp_path / "a")
    summary = sim.run()
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    order = [{"worker": r["worker"], "steps": r["inner_steps"]} for r in rows]
    assert len({o["worker"] for o in order}) == 3 and summary["async_dropped_updates"] > 0
    again = Simulation(tiny_config(*ASYNC, "algorithm.max_staleness=1"), post_order=order)
    assert again.run()["async_dropped_updates"] == summary["async_dropped_updates"]
    assert all(torch.equal(v, again.final_state[k]) for k, v in sim.final_state.items())
    swapped = [order[1], order[0], *order[2:]]
    assert order[0]["worker"] != order[1]["worker"]
    other = Simulation(tiny_config(*ASYNC, "algorithm.max_staleness=1"), post_order=swapped)
    other.run()
    assert not all(torch.equal(v, other.final_state[k]) for k, v in sim.final_state.items())
    with pytest.raises(ConfigError, match="post_order replays an asynchronous run"):
        Simulation(tiny_config(), post_order=order)
