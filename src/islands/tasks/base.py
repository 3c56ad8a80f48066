"""The seam between the user's ML and islands: a :class:`Task`.

A task says what is trained and on what; islands owns everything else (workers, rounds,
codecs, networks, faults). It provides

* ``model()``: a fresh model. The engine seeds torch with the run's seed before calling it, so
  every worker (and every process of the real runtime) builds the same initial parameters;
* ``loss(model, batch)``: a scalar tensor to minimize;
* ``data(workers, seed, spec)``: the training data dealt to ``workers`` workers (the
  partitioners of ``spec.partition``: iid, Dirichlet over labels or sources, by source), as a
  :class:`Partition` whose ``batch(worker, step)`` depends only on (seed, worker, step) and
  whose ``size(worker)`` is FedAvg's weight;
* ``evaluate(model)``: ``{"eval_loss": ..., "accuracy": ...}`` on held-out data, called in
  ``eval()`` mode under ``torch.no_grad()`` (``eval_loss`` is required; every metric lands in
  ``metrics.jsonl``, in ``summary.json`` as ``final_eval_<metric>`` and in the plots).

Batches may be a tensor, or tuples, lists and dicts of tensors; the engine moves them to the
run's device with :func:`to_device`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
import torch.nn as nn

from islands.core.errors import TaskError
from islands.core.sections import DataConfig

Batch = Any  # a tensor, or tuples / lists / dicts of tensors


class Partition(Protocol):
    """The training data of one run, dealt to its workers."""

    def batch(self, worker: int, step: int) -> Batch:
        """The batch ``worker`` trains on at inner ``step`` (a function of seed, worker, step)."""

    def size(self, worker: int) -> int:
        """The size of ``worker``'s share (samples or bytes): FedAvg's ``n_k``."""

    # Optionally, ``samples_per_step``: the samples in every batch, where the partition fixes
    # it (the built-in partitions do; a loader's batches may vary). The runtime puts it in the
    # job's fingerprint, and the coordinator bounds a member's samples report with it.


class Task(ABC):
    """What islands trains. Subclass it, or build one with :func:`islands.tasks.from_dataset`.

    Attributes:
        name: shown in tables and ``summary.json``.
        classes: the number of classes of integer targets ``y`` in batches ``(x, y)`` (None:
            not a classification task; ``[attack] name = "label_flip"`` maps ``y`` to
            ``classes - 1 - y`` and needs it).
    """

    name: str = "task"
    classes: int | None = None

    @abstractmethod
    def model(self) -> nn.Module:
        """A fresh model (torch is seeded by the engine just before)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar loss of ``model`` on ``batch`` (already on the model's device)."""

    @abstractmethod
    def data(self, workers: int, seed: int, spec: DataConfig) -> Partition:
        """The training data dealt to ``workers`` workers with ``spec``'s partitioner."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model`` on held-out data; must include ``eval_loss``."""

    def batch_size(self, batch: Batch) -> int:
        """Samples in ``batch`` (counted for FedAvg's sample weights): the leading dimension
        of its first tensor."""
        return first_tensor(batch).shape[0]


def check_loss(loss, where: str = "Task.loss") -> torch.Tensor:
    """``loss`` if it is a 0-dim floating tensor (what ``backward()`` and the metrics need).

    Raises:
        TaskError: naming ``where`` and what it returned instead.
    """
    if torch.is_tensor(loss) and loss.dim() == 0 and loss.is_floating_point():
        return loss
    got = (f"a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}"
           if torch.is_tensor(loss) else f"{type(loss).__name__} {loss!r}"[:120])
    raise TaskError(f"{where} must return a scalar loss (a 0-dim floating tensor); it returned "
                    f"{got}: reduce it (e.g. .mean()) and make it a float tensor")


def checked_loss(loss_fn):
    """``loss_fn`` whose every result goes through :func:`check_loss`."""
    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return check_loss(loss_fn(model, batch))

    return loss


def first_tensor(batch: Batch) -> torch.Tensor:
    if torch.is_tensor(batch):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch
    for item in items:
        try:
            return first_tensor(item)
        except TypeError:
            continue
    raise TypeError(f"batch of type {type(batch).__name__} holds no tensor")


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor moved to ``device`` (no copy when already there)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        if hasattr(batch, "_fields"):  # a namedtuple
            return type(batch)(*moved)
        return tuple(moved) if isinstance(batch, tuple) else moved
    return batch
