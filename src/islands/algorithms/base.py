"""The worker and the algorithm interface shared by every member of the DiLoCo family.

A :class:`Worker` is one model replica with its inner optimizer, its codec and its copy of the
committed global state. An :class:`Algorithm` decides what workers contribute, when, and how
they apply what comes back. Algorithms are written over *the workers this process drives*: the
simulator drives all of them, the real runtime one, and both call the same methods:

    for each round r:
        algorithm.begin_round(group_of_all, workers, r)     # e.g. refresh stale workers
        for each of the round's inner steps:
            worker.backward(x, y) for each participant
            algorithm.after_backward(group, participants)   # DDP reduces gradients here
            worker.apply() for each participant
        algorithm.sync(group, participants, r)              # the round's collective
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn as nn
from torch.nn.utils import parameters_to_vector

from islands.codecs.base import Codec
from islands.collectives.butterfly import Group


@torch.no_grad()
def copy_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copies consecutive slices of ``flat`` into ``tensors`` in place.

    Unlike ``vector_to_parameters`` this never makes the tensors views of ``flat``: a worker's
    parameters aliasing the global state would let inner steps silently rewrite it.
    """
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    assert offset == flat.numel(), (offset, flat.numel())


class Worker:
    """One replica: model, inner optimizer and schedule, codec, committed global state.

    Args:
        id: worker index.
        model: this worker's model replica.
        inner: its inner optimizer (state kept across rounds, never synchronized).
        codec: its codec (may hold per-worker state such as error-feedback residuals).
        scheduler: optional lr scheduler stepped once per inner step.
        grad_clip: max gradient norm, or None.
        dataset_bytes: size of the worker's data partition (FedAvg's n_k).
    """

    def __init__(self, id: int, model: nn.Module, inner: torch.optim.Optimizer, codec: Codec,
                 *, scheduler=None, grad_clip: float | None = None,
                 dataset_bytes: int = 0) -> None:
        self.id = id
        self.model = model
        self.inner = inner
        self.codec = codec
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.dataset_bytes = dataset_bytes
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.global_params: torch.Tensor | None = None  # committed global state, flat
        self.outer: torch.optim.Optimizer | None = None
        self.samples = 0  # samples trained since the last sync
        self.steps = 0  # inner steps taken in total

    def flat_params(self) -> torch.Tensor:
        return parameters_to_vector(self.params).detach()

    def load_flat(self, flat: torch.Tensor) -> None:
        """Copies ``flat`` into the parameters (never aliases: ``flat`` stays untouched)."""
        copy_into(flat, self.params)

    def flat_grads(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.params])

    def load_flat_grads(self, flat: torch.Tensor) -> None:
        copy_into(flat, [p.grad for p in self.params])

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward on one batch; returns the loss. Gradients stay in ``.grad``."""
        self.model.train()
        _, loss = self.model(x, y)
        self.inner.zero_grad(set_to_none=False)
        loss.backward()
        self.samples += x.shape[0]
        return float(loss.detach())

    def apply(self) -> None:
        """Clips and applies the gradients in ``.grad`` with the inner optimizer."""
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.inner.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1


class Algorithm(ABC):
    """A member of the DiLoCo family. Subclasses set ``name`` and implement :meth:`sync`.

    Args:
        sync_every: inner steps per round (H).
    """

    name = "algorithm"

    def __init__(self, sync_every: int) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every ({sync_every}) must be >= 1")
        self.sync_every = sync_every

    def attach(self, worker: Worker) -> None:
        """Prepares a worker's algorithm state (called once, before the first round)."""
        worker.global_params = worker.flat_params().clone()

    def participants(self, round: int, workers: tuple[int, ...]) -> tuple[int, ...]:
        """The workers that train in ``round`` (all of them unless overridden)."""
        return workers

    def begin_round(self, group: Group, workers: list[Worker], round: int) -> None:
        """Runs before a round's inner steps, on the group of all workers."""

    def after_backward(self, group: Group, workers: list[Worker]) -> None:
        """Runs between backward and the optimizer step of every inner step."""

    @abstractmethod
    def sync(self, group: Group, workers: list[Worker], round: int,
             observers: tuple[int, ...] = ()) -> None:
        """The round's collective: runs after the round's inner steps on its participants.

        Args:
            observers: members of ``group`` that joined mid-round (they hold the committed
                state and trained nothing): they take part with weight 0 and end the round
                with the same shared state as everyone. Only when :meth:`can_observe`.
        """

    def can_observe(self) -> bool:
        """Whether a worker can join a round in flight as a weight-0 observer."""
        return False

    def global_state(self, worker: Worker) -> torch.Tensor:
        """The committed global parameters as this worker holds them (flat, fp32)."""
        assert worker.global_params is not None, "attach() the worker first"
        return worker.global_params.detach()

    def shared_state(self, worker: Worker) -> dict[str, torch.Tensor]:
        """Everything that must be identical on every worker after a committed round."""
        return {"global_params": self.global_state(worker)}
