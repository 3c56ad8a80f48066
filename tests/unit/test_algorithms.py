"""Exact invariants of the DiLoCo family (up to fp32 rounding), on a tiny model."""

from __future__ import annotations

import pytest
import torch

from islands.sim.runner import Simulation
from tests.conftest import tiny_config


def final_params(cfg) -> torch.Tensor:
    sim = Simulation(cfg)
    sim.run()
    return sim.final_params


def test_diloco_one_worker_outer_sgd_lr1_equals_local_training():
    common = ["workers=1", "steps=24", "eval_every=100"]
    diloco = final_params(tiny_config(*common, "algorithm.name=diloco", "algorithm.sync_every=8",
                                      "outer.lr=1.0", "outer.momentum=0.0",
                                      "outer.nesterov=false"))
    alone = final_params(tiny_config(*common, "algorithm.name=ddp"))
    torch.testing.assert_close(diloco, alone, rtol=0, atol=1e-5)
    # The invariant is not vacuous: Nesterov outer steps move away from local training.
    nesterov = final_params(tiny_config(*common, "algorithm.name=diloco",
                                        "algorithm.sync_every=8"))
    assert (nesterov - alone).abs().max() > 1e-3


def test_local_sgd_every_step_with_sgd_equals_ddp():
    common = ["workers=3", "steps=12", "eval_every=100", "inner.optimizer=sgd", "inner.lr=0.3",
              "inner.momentum=0.9", "inner.grad_clip=false"]
    local = final_params(tiny_config(*common, "algorithm.name=local_sgd",
                                     "algorithm.sync_every=1"))
    ddp = final_params(tiny_config(*common, "algorithm.name=ddp"))
    torch.testing.assert_close(local, ddp, rtol=0, atol=1e-5)
    # ... and averaging less often does change the result.
    rare = final_params(tiny_config(*common, "algorithm.name=local_sgd",
                                    "algorithm.sync_every=6"))
    assert (rare - ddp).abs().max() > 1e-4


def test_ddp_writes_each_mean_into_one_kept_buffer_with_the_same_bits(monkeypatch):
    """DDP's gradient means go into a buffer each worker keeps (``Contribution.out``): the
    same buffer at every step, and the run ends with the bits of new tensors per step."""
    from islands.collectives.butterfly import Group

    cfg = tiny_config("workers=3", "steps=4", "eval_every=100", "algorithm.name=ddp")
    given = []
    start = Group.start_all_reduce

    def spy(self, contributions, **kw):
        given.append(kw.get("out"))
        return start(self, contributions, **kw)

    monkeypatch.setattr(Group, "start_all_reduce", spy)
    kept = final_params(cfg)
    assert len(given) == 4 and all(o is not None and sorted(o) == [0, 1, 2] for o in given)
    assert len({o[0].data_ptr() for o in given}) == 1  # one buffer, step after step
    monkeypatch.setattr(Group, "start_all_reduce",
                        lambda self, c, **kw: spy(self, c, **{**kw, "out": None}))
    fresh = final_params(cfg)
    assert torch.equal(kept, fresh)


def test_all_workers_hold_identical_shared_state():
    for name in ("ddp", "local_sgd", "diloco"):
        sim = Simulation(tiny_config("workers=3", "steps=10", "algorithm.sync_every=4",
                                     f"algorithm.name={name}", "eval_every=100"))
        sim.run()
        first = sim.shared_states[0]
        for other in sim.shared_states[1:]:
            assert first.keys() == other.keys()
            assert all(torch.equal(first[k], other[k]) for k in first), name


def test_same_config_and_seed_give_identical_summary():
    cfg = tiny_config("workers=2", "steps=10", "algorithm.sync_every=5", "eval_every=5")
    a, b = Simulation(cfg).run(), Simulation(cfg).run()
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert a == b
    c = Simulation(cfg.replace(seed=1)).run()
    assert c["final_eval_loss"] != a["final_eval_loss"]


def test_rounds_bytes_and_final_sync():
    # 10 steps, H = 4: rounds of 4, 4 and a final shorter round of 2 that still syncs.
    s = Simulation(tiny_config("workers=2", "steps=10", "algorithm.sync_every=4",
                               "eval_every=4")).run()
    assert s["rounds"] == 3
    params = s["params"]
    per_round = 2 * (2 - 1) / 2 * 4 * params + 2 * (2 - 1) * 16
    assert s["bytes_sent_per_worker"] == 3 * per_round
    assert [p["step"] for p in s["eval_curve"]] == [0, 4, 8, 10]


