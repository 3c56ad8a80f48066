"""Gossip: no global collective, each worker averages with its neighbours on a topology.

* **Decentralized SGD** (D-PSGD, Lian et al. 2017, "Can Decentralized Algorithms Outperform
  Centralized Algorithms?"): every ``sync_every`` inner steps (default 1) each worker's
  parameters become its row of the mixing matrix applied to its neighbours' parameters,
  ``x_i ← Σ_j W_ij x_j``. On a complete graph with uniform weights, one gossip step and plain
  SGD this is DDP's update exactly (up to float rounding).
* **Gossip DiLoCo**: DiLoCo's rounds with neighbour averaging in place of the all-reduce. Each
  worker keeps its own global parameters ``θ_i`` and outer optimizer. What crosses the wire
  (``send``):

  - ``"local"`` (one vector): its parameters after the inner steps, ``θ_i^loc``. It takes its
    outer step from ``θ_i`` with ``Δ̄_i = θ_i − Σ_j W_ij θ_j^loc = Σ_j W_ij Δ_j +
    Σ_j W_ij (θ_i − θ_j)``: the neighbours' pseudo-gradients averaged, plus a pull toward
    their global parameters.
  - ``"two_phase"`` (one vector, twice): ``Δ_i`` first, mixed; the outer step from ``θ_i``
    with ``Δ̄_i``; then the results ``θ_i⁺``, mixed: ``θ_i ← Σ_j W_ij θ_j⁺`` (two exchanges
    in a row, each waiting for the last).

  Three other readings trained worse at the same bytes and are not offered (docs/gossip.md):
  ``[Δ_i, θ_i]`` mixed in one message, the worker's own outer step before mixing, and that
  with the outer momentum mixed too.

Both take several gossip steps per round (``gossip_steps``: ``W^k``, DFedSAM-MGS) and an
optional single exact average of every worker's global parameters after the last round
(``final_merge``, "A Single Merging Suffices"). Neither has shared state: each worker's
parameters are its own, so the run evaluates their average and reports the consensus
distance (the engine does; ``shares_parameters = False``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from islands.algorithms.base import Algorithm, Contribution, Worker
from islands.algorithms.outer import OuterConfig, outer_factory
from islands.algorithms.schedule import SyncEvery, sync_every_setting
from islands.algorithms.topology import Topology
from islands.core.registry import register
from islands.core.sections import AlgorithmConfig, check

OuterFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Mixing:
    """What both gossip algorithms share (held, not inherited): the round's topology among
    its members, and a contribution mixed over it.

    Args:
        topology: the graph and its mixing matrices.
        gossip_steps: exchanges per sync (``W^k``).
        variance_correction: rescale each tensor of mixed parameters to the spread the
            mixed models had (:mod:`islands.collectives.neighbours`).
    """

    def __init__(self, topology: Topology, gossip_steps: int = 1,
                 variance_correction: bool = False) -> None:
        if gossip_steps < 1:
            raise ValueError(f"gossip_steps ({gossip_steps}) must be >= 1")
        self.topology, self.gossip_steps = topology, gossip_steps
        self.variance_correction = variance_correction
        self.round, self.members = 0, ()

    def begin_round(self, group, round: int) -> None:
        self.round, self.members = round, tuple(group.members)

    def contribution(self, worker: Worker, tensor: torch.Tensor, tag: str) -> Contribution:
        """``tensor`` mixed with the worker's neighbours' in this round's graph (a neighbour
        gone or behind a cut link is left out by the collective, its weight kept by the
        worker: :func:`~islands.collectives.neighbours.start_neighbours`)."""
        r, me = self.round, worker.id
        segments = (tuple(p.numel() for p in worker.params)
                    if self.variance_correction and tag == "parameters" else ())
        return Contribution(tensor, tag=tag, collective="neighbours",
                            mixing=dict(self.topology.rows(r, self.members)[me]),
                            send_to=tuple(self.topology.receivers(r, me, self.members)),
                            steps=self.gossip_steps, segments=segments)

    def describe(self) -> dict:
        """The topology's facts for ``summary.json`` (its name only before any round)."""
        if not self.members:
            return {"name": self.topology.name}
        return self.topology.describe(self.members)


