"""Gossip topologies and their mixing matrices, for decentralized training.

In decentralized SGD (Lian et al. 2017, "Can Decentralized Algorithms Outperform Centralized
Algorithms? A Case Study for Decentralized Parallel Stochastic Gradient Descent") each worker
averages with its neighbours on a graph, ``x_i <- sum_j W[i, j] x_j``, where ``W[i, j]`` is
the weight worker ``i`` puts on what it receives from worker ``j``. ``W`` is doubly
stochastic, so the mean over workers is kept, and ``1 - |lambda_2(W)|`` (the spectral gap)
says how fast the workers agree.

Undirected graphs get Metropolis-Hastings weights, ``W[i, j] = 1 / (1 + max(d_i, d_j))``;
the one-peer exponential graph (Ying et al. 2021, "Exponential Graph is Provably Efficient
for Decentralized Deep Training") is directed and changes every round: in round ``r`` worker
``i`` receives only from ``i + 2**(r mod ceil(log2 n))`` and averages half and half.

:class:`Topology` maps a graph over ``0..n-1`` onto the sorted ids of the current members of
a group, and caches each round's matrix (as a read-only array).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import networkx as nx
import numpy as np

from islands.core.errors import ConfigError

NAMES = ("ring", "torus", "exponential", "regular", "barabasi_albert", "complete",
         "matching", "one_peer_exponential")
TIME_VARYING = ("matching", "one_peer_exponential")  # a new graph every round
SEEDLESS = ("ring", "torus", "exponential", "complete")  # the seed changes nothing
REGULAR_TRIES = 100  # draws of a random regular graph before giving up on a connected one
CACHE_ENTRIES = 256  # (round, members) matrices kept; a time-varying run needs one per round


def _torus(n: int, degree: int | None, seed: int, round: int) -> nx.Graph:
    rows = max((r for r in range(2, math.isqrt(n) + 1) if n % r == 0), default=0)
    if rows < 2:
        raise ConfigError(
            f"topology.name ('torus') with {n} workers: a torus needs rows r dividing the "
            f"workers with 2 <= r <= sqrt(workers), and {n} is prime or below 4; use ring")
    cols = n // rows
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    return nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid.nodes})


def _exponential(n: int, degree: int | None, seed: int, round: int) -> nx.Graph:
    g = nx.empty_graph(n)
    g.add_edges_from((i, (i + 2**k) % n) for i in range(n) for k in range((n - 1).bit_length()))
    return g


def _check_regular(n: int, d: int) -> None:
    where = f"topology.degree ({d}) with {n} workers: a {d}-regular graph"
    if n < 2:
        raise ConfigError(f"{where} needs at least 2 workers; use complete")
    if not 1 <= d < n:
        raise ConfigError(f"{where} needs 1 <= degree < workers; use a degree from 1 to {n - 1}")
    if n * d % 2:
        raise ConfigError(f"{where} needs workers * degree even; use an even degree")
    if d == 1 and n > 2:
        raise ConfigError(f"{where} is a matching and never connected; use a degree of 2 or more")


def _regular(n: int, degree: int | None, seed: int, round: int) -> nx.Graph:
    d = 3 if degree is None else degree
    _check_regular(n, d)
    for attempt in range(REGULAR_TRIES):
        g = nx.random_regular_graph(d, n, seed=seed + attempt)
        if nx.is_connected(g):
            return g
    raise ConfigError(
        f"topology.degree ({d}) with {n} workers: no connected {d}-regular graph in "
        f"{REGULAR_TRIES} draws from seed {seed}; use a larger degree")


def _barabasi_albert(n: int, degree: int | None, seed: int, round: int) -> nx.Graph:
    m = 2 if degree is None else degree
    if not 1 <= m < n:
        fix = "use complete" if n < 2 else f"use a degree from 1 to {n - 1}"
        raise ConfigError(
            f"topology.degree ({m}) with {n} workers: barabasi_albert attaches each new worker "
            f"to degree others, which needs 1 <= degree < workers; {fix}")
    return nx.barabasi_albert_graph(n, m, seed=seed)


def _matching(n: int, degree: int | None, seed: int, round: int) -> nx.Graph:
    order = np.random.default_rng([seed, round]).permutation(n).tolist()
    g = nx.empty_graph(n)
    g.add_edges_from(zip(order[0:n - 1:2], order[1::2]))  # n odd: the last one sits out
    return g


def _one_peer_exponential(n: int, degree: int | None, seed: int, round: int) -> nx.DiGraph:
    tau = max(1, (n - 1).bit_length())  # ceil(log2 n)
    shift = 2 ** (round % tau)
    g = nx.empty_graph(n, create_using=nx.DiGraph)
    if n > 1:
        g.add_edges_from(((i + shift) % n, i) for i in range(n))  # i receives from i + shift
    return g


BUILDERS: dict[str, Callable[..., nx.Graph]] = {  # (n, degree, seed, round) -> graph
    "ring": lambda n, *_: nx.cycle_graph(n) if n > 1 else nx.empty_graph(n),  # no self-loop
    "complete": lambda n, *_: nx.complete_graph(n), "torus": _torus,
    "exponential": _exponential, "regular": _regular, "barabasi_albert": _barabasi_albert,
    "matching": _matching, "one_peer_exponential": _one_peer_exponential,
}


def check_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is one of :data:`NAMES`."""
    if name not in NAMES:
        raise ConfigError(f"topology.name ({name!r}) is not a topology; use one of "
                          f"{', '.join(NAMES)}")


