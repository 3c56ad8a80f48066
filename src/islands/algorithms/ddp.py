"""Data-parallel baseline (PyTorch DDP, Li et al. 2020): all-reduce the gradients at every
inner step, so every worker applies the same averaged gradient. No communication/compute
overlap is modeled: each step pays its all-reduce in full."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from islands.algorithms.base import Algorithm, Contribution, Worker
from islands.core.registry import register
from islands.core.sections import AlgorithmConfig


class DDP(Algorithm):
    """Gradient all-reduce every inner step (the baseline every paper compares against).

    Args:
        aggregator: combines each shard's gradients (default: the mean).
    """

    name = "ddp"
    syncs_gradients = True

    def __init__(self, **kwargs) -> None:
        super().__init__(sync_every=1, **kwargs)

    def contribute(self, worker: Worker, observers: tuple[int, ...] = ()
                   ) -> list[Contribution]:
        grads = worker.flat_grads()
        # the mean is copied into the gradients at once (apply): its buffer is kept
        return [Contribution(grads, tag="gradient", out=worker.kept("gradient", grads))]

    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        """Replicas stay identical because they apply identical gradients."""
        worker.load_flat_grads(reduced[0])

    def global_state(self, worker: Worker) -> torch.Tensor:
        return worker.flat_params()


@register("algorithm", "ddp")
@dataclass(frozen=True, kw_only=True)
class DDPConfig(AlgorithmConfig):
    """``[algorithm] name = "ddp"``: no settings of its own. It syncs every inner step, so a
    ``sync_every`` (a base config's, in a sweep's DDP baseline) is accepted and ignored."""

    tolerated: ClassVar[frozenset[str]] = frozenset({"sync_every"})
    name: str = "ddp"

    def build(self, run, aggregator) -> DDP:
        return DDP(aggregator=aggregator)