class DSGD(Algorithm):
    """Decentralized SGD: local steps, then parameters mixed with the neighbours'."""

    name = "dsgd"
    shares_parameters = False

    def __init__(self, sync_every: SyncEvery, *, mixing: Mixing,
                 final_merge: bool = False) -> None:
        super().__init__(sync_every)
        self.mixing, self.final_merge = mixing, final_merge
        self.describe = mixing.describe

    def begin_round(self, group, workers: list[Worker], round: int) -> None:
        self.mixing.begin_round(group, round)

    def shared_state(self, worker: Worker) -> dict[str, torch.Tensor]:
        return {}  # each worker's parameters are its own

    def contribute(self, worker: Worker, observers: tuple[int, ...] = ()
                   ) -> list[Contribution]:
        return [self.mixing.contribution(worker, worker.flat_params(), "parameters")]

    @torch.no_grad()
    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        worker.global_params = reduced[0].clone()
        worker.load_flat(worker.global_params)
        worker.samples = 0


class GossipDiLoCo(Algorithm):
    """DiLoCo with neighbour averaging in place of the all-reduce (``send`` says of what)."""

    name = "gossip_diloco"
    shares_parameters = False

    def __init__(self, sync_every: SyncEvery, *, mixing: Mixing, outer: OuterFactory,
                 send: str = "two_phase", final_merge: bool = False, pull: float = 1.0
                 ) -> None:
        """``pull`` (``send = "local"`` only): the weight of the pull toward the neighbours'
        global parameters beside their averaged pseudo-gradient, ``Δ̄_i = Σ_j W_ij Δ_j +
        pull · Σ_j W_ij (θ_i − θ_j)`` (NoLoCo's ``γ/β``); other than 1 it needs the global
        parameters too, a second vector a round."""
        super().__init__(sync_every)
        if send not in SENDS:
            raise ValueError(f"send ({send!r}) must be one of {SENDS}")
        if pull != 1.0 and send != "local":
            raise ValueError(f"pull ({pull}) needs send = 'local'")
        self.mixing, self.final_merge = mixing, final_merge
        self.describe = mixing.describe
        self.outer_factory, self.send, self.pull = outer, send, pull

    def begin_round(self, group, workers: list[Worker], round: int) -> None:
        self.mixing.begin_round(group, round)

    def shared_state(self, worker: Worker) -> dict[str, torch.Tensor]:
        return {}  # each worker's parameters and outer state are its own

    def attach(self, worker: Worker) -> None:
        worker.global_params = nn.Parameter(worker.flat_params().clone())
        worker.outer = self.outer_factory([worker.global_params])
        worker.second_exchange = False  # two_phase: the round's second exchange is next

    def load_shared_state(self, worker: Worker, state: dict[str, torch.Tensor], *,
                          reset_params: bool = True) -> None:
        super().load_shared_state(worker, state, reset_params=reset_params)
        worker.second_exchange = False  # a state loaded (a joiner, a round undone) starts one

    def contribute(self, worker: Worker, observers: tuple[int, ...] = ()
                   ) -> list[Contribution]:
        if self.send == "local":
            local = [self.mixing.contribution(worker, worker.flat_params(), "parameters")]
            if self.pull == 1.0:
                return local
            return [*local, self.mixing.contribution(
                worker, worker.global_params.detach().clone(), "global parameters")]
        theta = worker.global_params.detach()
        if worker.second_exchange:  # two_phase: the stepped parameters
            return [self.mixing.contribution(worker, theta.clone(), "parameters")]
        return [self.mixing.contribution(worker, theta - worker.flat_params(),
                                         "pseudo-gradient")]

    def syncs_again(self, worker: Worker) -> bool:
        return worker.second_exchange

    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        if self.send == "local":
            theta = worker.global_params.detach()
            delta = theta - reduced[0]  # the mean pseudo-gradient plus the pull (weight 1)
            if self.pull != 1.0:
                delta.add_(theta - reduced[1], alpha=self.pull - 1.0)
            self._outer_step(worker, delta)
        elif not worker.second_exchange:  # two_phase, the mixed pseudo-gradient
            self._outer_step(worker, reduced[0])
            worker.second_exchange = True  # the stepped parameters go out next
            return
        else:  # two_phase, the mixed stepped parameters
            worker.second_exchange = False
            with torch.no_grad():
                worker.global_params.copy_(reduced[0])
        worker.load_flat(worker.global_params.detach())
        worker.samples = 0

    @staticmethod
    def _outer_step(worker: Worker, delta: torch.Tensor) -> None:
        worker.global_params.grad = delta
        worker.outer.step()
        worker.global_params.grad = None


