"""Data-parallel baseline (PyTorch DDP, Li et al. 2020): all-reduce the gradients at every
inner step, so every worker applies the same averaged gradient. No communication/compute
overlap is modeled: each step pays its all-reduce in full."""

from __future__ import annotations

import torch

from islands.algorithms.base import Algorithm, Contribution, Worker


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
        return [Contribution(worker.flat_grads(), tag="gradient")]

    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        """Replicas stay identical because they apply identical gradients."""
        worker.load_flat_grads(reduced[0])

    def global_state(self, worker: Worker) -> torch.Tensor:
        return worker.flat_params()