def graph(name: str, n: int, *, degree: int | None = None, seed: int = 0,
          round: int = 0) -> nx.Graph | nx.DiGraph:
    """The graph ``name`` over nodes ``0..n-1``.

    Args:
        name: one of :data:`NAMES`.
        n: number of nodes (workers), at least 1.
        degree: the degree of ``regular`` (default 3) or the ``m`` of ``barabasi_albert``
            (default 2); ignored by the other names.
        seed: seed of the random graphs (``regular``, ``barabasi_albert``, ``matching``).
        round: the round of a time-varying graph (``matching``, ``one_peer_exponential``).

    Returns:
        An undirected graph, or for ``one_peer_exponential`` a directed one with an edge
        ``j -> i`` when worker ``i`` receives from ``j``.

    Raises:
        ConfigError: the name is unknown, or cannot form a graph of ``n`` nodes.
    """
    check_name(name)
    if n < 1:
        raise ValueError(f"n ({n}) must be at least 1: a graph needs a worker")
    return BUILDERS[name](n, degree, seed, round)


def _directed_matrix(g: nx.DiGraph, n: int) -> np.ndarray:
    if nx.number_of_selfloops(g) or any(
            g.in_degree(i) != g.out_degree(i) or g.in_degree(i) > 1 for i in range(n)):
        raise ValueError("a directed gossip graph must give every node in-degree = out-degree "
                         "<= 1 and no self-loop (disjoint directed cycles), or W is not "
                         "doubly stochastic")
    w = np.eye(n)
    for src, dst in g.edges:
        w[dst, dst], w[dst, src] = 0.5, 0.5
    return w


def mixing_matrix(g: nx.Graph | nx.DiGraph) -> np.ndarray:
    """The doubly stochastic mixing matrix of ``g``; ``W[i, j]`` is what ``i`` takes from ``j``.

    Args:
        g: a graph over nodes ``0..n-1``. Undirected: Metropolis-Hastings weights
            ``W[i, j] = 1 / (1 + max(d_i, d_j))`` on edges and ``W[i, i] = 1 - sum_j W[i, j]``
            (self-loops ignored). Directed: each node has in-degree = out-degree <= 1;
            ``W[i, i] = W[i, src] = 1/2`` for the edge ``src -> i``, else ``W[i, i] = 1``.

    Returns:
        ``(n, n)`` float64 array, rows and columns summing to 1.
    """
    n = g.number_of_nodes()
    if set(g.nodes) != set(range(n)):
        raise ValueError(f"graph nodes must be 0..{n - 1}; relabel them first")
    if g.is_directed():
        return _directed_matrix(g, n)
    adjacent = nx.to_numpy_array(g, nodelist=range(n), dtype=np.float64) > 0
    np.fill_diagonal(adjacent, False)
    degrees = adjacent.sum(axis=1)
    w = adjacent / (1.0 + np.maximum.outer(degrees, degrees))
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def spectral_gap(w: np.ndarray) -> float:
    """``1 - |lambda_2|``, the second largest eigenvalue modulus of ``w`` (``(n, n)``).

    1.0 for one node; 0.0 when the graph is disconnected (rounding clipped to 0).
    """
    if w.shape[0] < 2:
        return 1.0
    moduli = np.sort(np.abs(np.linalg.eigvals(w)))
    return float(max(0.0, 1.0 - moduli[-2]))