SENDS = ("two_phase", "local")  # what gossip DiLoCo sends its neighbours


@dataclass(frozen=True, kw_only=True)
class TopologyConfig:
    """``[topology]``: the graph gossip algorithms mix over (:mod:`islands.algorithms.topology`).

    Attributes:
        name: ``"ring"``, ``"torus"``, ``"exponential"``, ``"regular"``,
            ``"barabasi_albert"``, ``"complete"``, or a time-varying one: ``"matching"`` (a
            new random matching every round), ``"one_peer_exponential"``.
        degree: a random regular graph's degree (default 3), Barabási-Albert's edges per new
            node (default 2); None: the default.
        seed: the random graphs' seed (None: the run's).
        time_varying: redraw a random graph every round (None: only the time-varying names).
        gossip_steps: gossip steps per round (each one exchange with the neighbours).
        variance_correction: after mixing parameters, rescale each tensor to the spread the
            mixed models had (variance-corrected averaging; not for mixed pseudo-gradients).
    """

    name: str = "ring"
    degree: int | None = None
    seed: int | None = None
    time_varying: bool | None = None
    gossip_steps: int = 1
    variance_correction: bool = False

    def __post_init__(self) -> None:
        check(self.gossip_steps >= 1, "topology.gossip_steps", self.gossip_steps,
              "must be >= 1")
        self.build(0)  # the name, degree and time_varying are checked here

    def build(self, run_seed: int) -> Topology:
        return Topology(self.name, degree=self.degree, seed=self._seed(run_seed),
                        time_varying=self.time_varying)

    def mixing(self, run_seed: int, *, pairs: bool = False) -> Mixing:
        """The mixing over this graph (``pairs``: over a new random pairing every round
        instead, NoLoCo's groups), with this section's gossip steps and correction."""
        topology = (Topology("matching", seed=self._seed(run_seed)) if pairs
                    else self.build(run_seed))
        return Mixing(topology, self.gossip_steps, self.variance_correction)

    def _seed(self, run_seed: int) -> int:
        return run_seed if self.seed is None else self.seed


@register("algorithm", "dsgd", sections={"topology": TopologyConfig})
@dataclass(frozen=True, kw_only=True)
class DSGDConfig(AlgorithmConfig):
    """``[algorithm] name = "dsgd"``: decentralized SGD over ``[topology]``.

    Attributes:
        sync_every: inner steps between gossip exchanges (1: D-PSGD; more: gossip local SGD).
        final_merge: average every worker's parameters exactly once, after the last round.
    """

    name: str = "dsgd"
    sync_every: int | tuple[tuple[int, int], ...] = 1
    final_merge: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sync_every", sync_every_setting(self.sync_every))

    def build(self, run, aggregator) -> DSGD:
        _plain_mean(run)
        return DSGD(self.sync_every, mixing=run.topology.mixing(run.seed),
                    final_merge=self.final_merge)


@register("algorithm", "gossip_diloco", sections={"outer": OuterConfig,
                                                  "topology": TopologyConfig})
