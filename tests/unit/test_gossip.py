"""Gossip algorithms in the simulator: decentralized SGD and gossip DiLoCo mix over a topology,
each worker exchanges only with its neighbours, the final merge averages exactly, and the run
reports the average model, the workers' own and the consensus distance."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from islands.algorithms import LocalSGD, check_algorithm
from islands.algorithms.gossip import SENDS, GossipDiLoCoConfig
from islands.codecs.base import Encoded
from islands.codecs.cast import Identity
from islands.collectives.butterfly import Group
from islands.collectives.neighbours import start_neighbours
from islands.core.errors import ConfigError, PeerRefused
from islands.engine import consensus
from islands.sim.runner import Simulation
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock
from tests.conftest import tiny_config

BASE = ("workers=4", "steps=12", "eval_every=6", "inner.optimizer='sgd'", "inner.lr=0.05",
        "inner.warmup_steps=0", "inner.grad_clip=none")


def _run(*sets):
    sim = Simulation(tiny_config(*BASE, *sets))
    return sim, sim.run()


def test_dsgd_on_a_complete_graph_with_plain_sgd_equals_ddp_up_to_rounding():
    ddp, _ = _run("algorithm.name=ddp")
    dsgd, s = _run("algorithm.name=dsgd", "topology.name=complete")
    assert torch.allclose(dsgd.final_params, ddp.final_params, rtol=0, atol=1e-5)
    assert s["final_eval_loss"] < s["eval_curve"][0]["eval_loss"]  # it trained
    assert s["topology"]["spectral_gap"] == pytest.approx(1.0)
    assert s["final_eval_consensus_distance"] < 1e-5  # all alike after each full average


def _exchange(n, rows, send_to, tensors, steps=1):
    transport = SimTransport(n, NetworkModel(), VirtualClock(n))
    group = Group(transport, tuple(range(n)))
    work = start_neighbours(group, tensors, codecs={i: Identity() for i in range(n)},
                            rows=rows, send_to=send_to, steps=steps)
    return transport, work.wait()


def test_a_gossip_step_holds_each_worker_only_for_its_own_neighbours():
    """Virtual time: on a ring of 6, worker 0 comes 5 s late. Its neighbours 1 and 5 wait
    for it; 2, 3 and 4 do not (one step: they only exchange with 1..5 among themselves)."""
    n = 6
    rows = {i: {j: 1 / 3 for j in ((i - 1) % n, i, (i + 1) % n)} for i in range(n)}
    send_to = {i: ((i - 1) % n, (i + 1) % n) for i in range(n)}
    transport = SimTransport(n, NetworkModel(1e9, 0.0), VirtualClock(n))
    transport.clock.compute(0, 5.0)
    start_neighbours(Group(transport, tuple(range(n))),
                     {i: torch.ones(250) for i in range(n)},
                     codecs={i: Identity() for i in range(n)}, rows=rows, send_to=send_to)
    now = [transport.clock.time_s(i) for i in range(n)]
    assert now[0] > 5.0 and now[1] == now[5] == now[0]
    assert now[2] == now[3] == now[4] < 0.01  # 2 x (1000 + 16) bytes at 1 Gbit/s


def test_a_neighbour_exchange_applies_each_row_and_sends_only_to_receivers():
    n = 4  # a ring, weights 1/3
    rows = {i: {j: 1 / 3 for j in ((i - 1) % n, i, (i + 1) % n)} for i in range(n)}
    send_to = {i: ((i - 1) % n, (i + 1) % n) for i in range(n)}
    xs = {i: torch.full((5,), float(i)) for i in range(n)}
    transport, out = _exchange(n, rows, send_to, xs)
    for i in range(n):
        want = sum(xs[j] * w for j, w in sorted(rows[i].items()))
        assert torch.allclose(out[i], want)
    assert set(transport.link_bytes) == {(i, j) for i in range(n) for j in send_to[i]}
    assert len(set(transport.bytes_sent)) == 1 and transport.bytes_sent[0] == 2 * (20 + 16)
    _, twice = _exchange(n, rows, send_to, xs, steps=2)  # W^2: two exchanges
    w = torch.tensor([[rows[i].get(j, 0.0) for j in range(n)] for i in range(n)])
    x = torch.stack([xs[i] for i in range(n)])
    assert torch.allclose(torch.stack([twice[i] for i in range(n)]), w @ w @ x)


def test_a_non_finite_neighbour_is_refused_by_name():
    n = 3
    rows = {i: {j: 1 / 3 for j in range(n)} for i in range(n)}
    send_to = {i: tuple(j for j in range(n) if j != i) for i in range(n)}
    xs = {i: torch.ones(4) for i in range(n)}
    xs[2][1] = float("nan")
    codecs = {i: Identity() for i in range(n)}
    # worker 2 skips its own encoder's check and sends the NaN as it is
    codecs[2].encode = lambda x, key=None: Encoded({"values": x.clone()}, numel=x.numel())
    group = Group(SimTransport(n, NetworkModel(), VirtualClock(n)), tuple(range(n)))
    with pytest.raises(PeerRefused, match="worker 2"):
        start_neighbours(group, xs, codecs=codecs, rows=rows, send_to=send_to)


@pytest.mark.parametrize("send", SENDS)
def test_gossip_diloco_on_a_ring_with_a_final_merge_ends_with_one_model(send):
    sim, s = _run("algorithm.name=gossip_diloco", "algorithm.sync_every=4",
                  "topology.name=ring", "algorithm.final_merge=true", "inner.optimizer='adamw'",
                  "inner.lr=3e-3", f"algorithm.send={send}")
    states = [w.global_params.detach() for w in sim.workers]
    assert all(torch.equal(states[0], x) for x in states[1:])
    assert s["final_eval_consensus_distance"] == 0.0
    assert s["final_eval_loss"] == pytest.approx(s["final_eval_loss_own"], abs=1e-6)
    assert s["final_eval_loss"] < s["eval_curve"][0]["eval_loss"]
    # each worker sent its vector (two with "both") to its two neighbours each round (3
    # rounds), then the merge's all-reduce of one vector (2 * 3/4 of it, in 4 shards)
    p, shard = s["params"], s["params"] // 4
    assert p % 4 == 0  # equal shards: the sums below are exact
    message = (2 if send == "two_phase" else 1) * (4 * p + 16)  # messages a round per link
    assert s["bytes_sent_by_worker"] == [3 * 2 * message + 2 * 3 * (4 * shard + 16)] * 4
    assert s["topology"]["name"] == "ring" and s["topology"]["max_degree"] == 2
    # a ring link: 3 gossip messages, then the merge's shard each way of the butterfly
    assert s["busiest_link_bytes"] == 3 * message + 2 * (4 * shard + 16)


def test_without_a_merge_the_workers_own_models_differ_and_the_distance_is_reported():
    sim, s = _run("algorithm.name=gossip_diloco", "algorithm.sync_every=4",
                  "topology.name=ring", "inner.optimizer='adamw'", "inner.lr=3e-3")
    states = [w.global_params.detach() for w in sim.workers]
    assert not torch.equal(states[0], states[2])
    assert s["final_eval_consensus_distance"] > 0
    assert {"final_eval_loss", "final_eval_loss_own"} <= set(s)
    avg = torch.stack(states).mean(0)
    assert torch.allclose(sim.final_params, avg, atol=1e-6)  # final.safetensors: the average


def test_gossip_settings_are_checked():
    with pytest.raises(ConfigError, match="aggregator.name"):
        check_algorithm(tiny_config("algorithm.name=dsgd", "aggregator.name=median"))
    with pytest.raises(ConfigError, match="topology.gossip_steps"):
        tiny_config("algorithm.name=dsgd", "topology.gossip_steps=0")


def test_modest_keeps_training_when_80_percent_of_the_workers_stop_answering_mid_run():
    """10 workers, 2 drawn per round; 8 of them crash at round 3 of 8, the round's whole
    sample among them (that round is lost). The sample is then drawn from the two left, who go
    on from the newest model one of them holds: no hang, and the loss falls again."""
    gone = [w for w in range(10) if w not in (3, 7)]
    crashes = ", ".join("{kind='crash', worker=%d, round=3}" % w for w in gone)
    sim, s = _run("workers=10", "steps=32", "eval_every=4", "algorithm.name=modest",
                  "algorithm.sync_every=4", "algorithm.sample_fraction=0.2",
                  "inner.optimizer='adamw'", "inner.lr=3e-3", f"faults=[{crashes}]")
    assert sim.live == [3, 7] and s["rounds"] == 8
    curve = {p["step"]: p["eval_loss"] for p in s["eval_curve"]}
    assert 16 not in curve  # round 3: every participant crashed before the sync
    after = [curve[step] for step in (20, 24, 28, 32)]
    assert after == sorted(after, reverse=True) and after[-1] < curve[0]


def test_modest_refreshes_a_new_sample_from_the_newest_holders_left():
    a = LocalSGD(4, participation=0.5, remember=True)
    draws = {0: (0, 1), 1: (2, 3), 2: (4, 5)}
    a.participants = lambda r, members: draws[r]
    assert a.refresh(0, tuple(range(6))) is None
    assert a.refresh(1, tuple(range(6))) == (0, (2, 3))
    # the whole last sample is gone: the one before it holds the newest state left
    assert a.refresh(2, (0, 1, 4, 5)) == (0, (4, 5))


def test_on_the_one_peer_exponential_graph_each_worker_sends_one_message_a_round():
    _, gossip = _run("algorithm.name=gossip_diloco", "algorithm.send=local",
                     "algorithm.sync_every=4", "topology.name=one_peer_exponential")
    _, diloco = _run("algorithm.name=diloco", "algorithm.sync_every=4")
    p = gossip["params"]
    assert gossip["bytes_sent_by_worker"] == [3 * (4 * p + 16)] * 4  # 3 rounds, one peer
    assert gossip["bytes_sent_per_worker"] < diloco["bytes_sent_per_worker"]  # butterfly: 1.5x
    # shifts 1, 2, 1 in rounds 0, 1, 2 (4 workers): the shift-1 links carry two messages
    assert gossip["topology"]["time_varying"] and gossip["busiest_link_bytes"] == 2 * (4 * p + 16)


def test_dsgd_with_a_final_merge_ends_with_one_model_on_every_worker():
    sim, s = _run("algorithm.name=dsgd", "algorithm.sync_every=2", "topology.name=ring",
                  "algorithm.final_merge=true")
    states = [w.global_params for w in sim.workers]
    assert all(torch.equal(states[0], x) for x in states[1:])
    assert all(torch.equal(states[0], w.flat_params()) for w in sim.workers)  # loaded too
    assert s["final_eval_consensus_distance"] == 0.0


def test_noloco_steps_each_worker_toward_its_pair_s_mean_local_parameters():
    """NoLoCo (one round, heavy-ball outer step): ``φ_i ← φ_i − lr (φ_i − mean_pair θ^loc)``.
    Decentralized SGD over the same pairing gives ``mean_pair θ^loc`` itself (same inner steps
    from the same start), so the two runs pin the rule down; each worker sends one vector, to
    its partner only."""
    one_round = ("steps=6", "algorithm.sync_every=6", "topology.seed=3")
    pairs, _ = _run("algorithm.name=dsgd", "topology.name=matching", *one_round)
    noloco, s = _run("algorithm.name=noloco", "outer.nesterov=false", "outer.momentum=0.3",
                     "outer.lr=0.7", *one_round)
    start = Simulation(tiny_config(*BASE, "algorithm.name=noloco", *one_round))
    start.build()
    phi0 = start.workers[0].flat_params()
    for w, mean_pair in zip(noloco.workers, pairs.workers):
        expected = phi0 - 0.7 * (phi0 - mean_pair.flat_params())
        assert torch.allclose(w.global_params.detach(), expected, rtol=0, atol=1e-6), w.id
    assert s["topology"]["name"] == "matching"
    p = s["params"]
    assert s["bytes_sent_by_worker"] == [4 * p + 16] * 4  # one vector, one peer, one round
    states = [w.global_params.detach() for w in noloco.workers]
    assert sum(torch.equal(states[0], x) for x in states) == 2  # worker 0 and its partner


def test_noloco_s_pull_weighs_the_distance_to_the_pair_s_global_parameters():
    """``algorithm.pull`` (the paper's γ/β): ``g = φ − mean θ^loc + (pull − 1)(φ − mean φ)``
    (the pseudo-gradients' mean plus ``pull`` times the distance); it sends the global
    parameters too, two vectors a round."""
    sets = ("algorithm.name=noloco", "algorithm.pull=0.25", "outer.nesterov=false",
            "outer.momentum=0", "outer.lr=0.5", "steps=6", "algorithm.sync_every=6")
    sim = Simulation(tiny_config(*BASE, *sets))
    engine = sim.build()
    w = sim.workers[0]
    phi = w.global_params.detach().clone()
    local_mean, global_mean = torch.randn_like(phi), torch.randn_like(phi)
    engine.algorithm.apply(w, [local_mean, global_mean])
    expected = phi - 0.5 * ((phi - local_mean) - 0.75 * (phi - global_mean))
    assert torch.allclose(w.global_params.detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(w.flat_params(), w.global_params.detach())
    _, s = _run(*sets)
    assert s["bytes_sent_by_worker"] == [2 * (4 * s["params"] + 16)] * 4


def test_noloco_settings_are_checked():
    with pytest.raises(ConfigError, match="algorithm.groups"):
        tiny_config("algorithm.name=noloco", "algorithm.groups=triples")
    with pytest.raises(ConfigError, match="algorithm.pull"):
        tiny_config("algorithm.name=noloco", "algorithm.pull=-1")
    with pytest.raises(ConfigError, match="aggregator.name"):
        check_algorithm(tiny_config("algorithm.name=noloco", "aggregator.name=median"))


def test_a_partition_keeps_gossip_on_each_side_until_it_heals(tmp_path):
    """A ring of 4 cut into {0, 1} | {2, 3} from round 1 to round 4: in between each worker
    sends to its one neighbour on its side (half the bytes), the sides drift apart (the
    consensus distance grows), and after the heal they mix again."""
    from islands.metrics.run_dir import read_metrics

    cut = ("faults=[{kind='partition', workers=[0, 1], round=1}, {kind='heal', round=4}]")
    sim = Simulation(tiny_config(*BASE, "algorithm.name=dsgd", "algorithm.sync_every=2",
                                 "topology.name=ring", cut), tmp_path)
    s = sim.run()
    rows = [r for r in read_metrics(tmp_path) if r["worker"] == 0]
    message = 4 * s["params"] + 16
    assert [r["bytes_sent"] for r in rows] == [2 * message] + [message] * 3 + [2 * message] * 2
    whole = Simulation(tiny_config(*BASE, "algorithm.name=dsgd", "algorithm.sync_every=2",
                                   "topology.name=ring"), tmp_path / "whole")
    whole.run()
    apart = {r["round"]: r["consensus_distance"] for r in rows}
    together = {r["round"]: r["consensus_distance"]
                for r in read_metrics(tmp_path / "whole") if r["worker"] == 0}
    assert apart[0] == together[0]  # the same run until the cut
    assert all(apart[r] > together[r] for r in (1, 2, 3))


def test_a_neighbour_that_crashes_before_the_sync_is_left_out_of_that_round_s_mix(tmp_path):
    """A ring of 4, worker 3 crashing in round 1 (it trains, then is gone before the sync):
    its neighbours mix without it that round (worker 0 sends to worker 1 only), and from
    round 2 the graph is drawn over the three left (a ring of 3: both others)."""
    from islands.metrics.run_dir import read_metrics

    sim = Simulation(tiny_config(*BASE, "algorithm.name=dsgd", "algorithm.sync_every=2",
                                 "topology.name=ring",
                                 "faults=[{kind='crash', worker=3, round=1}]"), tmp_path)
    s = sim.run()
    every = read_metrics(tmp_path)
    message = 4 * s["params"] + 16
    sent = {(r["round"], r["worker"]): r["bytes_sent"] for r in every}
    assert [sent[r, 0] for r in range(6)] == [2 * message, message] + [2 * message] * 4
    assert sent[1, 1] == 2 * message  # not a neighbour of worker 3's: both of its own
    assert [r["round"] for r in every if r["worker"] == 3] == [0]
    assert s["final_eval_loss"] < s["eval_curve"][0]["eval_loss"]


def test_partition_faults_are_checked():
    with pytest.raises(ConfigError, match=r"faults\[0\].workers"):
        tiny_config("algorithm.name=dsgd", "faults=[{kind='partition', round=1}]")
    with pytest.raises(ConfigError, match=r"faults\[0\].worker "):
        tiny_config("algorithm.name=dsgd", "faults=[{kind='heal', worker=1, round=1}]")
    with pytest.raises(ConfigError, match=r"faults\[0\].workers"):
        tiny_config("workers=4", "faults=[{kind='partition', workers=[0, 1, 2, 3], round=1}]")
    with pytest.raises(ConfigError, match="partitions apply to gossip algorithms"):
        Simulation(tiny_config("workers=4", "algorithm.name=diloco",
                               "faults=[{kind='partition', workers=[0], round=1}]")).run()


def test_variance_corrected_mixing_keeps_each_tensor_s_spread():
    """Three uncorrelated models averaged: each tensor's spread falls to about 1/sqrt(3) of
    theirs; corrected, it is their weighted mean spread again, about the same mean."""
    n, segments = 3, (1000, 500)
    rows = {i: {j: 1 / 3 for j in range(n)} for i in range(n)}
    send_to = {i: tuple(j for j in range(n) if j != i) for i in range(n)}
    gen = torch.Generator().manual_seed(0)
    xs = {i: torch.cat([torch.randn(1000, generator=gen),
                        5 + 0.1 * torch.randn(500, generator=gen)]) for i in range(n)}
    plain = start_neighbours(Group(SimTransport(n, NetworkModel(), VirtualClock(n)),
                                   tuple(range(n))), xs,
                             codecs={i: Identity() for i in range(n)}, rows=rows,
                             send_to=send_to).wait()
    fixed = start_neighbours(Group(SimTransport(n, NetworkModel(), VirtualClock(n)),
                                   tuple(range(n))), xs,
                             codecs={i: Identity() for i in range(n)}, rows=rows,
                             send_to=send_to, segments=segments).wait()
    for k, (lo, hi) in enumerate(((0, 1000), (1000, 1500))):
        want = sum(float(xs[j][lo:hi].std(correction=0)) for j in range(n)) / n
        got_plain = float(plain[0][lo:hi].std(correction=0))
        got = float(fixed[0][lo:hi].std(correction=0))
        assert got_plain < 0.7 * want  # shrunk (uncorrelated: about 0.58)
        assert got == pytest.approx(want, rel=1e-5)
        assert float(fixed[0][lo:hi].mean()) == pytest.approx(float(plain[0][lo:hi].mean()),
                                                              abs=1e-5)


def test_dsgd_with_variance_correction_trains_and_differs_from_plain_mixing():
    plain, _ = _run("algorithm.name=dsgd", "algorithm.sync_every=3", "topology.name=ring")
    fixed, s = _run("algorithm.name=dsgd", "algorithm.sync_every=3", "topology.name=ring",
                    "topology.variance_correction=true")
    assert s["final_eval_loss"] < s["eval_curve"][0]["eval_loss"]
    assert not torch.equal(fixed.final_params, plain.final_params)


def test_a_gossip_joiner_takes_a_live_worker_s_own_state():
    """A gossip joiner (the fault plan's handover) starts from the source's own global
    parameters and outer momentum: gossip shares no state, so the handover is the source's
    own, not nothing (the joiner would keep the initial model)."""
    from islands.sim.faults import hand_state

    sim, _ = _run("algorithm.name=gossip_diloco", "algorithm.sync_every=3",
                  "topology.name=ring", "inner.optimizer='adamw'")
    src, dst = sim.workers[0], sim.workers[3]
    assert not torch.equal(src.global_params, dst.global_params)
    transport = SimTransport(4, NetworkModel(), VirtualClock(4))
    # what hand_state reads of the simulation's engine: its algorithm and transport
    engine = SimpleNamespace(algorithm=GossipDiLoCoConfig().build(
        tiny_config(*BASE, "algorithm.name=gossip_diloco"), None), transport=transport)
    hand_state(engine, src, [dst])
    assert torch.equal(dst.global_params, src.global_params)
    assert torch.equal(dst.flat_params(), src.global_params.detach())
    momentum = dst.outer.state[dst.global_params]["momentum_buffer"]
    assert torch.equal(momentum, src.outer.state[src.global_params]["momentum_buffer"])
    # the parameters and the momentum, fp32, counted on the link
    assert transport.link_bytes[(0, 3)] == 2 * 4 * src.flat_params().numel()


def test_count_sketches_estimate_the_consensus_distance_of_a_run():
    """The distance from the workers' sketches is the exact one within a few percent; a
    sketch is linear and the same in every process (its seed), another seed another
    sketch."""
    sim, _ = _run("algorithm.name=gossip_diloco", "algorithm.sync_every=4", "topology.name=ring",
                  "inner.optimizer='adamw'", "inner.lr=3e-3")
    states = [w.global_params.detach() for w in sim.workers]
    exact = consensus.distance_of(states, consensus.mean_of(states))
    sketches = [consensus.sketch(v, seed=7) for v in states]
    estimate = consensus.distance_of(sketches, consensus.mean_of(sketches))
    assert exact > 0 and estimate == pytest.approx(exact, rel=0.05)
    a, b = states[0], states[1]
    assert torch.allclose(consensus.sketch(a - 2 * b, 7),
                          consensus.sketch(a, 7) - 2 * consensus.sketch(b, 7), atol=1e-4)
    assert torch.equal(consensus.sketch(a, 7), consensus.sketch(a.clone(), 7))
    assert not torch.equal(consensus.sketch(a, 7), consensus.sketch(a, 8))
    rng = torch.Generator().manual_seed(0)  # a spread of random vectors: within 5% each
    for _ in range(20):
        x = torch.randn(50_000, generator=rng)
        assert float(consensus.sketch(x, 3).norm()) == pytest.approx(float(x.norm()), rel=0.05)