class Topology:
    """The graph the workers of a run gossip over, round by round, among the current members.

    Args:
        name: one of :data:`NAMES`.
        degree: the degree of ``regular`` or the ``m`` of ``barabasi_albert`` (None: their
            defaults, 3 and 2).
        seed: seed of the random graphs, non-negative.
        time_varying: draw a new graph every round (None: only for :data:`TIME_VARYING`
            names). True for a static random name redraws it each round from
            ``(seed, round)``; for ring, torus, exponential and complete it changes nothing.

    Raises:
        ConfigError: unknown name, bad degree or seed, or ``time_varying=False`` for a name
            that changes every round.
    """

    def __init__(self, name: str, *, degree: int | None = None, seed: int = 0,
                 time_varying: bool | None = None) -> None:
        check_name(name)
        if degree is not None and not (_is_int(degree) and degree >= 1):
            raise ConfigError(f"topology.degree ({degree!r}) must be a positive integer; "
                              f"use 1 or more, or leave it unset for the default")
        if not (_is_int(seed) and seed >= 0):
            raise ConfigError(f"topology.seed ({seed!r}) must be a non-negative integer; "
                              f"use 0 or more")
        if time_varying is False and name in TIME_VARYING:
            raise ConfigError(f"topology.time_varying (false) contradicts topology.name "
                              f"({name!r}), which changes every round; use true or leave it "
                              f"unset")
        self.name, self.degree, self.seed = name, degree, seed
        self.time_varying = name in TIME_VARYING if time_varying is None else time_varying
        self._cache: OrderedDict[tuple, tuple[nx.Graph, np.ndarray]] = OrderedDict()

    def _graph_seed(self, round: int) -> tuple[int, int]:
        """(round key, seed) of the graph used in ``round``."""
        if not self.time_varying or self.name in SEEDLESS:
            return 0, self.seed
        if self.name in TIME_VARYING:
            return round, self.seed
        return round, int(np.random.default_rng([self.seed, round]).integers(2**31 - 1))

    def _entry(self, round: int, members: tuple[int, ...]) -> tuple[nx.Graph, np.ndarray]:
        members = _check_members(members)
        if not (_is_int(round) and round >= 0):
            raise ValueError(f"round ({round!r}) must be a non-negative integer")
        key, seed = self._graph_seed(int(round))
        if (key, members) not in self._cache:
            g = graph(self.name, len(members), degree=self.degree, seed=seed, round=key)
            w = mixing_matrix(g)
            w.setflags(write=False)  # shared by every caller of the cache
            self._cache[key, members] = (g, w)
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        self._cache.move_to_end((key, members))
        return self._cache[key, members]

    def matrix(self, round: int, members: tuple[int, ...]) -> np.ndarray:
        """The ``(len(members), len(members))`` read-only mixing matrix of ``round``; node
        ``k`` is worker ``members[k]`` (sorted ascending, distinct). A static topology
        ignores ``round``."""
        return self._entry(round, members)[1]

    def rows(self, round: int, members: tuple[int, ...]) -> dict[int, dict[int, float]]:
        """``{i: {j: W[i, j]}}`` in worker ids, for every ``j`` with ``W[i, j] > 0`` (``i``
        itself included): what each worker takes from whom."""
        w, members = self.matrix(round, members), tuple(members)
        return {i: {members[b]: float(w[a, b]) for b in np.flatnonzero(w[a] > 0)}
                for a, i in enumerate(members)}

    def receivers(self, round: int, worker: int, members: tuple[int, ...]) -> tuple[int, ...]:
        """The workers that receive from ``worker`` in ``round`` (itself excluded), sorted."""
        w, k, members = self.matrix(round, members), _index(worker, members), tuple(members)
        return tuple(members[i] for i in np.flatnonzero(w[:, k] > 0) if i != k)

    def spectral_gap(self, round: int, members: tuple[int, ...]) -> float:
        """``1 - |lambda_2|`` of the matrix of ``round`` (see :func:`spectral_gap`)."""
        return spectral_gap(self.matrix(round, members))

    def describe(self, members: tuple[int, ...]) -> dict:
        """Name, nodes, edges (directed edges for a directed graph), max degree (in + out
        for a directed graph), spectral gap and time-varying flag, of round 0."""
        g, w = self._entry(0, members)
        return {"name": self.name, "nodes": g.number_of_nodes(), "edges": g.number_of_edges(),
                "max_degree": max((d for _, d in g.degree), default=0),
                "spectral_gap": spectral_gap(w), "time_varying": self.time_varying}


def _check_members(members: tuple[int, ...]) -> tuple[int, ...]:
    members = tuple(members)
    if not members or not all(_is_int(m) for m in members) or any(
            a >= b for a, b in zip(members, members[1:])):
        raise ValueError(f"members ({members}) must be distinct worker ids in ascending order "
                         f"and at least one; sort them with tuple(sorted(set(members)))")
    return members


def _index(worker: int, members: tuple[int, ...]) -> int:
    if worker not in members:
        raise ValueError(f"worker ({worker}) is not one of the members {tuple(members)}")
    return tuple(members).index(worker)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
