"""Local SGD / FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data"): every ``sync_every`` inner steps the workers average their
parameters, weighted by sample counts; each round a fraction ``C`` of workers takes part.

Equal to DiLoCo with an outer SGD of lr 1 and no momentum. Workers drawn for a round after
sitting one out first receive the current global parameters from a worker of the previous
round (exact fp32, counted like every other byte).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from islands.algorithms.base import Algorithm, Contribution, Worker
from islands.algorithms.schedule import sync_every_setting
from islands.core.registry import register
from islands.core.sections import AlgorithmConfig, check
from islands.core.seeding import derive_seed


class LocalSGD(Algorithm):
    """FedAvg / Local SGD.

    Args:
        sync_every: inner steps per round.
        participation: FedAvg's C, fraction of workers drawn per round (from the seed).
        weighting: ``"samples"`` (samples trained this round), ``"dataset"`` (partition
            size, FedAvg's n_k) or ``"uniform"``.
        seed: draws the participants of each round.
        remember: refresh stale workers from a worker this process saw drawn for the last
            round, among the members still there (MoDeST; the simulator, which sees every
            round), rather than from the last round's draw recomputed over the current
            members (what every process of a real run computes alike, even a joiner).
        aggregator: combines each shard's parameters (default: the weighted mean).
    """

    name = "local_sgd"

    def __init__(self, sync_every: int, *, participation: float = 1.0,
                 weighting: str = "samples", seed: int = 0, remember: bool = False,
                 **kwargs) -> None:
        super().__init__(sync_every, **kwargs)
        if not 0 < participation <= 1:
            raise ValueError(f"participation ({participation}) must be in (0, 1]")
        if weighting not in ("samples", "dataset", "uniform"):
            raise ValueError(f"weighting ({weighting!r}) must be samples, dataset or uniform")
        self.participation = participation
        self.weighting = weighting
        self.seed = seed
        self.remember = remember
        self._drawn: tuple[int, ...] = ()  # remember: the last round's participants
        self._holders: tuple[int, ...] = ()  # remember: who holds the latest global state

    def participants(self, round: int, workers: tuple[int, ...]) -> tuple[int, ...]:
        if self.participation >= 1.0 or round < 0:
            return workers
        k = max(1, round_half_up(self.participation * len(workers)))
        rng = np.random.default_rng(derive_seed(self.seed, "participants", round))
        return tuple(sorted(rng.choice(workers, size=k, replace=False).tolist()))

    def refresh(self, round: int, members: tuple[int, ...]
                ) -> tuple[int, tuple[int, ...]] | None:
        """Workers drawn for ``round`` after sitting the last one out receive the global
        state from the first worker of the last round (``remember``: of the last sample
        this process saw that is still there)."""
        if self.participation >= 1.0:
            return None
        now = self.participants(round, members)
        if self.remember:  # the last sample, or, if none of it is left, the one before
            self._holders = tuple(w for w in self._drawn if w in members) or self._holders
            previous = tuple(w for w in self._holders if w in members)
            self._drawn = now
        else:
            previous = self.participants(round - 1, members)
        stale = tuple(w for w in now if w not in previous)
        return (previous[0], stale) if round > 0 and stale and previous else None

    def weight(self, worker: Worker) -> float:
        if self.weighting == "samples":
            return float(worker.samples)
        if self.weighting == "dataset":
            return float(worker.data_size)
        return 1.0

    def can_observe(self) -> bool:
        return self.participation >= 1.0  # a sampled round has no place for extra members

    def contribute(self, worker: Worker, observers: tuple[int, ...] = ()
                   ) -> list[Contribution]:
        weight = 0.0 if worker.id in observers else self.weight(worker)
        return [Contribution(worker.flat_params(), weight, tag="parameters")]

    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        worker.load_flat(reduced[0])
        worker.global_params = reduced[0]
        worker.samples = 0


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


@register("algorithm", "local_sgd")
@dataclass(frozen=True, kw_only=True)
class LocalSGDConfig(AlgorithmConfig):
    """``[algorithm] name = "local_sgd"`` (FedAvg).

    Attributes:
        sync_every: inner steps per round (H), or an H schedule ``[[step, H], ...]`` (see
            ``islands.algorithms.schedule``).
        participation: FedAvg's C, the fraction of workers drawn for each round.
        weighting: how workers are weighted: ``"samples"`` (samples trained this round),
            ``"dataset"`` (size of the worker's partition, FedAvg's n_k) or ``"uniform"``.
    """

    name: str = "local_sgd"
    sync_every: int | tuple[tuple[int, int], ...] = 50
    participation: float = 1.0
    weighting: Literal["samples", "dataset", "uniform"] = "samples"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sync_every", sync_every_setting(self.sync_every))
        check(0 < self.participation <= 1, "algorithm.participation", self.participation,
              "must be in (0, 1]")

    def build(self, run, aggregator) -> LocalSGD:
        return LocalSGD(self.sync_every, participation=self.participation,
                        weighting=self.weighting, seed=run.seed, aggregator=aggregator)


@register("algorithm", "modest")
@dataclass(frozen=True, kw_only=True)
class MoDeSTConfig(AlgorithmConfig):
    """``[algorithm] name = "modest"``: MoDeST (de Vos et al. 2023, "MoDeST: Bridging the Gap
    between Federated and Decentralized Learning with Decentralized Sampling"). Each round a
    random sample of the current members, drawn alike by all from the seed, trains and
    averages among itself (its own all-reduce: no server); the others wait. A worker drawn
    after sitting out first receives the model from a worker of the last round's sample that
    is still there. Workers that stop answering leave the membership, and the sample is drawn
    from those left. The simulator only, for now.

    Attributes:
        sync_every: inner steps per round (H).
        sample_fraction: the fraction of the current members drawn each round (at least one).
        weighting: as ``local_sgd``'s.
    """

    name: str = "modest"
    sync_every: int | tuple[tuple[int, int], ...] = 50
    sample_fraction: float = 0.25
    weighting: Literal["samples", "dataset", "uniform"] = "samples"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sync_every", sync_every_setting(self.sync_every))
        check(0 < self.sample_fraction <= 1, "algorithm.sample_fraction",
              self.sample_fraction, "must be in (0, 1]")

    def build(self, run, aggregator) -> LocalSGD:
        algorithm = LocalSGD(self.sync_every, participation=self.sample_fraction,
                             weighting=self.weighting, seed=run.seed, remember=True,
                             aggregator=aggregator)
        algorithm.name = "modest"
        return algorithm
