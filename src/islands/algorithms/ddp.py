"""Data-parallel baseline (PyTorch DDP, Li et al. 2020): all-reduce the gradients at every
inner step, so every worker applies the same averaged gradient. No communication/compute
overlap is modeled: each step pays its all-reduce in full."""

from __future__ import annotations

import torch

from islands.algorithms.base import Algorithm, Worker
from islands.collectives.butterfly import Group


class DDP(Algorithm):
    """Gradient all-reduce every inner step (the baseline every paper compares against)."""

    name = "ddp"

    def __init__(self) -> None:
        super().__init__(sync_every=1)

    def after_backward(self, group: Group, workers: list[Worker]) -> None:
        grads = {w.id: w.flat_grads() for w in workers}
        reduced = group.all_reduce(grads, codecs={w.id: w.codec for w in workers},
                                   tag="gradient")
        for w in workers:
            w.load_flat_grads(reduced[w.id])

    def sync(self, group: Group, workers: list[Worker], round: int,
             observers: tuple[int, ...] = ()) -> None:
        """Nothing to do: replicas stay identical because they apply identical gradients."""

    def global_state(self, worker: Worker) -> torch.Tensor:
        return worker.flat_params()