def test_ddp_sends_sync_every_times_more_than_diloco():
    common = ["workers=4", "steps=20", "eval_every=100"]
    ddp = Simulation(tiny_config(*common, "algorithm.name=ddp")).run()
    dil = Simulation(tiny_config(*common, "algorithm.sync_every=10")).run()
    assert ddp["bytes_sent_per_worker"] == 10 * dil["bytes_sent_per_worker"]
    assert ddp["virtual_time_s"] > dil["virtual_time_s"]
    assert ddp["compute_utilization"] < dil["compute_utilization"]


def test_fedavg_participation_draws_workers_and_refreshes_stale_ones():
    cfg = tiny_config("workers=4", "steps=12", "algorithm.name=local_sgd",
                      "algorithm.sync_every=3", "algorithm.participation=0.5",
                      "eval_every=100")
    from islands.algorithms import build_algorithm

    algo = build_algorithm(cfg)
    drawn = [algo.participants(r, (0, 1, 2, 3)) for r in range(4)]
    assert all(len(p) == 2 for p in drawn) and len(set(drawn)) > 1
    assert drawn == [algo.participants(r, (0, 1, 2, 3)) for r in range(4)]  # deterministic
    sim = Simulation(cfg)
    s = sim.run()
    # Non-participants neither train nor send in a round; utilization shows the idle half.
    assert s["compute_utilization"] < 0.6
    last = drawn[-1]
    torch.testing.assert_close(sim.shared_states[last[0]]["global_params"],
                               sim.shared_states[last[1]]["global_params"], rtol=0, atol=0)


def test_slow_worker_is_a_config_value():
    common = ["workers=2", "steps=8", "algorithm.sync_every=4", "eval_every=100"]
    even = Simulation(tiny_config(*common)).run()
    slow = Simulation(tiny_config(*common, "compute.worker=[{id = 1, step_time_s = 0.4}]")).run()
    assert slow["virtual_time_s"] > 3 * even["virtual_time_s"] - 1
    assert slow["compute_utilization"] < even["compute_utilization"]
    assert slow["final_eval_loss"] == even["final_eval_loss"]  # time does not change math


def test_a_commit_s_time_is_a_config_value_each_round_waits_for():
    """``compute.commit_time_s``: every worker spends it on each round (DDP: every step;
    DiLoCo: every ``sync_every`` steps), waited for (communication), and the math does not
    change."""
    for algo, steps, rounds in (("ddp", 4, 4), ("diloco", 8, 2)):
        common = [f"algorithm.name={algo}", "workers=2", f"steps={steps}",
                  "algorithm.sync_every=4", "eval_every=100"]
        base = Simulation(tiny_config(*common)).run()
        slow = Simulation(tiny_config(*common, "compute.commit_time_s=0.25")).run()
        assert slow["virtual_time_s"] == pytest.approx(base["virtual_time_s"] + 0.25 * rounds)
        assert slow["compute_utilization"] < base["compute_utilization"]
        assert slow["final_eval_loss"] == base["final_eval_loss"]


def test_framing_stretches_the_time_a_link_takes_not_the_bytes():
    """``network.framing``: the headers a link carries besides the payload make each transfer
    last that many times longer; bytes and math stay the payload's."""
    common = ["algorithm.name=ddp", "workers=2", "steps=3", "eval_every=100",
              "network.latency_s=0"]
    runs = {f: Simulation(tiny_config(*common, f"network.framing={f}")).run()
            for f in (1.0, 1514 / 1448)}
    plain, framed = runs[1.0], runs[1514 / 1448]
    compute = 3 * 0.1  # compute.step_time_s per step, no wait on a peer (same speeds)
    assert framed["virtual_time_s"] - compute == pytest.approx(
        (plain["virtual_time_s"] - compute) * 1514 / 1448)
    assert framed["bytes_sent_per_worker"] == plain["bytes_sent_per_worker"]
    assert framed["final_eval_loss"] == plain["final_eval_loss"]


def test_warm_start_is_shared_deterministic_and_trained():
    """Every algorithm starts from the same warm-started parameters: the seed's initialization
    trained ``init.warm_start_steps`` steps alone; recomputed from scratch, bit-identical."""
    from islands.engine import build
    from islands.tasks import build_task

    warm = ["steps=4", "eval_every=4", "init.warm_start_steps=30"]
    runs = {algo: Simulation(tiny_config(*warm, f"algorithm.name={algo}",
                                         "algorithm.sync_every=2")).run()
            for algo in ("ddp", "diloco", "local_sgd")}
    start = {algo: s["eval_curve"][0]["eval_loss"] for algo, s in runs.items()}
    assert len(set(start.values())) == 1
    cold = Simulation(tiny_config("steps=4", "eval_every=4", "algorithm.sync_every=2")).run()[
        "eval_curve"][0]
    assert start["ddp"] < cold["eval_loss"] - 0.5  # 30 steps from ~5.5 nats

    cfg = tiny_config(*warm)
    cpu = torch.device("cpu")
    cached = {k: v.clone() for k, v in build.warm_start(cfg, build_task(cfg), cpu).items()}
    build._WARM_STARTS.clear()
    again = build.warm_start(cfg, build_task(cfg), cpu)
    assert all(torch.equal(cached[k], again[k]) for k in cached)
    other_cfg = tiny_config("init.warm_start_steps=31")
    other = build.warm_start(other_cfg, build_task(other_cfg), cpu)
    assert not all(torch.equal(cached[k], other[k]) for k in cached)


