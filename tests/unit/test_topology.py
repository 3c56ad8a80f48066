"""The gossip topologies have the shapes their names promise, the ring's spectral gap is the
textbook one, bad configurations name their field and fix, and the matrices are cached."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from islands.algorithms.topology import Topology, graph, mixing_matrix, spectral_gap
from islands.core.errors import ConfigError


def degrees(g: nx.Graph) -> list[int]:
    return [d for _, d in sorted(g.degree)]


def test_ring_complete_exponential_degrees():
    assert degrees(graph("ring", 8)) == [2] * 8
    assert degrees(graph("complete", 8)) == [7] * 8
    exp = graph("exponential", 8)
    assert degrees(exp) == [5] * 8  # i ± 1, i ± 2 and i + 4 = i - 4
    assert set(exp[0]) == {1, 2, 4, 6, 7}


def test_small_rings_have_no_self_loop():
    assert graph("ring", 1).number_of_edges() == 0
    assert list(graph("ring", 2).edges) == [(0, 1)]


def test_torus_of_8_is_a_2_by_4_grid():
    g = graph("torus", 8)
    assert sorted(g.nodes) == list(range(8))
    assert nx.is_isomorphic(g, nx.grid_2d_graph(2, 4, periodic=True))
    assert degrees(g) == [3] * 8


def test_regular_and_barabasi_albert():
    g = graph("regular", 8, degree=4, seed=3)
    assert degrees(g) == [4] * 8 and nx.is_connected(g)
    assert degrees(graph("regular", 8)) == [3] * 8  # default degree 3
    ba = graph("barabasi_albert", 8, degree=2, seed=1)
    assert ba.number_of_edges() == 2 * (8 - 2) and nx.is_connected(ba)


def test_degree_is_ignored_by_other_names():
    assert nx.utils.graphs_equal(graph("ring", 8, degree=5), graph("ring", 8))


def test_one_peer_exponential_cycles_shifts_1_2_4():
    for round, shift in [(0, 1), (1, 2), (2, 4), (3, 1), (5, 4)]:
        g = graph("one_peer_exponential", 8, round=round)
        assert g.is_directed()
        assert sorted(g.edges) == sorted(((i + shift) % 8, i) for i in range(8))
    w = mixing_matrix(graph("one_peer_exponential", 8, round=1))
    assert w[0, 0] == w[0, 2] == 0.5  # worker 0 receives from worker 2
    assert graph("one_peer_exponential", 1).number_of_edges() == 0


@pytest.mark.parametrize("n", [7, 8])
def test_matching_pairs_workers(n):
    for round in range(5):
        g = graph("matching", n, seed=11, round=round)
        assert max(degrees(g)) <= 1
        assert g.number_of_edges() == n // 2  # perfect for even n, one left alone for odd


def test_ring_of_8_spectral_gap():
    w = mixing_matrix(graph("ring", 8))
    np.testing.assert_allclose(w[0, [7, 0, 1]], 1 / 3)
    assert spectral_gap(w) == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / 8)) / 3)
    assert spectral_gap(np.ones((1, 1))) == 1.0


def test_disconnected_graph_has_zero_gap():
    assert spectral_gap(mixing_matrix(nx.empty_graph(4))) == 0.0


def test_directed_graph_must_be_disjoint_cycles():
    with pytest.raises(ValueError, match="in-degree"):
        mixing_matrix(nx.DiGraph([(0, 1)]))


@pytest.mark.parametrize("make, field, fix", [
    (lambda: graph("star", 4), "topology.name", "ring"),
    (lambda: Topology("star"), "topology.name", "one_peer_exponential"),
    (lambda: graph("torus", 7), "topology.name", "use ring"),
    (lambda: graph("regular", 7, degree=3), "topology.degree", "even degree"),
    (lambda: graph("regular", 4, degree=4), "topology.degree", "from 1 to 3"),
    (lambda: graph("regular", 6, degree=1), "topology.degree", "2 or more"),
    (lambda: graph("barabasi_albert", 2, degree=2), "topology.degree", "from 1 to 1"),
    (lambda: Topology("ring", degree=0), "topology.degree", "1 or more"),
    (lambda: Topology("ring", seed=-1), "topology.seed", "0 or more"),
    (lambda: Topology("matching", time_varying=False), "topology.time_varying", "true"),
])
def test_config_errors_name_field_and_fix(make, field, fix):
    with pytest.raises(ConfigError) as caught:
        make()
    assert field in str(caught.value) and fix in str(caught.value)


def test_regular_degree_parity_message():
    with pytest.raises(ConfigError, match=r"topology.degree \(3\) with 7 workers: a 3-regular"):
        graph("regular", 7, degree=3)


def test_members_must_be_sorted_and_distinct():
    topo = Topology("ring")
    for members in [(3, 1, 2), (1, 1, 2), ()]:
        with pytest.raises(ValueError, match="members"):
            topo.matrix(0, members)
    with pytest.raises(ValueError, match="worker"):
        topo.receivers(0, 9, (1, 2, 3))


def test_cache_returns_the_same_read_only_matrix():
    topo = Topology("regular", seed=5)
    members = (0, 2, 3, 5, 8, 9)
    w = topo.matrix(0, members)
    assert topo.matrix(0, members) is w
    assert topo.matrix(7, members) is w  # a static topology ignores the round
    assert not w.flags.writeable


def test_time_varying_static_name_redraws_each_round():
    topo = Topology("regular", seed=5, time_varying=True)
    members = tuple(range(10))
    assert topo.matrix(1, members) is topo.matrix(1, members)
    matrices = [topo.matrix(r, members) for r in range(6)]
    assert any(not np.array_equal(matrices[0], w) for w in matrices[1:])
    ring = Topology("ring", time_varying=True)  # allowed; the same ring every round
    assert ring.matrix(0, members) is ring.matrix(4, members)


def test_rows_and_neighbours_in_worker_ids():
    topo = Topology("ring")
    members = (2, 5, 7, 11)
    assert topo.rows(0, members)[5] == pytest.approx({2: 1 / 3, 5: 1 / 3, 7: 1 / 3})
    assert topo.receivers(0, 2, members) == (5, 11)
    peer = Topology("one_peer_exponential")
    assert set(peer.rows(0, members)[2]) == {2, 5}  # node 0 receives from node 1
    assert peer.receivers(0, 2, members) == (11,)


def test_describe():
    assert Topology("ring").describe(tuple(range(8))) == {
        "name": "ring", "nodes": 8, "edges": 8, "max_degree": 2,
        "spectral_gap": pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / 8)) / 3),
        "time_varying": False}
    peer = Topology("one_peer_exponential").describe(tuple(range(8)))
    assert peer["edges"] == 8 and peer["max_degree"] == 2 and peer["time_varying"] is True
