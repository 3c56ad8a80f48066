"""Recipes as config: an H schedule, outer lr and momentum schedules, a data-parallel phase
before DiLoCo; each changes what it says and nothing when off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from islands.algorithms import build_algorithm
from islands.algorithms.schedule import h_at, round_bounds, value_at
from islands.core.errors import ConfigError, IslandsWarning
from islands.engine import attach, build_worker
from islands.metrics.compare import describe_h
from islands.runtime.member import Member
from islands.sim.runner import Simulation
from tests.conftest import tiny_config

SCHEDULE = "algorithm.sync_every=[[0, 4], [10, 6], [20, 10]]"


def run(*overrides: str) -> tuple[Simulation, dict]:
    sim = Simulation(tiny_config(*overrides))
    return sim, sim.run()


def test_h_schedule_rounds_follow_it():
    # H = 4 from step 0, 6 from 10, 10 from 20: a round starting at 8 still lasts 4 (the
    # change point 10 inside it waits for the next round), the last is cut at steps.
    assert round_bounds(30, ((0, 4), (10, 6), (20, 10)), lambda s: False) == \
        [0, 4, 8, 12, 18, 24, 30]
    assert [h_at(((0, 4), (10, 6)), s) for s in (0, 9, 10, 99)] == [4, 4, 6, 6]
    assert round_bounds(10, 4, lambda s: False) == [0, 4, 8, 10]  # the plain int, as before
    assert round_bounds(5, 4, lambda s: s < 2) == [0, 1, 2, 5]  # two gradient steps first


def test_h_schedule_in_a_run_summary_rows_and_evaluations(tmp_path):
    _, s = run("workers=2", "steps=30", "eval_every=10", SCHEDULE)
    assert s["rounds"] == 6 and s["sync_every"] == [[0, 4], [10, 6], [20, 10]]
    assert [p["step"] for p in s["train_curve"]] == [4, 8, 12, 18, 24, 30]
    assert [p["step"] for p in s["eval_curve"]] == [0, 12, 24, 30]  # rounds crossing 10, 20
    one_round = s["bytes_sent_per_worker"] / 6  # every round sends the same vector
    _, plain = run("workers=2", "steps=30", "eval_every=10", "algorithm.sync_every=4")
    assert plain["rounds"] == 8 and plain["bytes_sent_per_worker"] == 8 * one_round
    assert describe_h(s["sync_every"]) == "4,6@10,10@20"


def test_a_one_pair_schedule_is_the_plain_h_exactly():
    a, sa = run("workers=2", "steps=12", "eval_every=100", "algorithm.sync_every=[[0, 4]]")
    b, sb = run("workers=2", "steps=12", "eval_every=100", "algorithm.sync_every=4")
    assert torch.equal(a.final_params, b.final_params)
    assert sa["sync_every"] == [[0, 4]] and sb["sync_every"] == 4
    c, _ = run("workers=2", "steps=12", "eval_every=100", "algorithm.sync_every=[[0, 4], [4, 2]]")
    assert not torch.equal(a.final_params, c.final_params)  # ... and a second pair counts


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_fast_forward_follows_the_round_boundaries():
    sim = Simulation(tiny_config("workers=1", "steps=30", SCHEDULE))
    engine = sim.build()
    worker = sim.workers[0]
    member = SimpleNamespace(worker=worker, engine=engine, cfg=sim.cfg)
    Member.fast_forward(member, 4)  # round 4 starts at step 18 (not 4 * H)
    assert worker.steps == 18 == engine.start_of(4)
    Member.fast_forward(member, 99)
    assert worker.steps == 30


def test_data_parallel_phase_is_ddp_step_for_step():
    """With a constant inner lr, the phase's last evaluation equals DDP's run of that length
    (the same parameters after the same steps), and its bytes are DDP's."""
    common = ["workers=3", "inner.schedule=constant", "eval_every=6"]
    _, ddp = run(*common, "steps=6", "algorithm.name=ddp")
    sim, s = run(*common, "steps=14", "algorithm.ddp_steps=6", "algorithm.sync_every=4")
    at6 = next(p for p in s["eval_curve"] if p["step"] == 6)
    assert at6["eval_loss"] == ddp["final_eval_loss"]
    assert at6["bytes_sent_per_worker"] == ddp["bytes_sent_per_worker"]
    assert at6["virtual_time_s"] == ddp["virtual_time_s"]
    assert s["rounds"] == 6 + 2 and s["ddp_steps"] == 6
    # every message is one model-sized vector: 8 syncs of the same size
    assert s["bytes_sent_per_worker"] == 8 / 6 * ddp["bytes_sent_per_worker"]
    first = sim.shared_states[0]
    assert all(torch.equal(first["global_params"], o["global_params"])
               for o in sim.shared_states[1:])


@pytest.mark.filterwarnings("default::islands.core.errors.IslandsWarning")
def test_a_phase_as_long_as_the_run_is_ddp_exactly():
    common = ["workers=2", "steps=8", "eval_every=4"]
    with pytest.warns(IslandsWarning, match=r"algorithm.ddp_steps \(8\) >= steps \(8\)"):
        a, sa = run(*common, "algorithm.ddp_steps=8")
    b, sb = run(*common, "algorithm.name=ddp")
    assert torch.equal(a.final_params, b.final_params)
    for key in ("final_eval_loss", "bytes_sent_per_worker", "virtual_time_s", "rounds"):
        assert sa[key] == sb[key], key


