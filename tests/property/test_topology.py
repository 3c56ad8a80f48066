"""Every gossip topology's mixing matrix is doubly stochastic and non-negative (symmetric when
the graph is undirected), its spectral gap agrees with a plain numpy reference, connected
graphs mix, and :class:`Topology` speaks in worker ids and is a pure function of
``(seed, round)``."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from islands.algorithms.topology import (
    NAMES,
    TIME_VARYING,
    Topology,
    graph,
    mixing_matrix,
    spectral_gap,
)
from islands.core.errors import ConfigError

STATIC = tuple(name for name in NAMES if name not in TIME_VARYING)
DIRECTED = ("one_peer_exponential",)

sizes = st.integers(1, 24)
seeds = st.integers(0, 2**20)
rounds = st.integers(0, 50)
degrees = st.none() | st.integers(1, 6)


def build(name: str, n: int, degree: int | None, seed: int, round: int) -> nx.Graph:
    """The graph, or skip the example when the combination is refused by design."""
    try:
        return graph(name, n, degree=degree, seed=seed, round=round)
    except ConfigError:
        assume(False)


def reference_gap(w: np.ndarray) -> float:
    if len(w) < 2:
        return 1.0
    return max(0.0, 1.0 - sorted(abs(np.linalg.eigvals(w)))[-2])


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30)
@given(n=sizes, degree=degrees, seed=seeds, round=rounds)
def test_matrix_is_doubly_stochastic(name, n, degree, seed, round):
    w = mixing_matrix(build(name, n, degree, seed, round))
    assert w.shape == (n, n) and w.dtype == np.float64
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    if name not in DIRECTED:
        np.testing.assert_array_equal(w, w.T)
    assert spectral_gap(w) == pytest.approx(reference_gap(w), abs=1e-9)


@pytest.mark.parametrize("name", STATIC)
@settings(max_examples=30)
@given(n=st.integers(2, 24), degree=degrees, seed=seeds)
def test_connected_static_graphs_mix(name, n, degree, seed):
    g = build(name, n, degree, seed, 0)
    assert nx.is_connected(g), name  # every static name builds a connected graph
    assert spectral_gap(mixing_matrix(g)) > 1e-9


@settings(max_examples=30)
@given(n=st.integers(2, 24))
def test_complete_graph_averages_in_one_step(n):
    w = mixing_matrix(graph("complete", n))
    np.testing.assert_allclose(w, 1.0 / n, rtol=0, atol=1e-12)
    assert spectral_gap(w) == pytest.approx(1.0, abs=1e-9)


@st.composite
def member_sets(draw) -> tuple[int, ...]:
    """A random sorted subset of worker ids (gaps in it, as after failures)."""
    ids = draw(st.sets(st.integers(0, 40), min_size=1, max_size=24))
    return tuple(sorted(ids))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30)
@given(members=member_sets(), degree=degrees, seed=seeds, round=rounds)
def test_rows_and_receivers_in_worker_ids(name, members, degree, seed, round):
    topo = Topology(name, degree=degree, seed=seed)
    try:
        rows = topo.rows(round, members)
    except ConfigError:
        assume(False)
    assert tuple(rows) == members
    for i, row in rows.items():
        assert set(row) <= set(members) and i in row
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-12)
    for i in members:  # j sends to i exactly when i's row takes from j
        for j in members:
            takes = j != i and j in rows[i]
            assert takes == (i in topo.receivers(round, j, members))


@pytest.mark.parametrize("name", TIME_VARYING + ("regular", "barabasi_albert"))
@settings(max_examples=30)
@given(n=st.integers(1, 24), seed=seeds, round=rounds)
def test_time_varying_is_a_pure_function_of_seed_and_round(name, n, seed, round):
    members = tuple(range(n))
    first, second = Topology(name, seed=seed, time_varying=True), Topology(
        name, seed=seed, time_varying=True)
    try:
        w = first.matrix(round, members)
    except ConfigError:
        assume(False)
    np.testing.assert_array_equal(w, second.matrix(round, members))


@settings(max_examples=30)
@given(n=st.integers(4, 24), seed=seeds)
def test_matching_changes_between_rounds(n, seed):
    topo = Topology("matching", seed=seed)
    members = tuple(range(n))
    matrices = [topo.matrix(r, members) for r in range(8)]
    # 8 rounds all drawing the same matching out of at least 3 has odds below 3**-7.
    assert any(not np.array_equal(matrices[0], w) for w in matrices[1:])