@dataclass(frozen=True, kw_only=True)
class GossipDiLoCoConfig(AlgorithmConfig):
    """``[algorithm] name = "gossip_diloco"``: DiLoCo over ``[topology]``, outer optimizer
    ``[outer]`` (each worker its own).

    Attributes:
        sync_every: inner steps per round (H).
        send: what each worker sends its neighbours: ``"two_phase"`` (its pseudo-gradient,
            then its global parameters after its outer step: two exchanges a round) or
            ``"local"`` (its parameters after the inner steps: one); see
            :mod:`islands.algorithms.gossip`.
        final_merge: average every worker's global parameters exactly once, after the last
            round.
    """

    name: str = "gossip_diloco"
    sync_every: int | tuple[tuple[int, int], ...] = 50
    send: str = "two_phase"
    final_merge: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sync_every", sync_every_setting(self.sync_every))
        check(self.send in SENDS, "algorithm.send", self.send,
              f"must be one of {', '.join(repr(x) for x in SENDS)}")

    def build(self, run, aggregator) -> GossipDiLoCo:
        _plain_mean(run)
        return GossipDiLoCo(self.sync_every, mixing=run.topology.mixing(run.seed),
                            outer=outer_factory(run.outer), send=self.send,
                            final_merge=self.final_merge)


@register("algorithm", "noloco", sections={"outer": OuterConfig, "topology": TopologyConfig})
@dataclass(frozen=True, kw_only=True)
class NoLoCoConfig(AlgorithmConfig):
    """``[algorithm] name = "noloco"``: NoLoCo (Kolehmainen et al. 2025, "No-all-reduce Low
    Communication"): every H inner steps each worker averages with a small random group
    instead of everyone, and its outer step pulls it toward the group.

    With the authors' reference code's rule (the pseudo-gradient's and the pull's step sizes
    both the outer lr), worker ``i`` of group ``G`` takes its outer step from its own global
    parameters ``φ_i`` with ``g_i = φ_i − mean_{j∈G} θ_j^loc = mean_{j∈G} Δ_j + (φ_i −
    mean_{j∈G} φ_j)``: the group's mean pseudo-gradient plus the distance to the group's mean
    global parameters. That is gossip DiLoCo with ``send = "local"`` (one vector a round) over
    a new random pairing each round; the reference steps with heavy-ball momentum
    (``outer.nesterov = false``), and ``[outer]`` chooses.

    Attributes:
        sync_every: inner steps per round (H).
        groups: ``"pairs"``: a new random pairing of the members every round (the paper's
            groups of two; with an odd count one member keeps its own), seeded by
            ``topology.seed`` (default: the run's); ``"topology"``: the ``[topology]`` graph's
            neighbours, with its Metropolis-Hastings weights.
        final_merge: average every worker's global parameters exactly once, after the last
            round.
        pull: the pull's weight relative to the pseudo-gradient's, the paper's ``γ/β``:
            ``g_i = mean_{j∈G} Δ_j + pull · (φ_i − mean_{j∈G} φ_j)``. 1 (the reference
            code's rule) sends one vector a round; any other value sends ``φ_i`` as well,
            twice the bytes.
    """

    name: str = "noloco"
    sync_every: int | tuple[tuple[int, int], ...] = 50
    groups: str = "pairs"
    final_merge: bool = False
    pull: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sync_every", sync_every_setting(self.sync_every))
        check(self.pull >= 0, "algorithm.pull", self.pull,
              "must be >= 0 (1: the reference rule, one vector a round)")
        check(self.groups in ("pairs", "topology"), "algorithm.groups", self.groups,
              "must be 'pairs' (a random pairing each round) or 'topology' (the [topology] "
              "graph)")

    def build(self, run, aggregator) -> GossipDiLoCo:
        _plain_mean(run)
        return GossipDiLoCo(self.sync_every,
                            mixing=run.topology.mixing(run.seed, pairs=self.groups == "pairs"),
                            outer=outer_factory(run.outer), send="local",
                            final_merge=self.final_merge, pull=float(self.pull))


def _plain_mean(run) -> None:
    """Gossip mixes with the topology's weights: a robust rule would be ignored."""
    check(run.aggregator.name == "mean", "aggregator.name", run.aggregator.name,
          f"is not used by algorithm.name = {run.algorithm.name!r} (gossip mixes with the "
          "topology's weights); remove it")
