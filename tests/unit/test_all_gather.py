"""The all-gather beside the butterfly: every member's whole contribution, encoded once, to
every other; the same rows on every member, bit for bit; bytes (n - 1) payloads each way."""

from __future__ import annotations

import pytest
import torch

from islands.aggregators import mean
from islands.algorithms import Contribution, DiLoCo
from islands.algorithms.base import COLLECTIVES
from islands.codecs import Identity, build_codec, codec_config
from islands.collectives.butterfly import MESSAGE_HEADER_BYTES, Group
from islands.engine import build
from islands.sim.runner import Simulation
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock
from tests.conftest import tiny_config


def _group(n: int) -> tuple[Group, SimTransport]:
    t = SimTransport(n, NetworkModel(), VirtualClock(n))
    return Group(t, tuple(range(n))), t


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_every_member_holds_every_decoded_row_and_the_bytes_are_n_minus_1_payloads(n):
    torch.manual_seed(n)
    xs = {i: torch.randn(1001) for i in range(n)}
    codecs = {i: build_codec(codec_config(name="int8")) for i in range(n)}
    group, t = _group(n)
    weights = {i: 1.0 + i for i in range(n)}
    got = group.gather_rows(xs, codecs=codecs, weights=weights)
    first_rows, first_w = got[0]
    for rows, w in got.values():
        assert torch.equal(rows, first_rows) and torch.equal(w, first_w)
    assert first_w.tolist() == [1.0 + i for i in range(n)]
    for i in range(n):  # each row is its sender's payload decoded (int8: close, not equal)
        payload = build_codec(codec_config(name="int8")).encode(xs[i], key="probe")
        assert torch.equal(first_rows[i], codecs[i].decode(payload))
        assert t.sent(i) == t.received(i) == (n - 1) * (payload.nbytes + MESSAGE_HEADER_BYTES)


def test_gathered_then_averaged_is_the_mean_of_the_rows_and_near_the_butterflys():
    torch.manual_seed(0)
    xs = {i: torch.randn(513) for i in range(4)}
    group, _ = _group(4)
    ident = {i: Identity() for i in range(4)}
    gathered = group.start_all_gather(xs, codecs=ident).wait()
    expected = mean(torch.stack([xs[i] for i in range(4)]))
    assert all(torch.equal(v, expected) for v in gathered.values())
    reduced = _group(4)[0].all_reduce(xs, codecs=ident)
    torch.testing.assert_close(reduced[0], expected)


class _GatheredDiLoCo(DiLoCo):
    """DiLoCo whose pseudo-gradients are gathered, not reduced."""

    def contribute(self, worker, observers=()):
        return [Contribution(c.tensor, c.weight, c.tag, collective="all_gather")
                for c in super().contribute(worker, observers)]


def test_an_algorithm_asks_the_engine_for_an_all_gather(monkeypatch):
    sets = ("workers=3", "steps=8", "eval_every=100", "algorithm.name=diloco",
            "algorithm.sync_every=4")
    reduced = Simulation(tiny_config(*sets))
    s_reduced = reduced.run()
    real_build = build.build_algorithm

    def gathered_algorithm(cfg):
        a = real_build(cfg)
        a.__class__ = _GatheredDiLoCo
        return a

    monkeypatch.setattr(build, "build_algorithm", gathered_algorithm)
    gathered = Simulation(tiny_config(*sets))
    s_gathered = gathered.run()
    torch.testing.assert_close(gathered.final_params, reduced.final_params)
    # 3 workers: the butterfly sends 2 * 2/3 of the vector, the gather 2 whole vectors
    assert s_gathered["bytes_sent_per_worker"] > s_reduced["bytes_sent_per_worker"]


def test_a_contribution_names_a_collective_the_engine_has():
    assert COLLECTIVES == ("all_reduce", "all_gather", "neighbours")
    with pytest.raises(ValueError, match="collective"):
        Contribution(torch.zeros(3), collective="gossip")
    with pytest.raises(ValueError, match="mixing row"):  # gossip says whom it mixes with
        Contribution(torch.zeros(3), collective="neighbours")