@pytest.mark.parametrize("algo", ["diloco", "local_sgd"])
def test_an_observer_changes_nothing_and_ends_with_the_same_state(algo):
    # (local_sgd weighs uniformly here: by samples an untrained worker weighs 0 anyway)
    """A worker healing into a round (holding the committed state, trained nothing) takes
    part with weight 0: the round's result is the other members' alone, and it ends the
    round with their shared state."""
    from islands.algorithms import build_algorithm
    from islands.collectives.butterfly import Group
    from islands.engine import Engine, attach, build_worker, initial_model
    from islands.runtime.state import digest
    from islands.tasks import build_task, to_device
    from islands.transports.sim import NetworkModel, SimTransport, VirtualClock

    cfg = tiny_config("workers=3", f"algorithm.name={algo}", "algorithm.sync_every=3",
                      *(["algorithm.weighting=uniform"] if algo == "local_sgd" else []))
    task = build_task(cfg)
    data = task.data(3, cfg.seed, cfg.data)

    def round_with(members, observers):
        base, algorithm = initial_model(cfg, task, torch.device("cpu")), build_algorithm(cfg)
        workers = [build_worker(cfg, i, base, data_size=data.size(i)) for i in range(3)]
        for w in workers:
            attach(algorithm, w)
        for step in range(3):
            for w in workers[:2]:
                w.backward(task.loss, to_device(data.batch(w.id, step), "cpu"), 4)
                w.apply()
        clock = VirtualClock(3)
        transport = SimTransport(3, NetworkModel.from_config(cfg.network), clock)
        engine = Engine(cfg, algorithm, transport, workers, task=task, partition=data,
                        device=torch.device("cpu"), clock=clock)
        active = [workers[i] for i in members]
        engine.end_round(Group(transport, members), active, observers)
        return [algorithm.shared_state(w) for w in active]

    alone = round_with((0, 1), ())
    observed = round_with((0, 1, 2), (2,))
    torch.testing.assert_close(observed[0]["global_params"], alone[0]["global_params"],
                               rtol=1e-6, atol=1e-7)
    assert len({digest(s) for s in observed}) == 1
    assert not torch.equal(observed[0]["global_params"], round_with((0, 1, 2), ())[0][
        "global_params"])  # without weight 0 the untrained worker would drag the mean


@pytest.mark.parametrize("algo", ["ddp", "diloco", "local_sgd"])
def test_a_fresh_workers_state_hash_is_its_initial_parameters(algo):
    """A joiner reports its hash before its optimizers exist (they are built while it waits):
    that hash must be the one its built state has."""
    from islands.runtime.state import digest
    from islands.runtime.worker import RuntimeWorker

    w = RuntimeWorker(tiny_config(f"algorithm.name={algo}", "workers=2"), 1, membership=None,
                      store=None)
    w.setup()
    early = w.member.hash()
    w.member._built()
    m = w.member
    assert early == m._fresh_hash == digest(w.engine.algorithm.shared_state(m.worker)) == m.hash()


def test_measured_compute_holds_the_optimizer_step(monkeypatch):
    """The real runtime's measured compute (no step_time_s) counts each inner step's
    optimizer step, as ``[compute] step_time_s`` does: a step time taken from it is not
    short of the step. The optimizer step is slowed here by a known amount."""
    import time

    from islands.algorithms.base import Worker
    from islands.engine.loop import WallClock

    sim = Simulation(tiny_config("workers=2", "steps=4", "eval_every=100",
                                 "algorithm.name=local_sgd", "algorithm.sync_every=4"))
    engine = sim.build()
    engine.step_time_s, engine.clock = None, WallClock((0, 1))
    apply = Worker.apply

    def slow(self):
        time.sleep(0.05)
        apply(self)

    monkeypatch.setattr(Worker, "apply", slow)
    engine.train(0, (0, 1))
    assert all(s >= 4 * 0.05 for s in engine.clock.compute_s.values()), engine.clock.compute_s