def test_outer_schedules_are_written_before_each_outer_step():
    cfg = tiny_config("workers=1", "algorithm.ddp_steps=3", "outer.lr=[[0, 0.2], [4, 0.6]]",
                      "outer.momentum=[[0, 0.0], [2, 0.8]]")
    algo = build_algorithm(cfg)
    sim = Simulation(cfg)
    worker = build_worker(cfg, 0, sim.task.model(), data_size=1)
    attach(algo, worker)
    seen = []
    for r in range(3 + 6):
        algo.begin_round(None, [worker], r)
        g = worker.outer.param_groups[0]
        seen.append((round(g["lr"], 6), round(g["momentum"], 6)))
    # rounds 0-2 are the data-parallel phase (the optimizer is built with the first lr and
    # the largest momentum); outer step k = round - 3 follows the lines
    assert seen[:3] == [(0.2, 0.8)] * 3
    assert seen[3:] == [(0.2, 0.0), (0.3, 0.4), (0.4, 0.8), (0.5, 0.8), (0.6, 0.8), (0.6, 0.8)]
    assert value_at(((0, 1.0), (10, 2.0)), 2.5) == 1.25


def test_an_outer_lr_schedule_is_applied_in_a_run():
    """One worker, outer SGD without momentum at lr 1 is local training; a schedule that
    holds lr 1 is too, one that drops it later is not."""
    common = ["workers=1", "steps=24", "eval_every=100", "algorithm.sync_every=8",
              "outer.momentum=0.0", "outer.nesterov=false"]
    alone, _ = run("workers=1", "steps=24", "eval_every=100", "algorithm.name=ddp")
    held, _ = run(*common, "outer.lr=[[0, 1.0], [1, 1.0]]")
    torch.testing.assert_close(held.final_params, alone.final_params, rtol=0, atol=1e-5)
    dropped, _ = run(*common, "outer.lr=[[0, 1.0], [1, 0.5]]")
    assert (dropped.final_params - alone.final_params).abs().max() > 1e-3


def test_an_lr_schedule_works_with_any_torch_optimizer():
    sim, s = run("workers=2", "steps=8", "eval_every=100", "algorithm.sync_every=2",
                 "outer.optimizer=adam", "outer.lr=[[0, 0.001], [3, 0.004]]")
    opt = sim.workers[0].outer
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.004)  # outer step 3, the last
    assert s["final_eval_loss"] is not None


def test_observers_are_refused_where_they_could_not_tell_the_round():
    assert build_algorithm(tiny_config()).can_observe()
    assert not build_algorithm(tiny_config("algorithm.ddp_steps=5")).can_observe()
    assert not build_algorithm(tiny_config("outer.lr=[[0, 0.3], [5, 0.7]]")).can_observe()


@pytest.mark.parametrize("bad, words", [
    ("algorithm.sync_every=[[5, 10]]", ("algorithm.sync_every ([[5, 10]]) must be a number or "
                                        "[[step, H], ...] pairs starting at step 0")),
    ("algorithm.sync_every=[[0, 10], [0, 5]]", "needs each step larger than the one before"),
    ("algorithm.sync_every=[[0, 0]]", "algorithm.sync_every ([[0, 0]]) needs every H >= 1"),
    ("algorithm.sync_every=[[0, 2.5]]", "must be int or a list of [int, int]"),
    ("algorithm.ddp_steps=-1", "algorithm.ddp_steps (-1) must be >= 0"),
    ("outer.lr=[[0, 0.5], [3, 0]]", "outer.lr ([[0, 0.5], [3, 0.0]]) must be > 0"),
    ("outer.momentum=[[0, 0.5], [3, 1]]", "outer.momentum ([[0, 0.5], [3, 1.0]]) must be in"),
    ("outer.momentum=[[0, 0], [3, 0]]", "outer.nesterov (True) needs outer.momentum > 0"),
])
def test_bad_recipe_settings_name_the_key_and_the_rule(bad, words):
    with pytest.raises(ConfigError) as e:
        tiny_config(bad)
    assert words in str(e.value)


def test_a_phase_is_diloco_only_and_a_momentum_schedule_sgd_only():
    with pytest.raises(ConfigError, match=r"algorithm.ddp_steps \(5\) is read by algorithm "
                                          r"'diloco' only; algorithm.name = 'ddp' does not "
                                          r"read it: remove it, or set algorithm.name = 'diloco'"):
        tiny_config("algorithm.name=ddp", "algorithm.ddp_steps=5")
    with pytest.raises(ConfigError, match=r"outer.momentum .* is used by outer.optimizer = "
                                          r"'sgd' only"):
        build_algorithm(tiny_config("outer.optimizer=adam",
                                    "outer.momentum=[[0, 0.1], [2, 0.5]]"))


def test_lists_set_on_the_command_line_keep_their_meaning():
    cfg = tiny_config("algorithm.sync_every=[[0,10],[100,25]]", "outer.lr=1")
    assert cfg.algorithm.sync_every == ((0, 10), (100, 25))
    assert cfg.outer.lr == 1.0 and isinstance(cfg.outer.lr, float)
    assert cfg.to_dict()["algorithm"]["sync_every"] == ((0, 10), (100, 25))
    assert describe_h(50, 20) == "dp20+50"


def test_a_long_run_s_train_curve_is_thinned_to_a_bound_and_ends_at_the_last_round(
        monkeypatch):
    """summary.json's train curve holds at most TRAIN_CURVE_POINTS points (every round is in
    metrics.jsonl): a soak of millions of rounds must not grow it without end."""
    from islands.engine import loop

    monkeypatch.setattr(loop, "TRAIN_CURVE_POINTS", 4)
    _, s = run("workers=2", "steps=22", "algorithm.sync_every=2", "eval_every=100")
    assert s["rounds"] == 11
    # rounds 0..10: every round, then every 2nd, then every 4th; the last round is kept
    assert [p["round"] for p in s["train_curve"]] == [0, 4, 8, 10]
    assert s["train_curve"][-1]["train_loss"] == s["final_train_loss"]
