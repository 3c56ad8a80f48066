"""Tasks from plain PyTorch pieces in one call: a model (or a factory), a loss, and a
``torch.utils.data.Dataset`` or a ``DataLoader`` factory.

    task = islands.tasks.from_dataset(MyNet, train=train_ds, val=val_ds,
                                      criterion=nn.CrossEntropyLoss())
    islands.simulate(cfg, task=task)

With a Dataset, islands deals its indices to the workers (``[data] partition``: ``iid``,
``dirichlet`` over the labels, ``by_source`` as contiguous runs) and draws each worker's batches
from a fresh seeded shuffle of its share every epoch, so the batch of (worker, step) depends
only on the seed. With a DataLoader factory ``loader(worker, workers, seed)``, the user deals
and shuffles; islands iterates it (a new epoch when it runs out) and stays deterministic as
long as the loader is seeded by its arguments.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, Sampler, TensorDataset, default_collate

from islands.core.errors import DataError, IslandsWarning
from islands.core.sections import DataConfig
from islands.core.seeding import derive_seed
from islands.data.partition import partition
from islands.tasks.base import Batch, Task, check_loss, to_device

ModelSpec = nn.Module | Callable[[], nn.Module]


def labels_of(dataset: Dataset) -> np.ndarray | None:
    """The integer labels of a dataset, or None: a ``TensorDataset``'s last tensor, a
    ``.targets`` attribute (torchvision's convention), or each item's second field."""
    if isinstance(dataset, TensorDataset):
        last = dataset.tensors[-1]
        return last.numpy() if last.dim() == 1 and not last.is_floating_point() else None
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    try:
        labels = [dataset[i][1] for i in range(len(dataset))]
    except (TypeError, IndexError, KeyError):
        return None
    if all((isinstance(y, int) and not isinstance(y, bool))
           or (torch.is_tensor(y) and y.dim() == 0 and not y.is_floating_point())
           for y in labels):
        return np.asarray([int(y) for y in labels])
    return None


def gather(dataset: Dataset, indices: list[int] | np.ndarray) -> Batch:
    """The items at ``indices``, collated into one batch."""
    if isinstance(dataset, TensorDataset):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return tuple(t[idx] for t in dataset.tensors)
    return default_collate([dataset[int(i)] for i in indices])


class IndexPartition:
    """A dataset's indices dealt to workers; each worker reshuffles its share every epoch.

    Args:
        dataset: the training set.
        parts: per worker, the indices of its share.
        batch_size: samples per batch.
        seed: the run's seed (shuffles derive from it, the worker and the epoch).
    """

    def __init__(self, dataset: Dataset, parts: list[np.ndarray], batch_size: int,
                 seed: int) -> None:
        self.dataset, self.parts, self.batch_size, self.seed = dataset, parts, batch_size, seed
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def size(self, worker: int) -> int:
        return len(self.parts[worker])

    @property
    def samples_per_step(self) -> int:
        """Samples in every batch (:meth:`indices` always fills ``batch_size``)."""
        return self.batch_size

    def _order(self, worker: int, epoch: int) -> np.ndarray:
        key = (worker, epoch)
        if key not in self._orders:
            if len(self._orders) > 64:
                self._orders.clear()
            rng = np.random.default_rng(derive_seed(self.seed, "epoch", worker, epoch))
            self._orders[key] = rng.permutation(len(self.parts[worker]))
        return self._orders[key]

    def indices(self, worker: int, step: int) -> list[int]:
        """Dataset indices of (worker, step): positions ``step * B ..`` of the epoch shuffles."""
        mine, b = self.parts[worker], self.batch_size
        out: list[int] = []
        pos = step * b
        while len(out) < b:
            epoch, off = divmod(pos, len(mine))
            take = min(b - len(out), len(mine) - off)
            out.extend(mine[self._order(worker, epoch)[off:off + take]].tolist())
            pos += take
        return out

    def batch(self, worker: int, step: int) -> Batch:
        return gather(self.dataset, self.indices(worker, step))


class LoaderPartition:
    """Batches from the user's ``loader(worker, workers, seed)``; a new epoch when one ends.

    Asking for an earlier step than the last one rebuilds the loader and skips ahead (a
    worker that rejoins), so each call is a function of (seed, worker, step) when the loader
    is seeded by its arguments.
    """

    def __init__(self, factory: Callable[[int, int, int], Iterable], workers: int, seed: int,
                 sizes: list[int] | None) -> None:
        self.factory, self.workers, self.seed, self.sizes = factory, workers, seed, sizes
        self._at: dict[int, tuple[int, Any, Iterable]] = {}  # worker -> (next step, it, src)

    def _source(self, worker: int) -> Iterable:
        return self.factory(worker, self.workers, self.seed)

    def size(self, worker: int) -> int:
        if self.sizes is not None:
            return int(self.sizes[worker])
        src = self._at[worker][2] if worker in self._at else self._source(worker)
        dataset = getattr(src, "dataset", None)
        return len(dataset) if dataset is not None else len(src)

    def batch(self, worker: int, step: int) -> Batch:
        pos, it, src = self._at.get(worker, (None, None, None))
        if it is None or step < pos:
            src = self._source(worker)
            pos, it = 0, iter(src)
        empty_epochs = 0
        while True:
            try:
                item = next(it)
            except StopIteration:
                empty_epochs += 1
                if empty_epochs > 1:
                    raise DataError(f"the loader of worker {worker} yields no batch") from None
                it = iter(src)
                continue
            empty_epochs = 0
            if pos == step:
                self._at[worker] = (pos + 1, it, src)
                return item
            pos += 1


class DatasetTask(Task):
    """A supervised task from a model, a loss and a dataset (or a loader factory).

    Args:
        model: an ``nn.Module`` (copied for each worker) or a zero-argument factory (called
            after the engine seeds torch, so its initialization follows the run's seed).
        train: the training ``Dataset`` (dealt to workers by ``[data] partition``).
        loader: instead of ``train``, ``loader(worker, workers, seed) -> iterable of batches``.
        val: held-out data: a ``Dataset``, an iterable of batches, or a factory of one.
        loss: ``loss(model, batch) -> scalar tensor``.
        criterion: instead of ``loss``, ``criterion(model(x), y)`` for batches ``(x, y)``
            (e.g. ``nn.CrossEntropyLoss()``); the forward pass is shared with accuracy.
        labels: the training labels for ``partition = "dirichlet"`` (found in the dataset
            when omitted).
        accuracy: report ``accuracy`` (argmax of ``model(x)`` against ``y``); default: on for
            ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` criteria.
        batch_size: samples per batch (default: ``[data] batch_size``).
        eval_batch_size: samples per evaluation batch of a ``val`` Dataset.
        sizes: per-worker data sizes with ``loader`` (default: ``len(loader.dataset)``).
        name: shown in tables.
    """

    def __init__(self, model: ModelSpec, *, train: Dataset | None = None,
                 loader: Callable[[int, int, int], Iterable] | None = None,
                 val: Dataset | Iterable | Callable[[], Iterable],
                 loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 labels: Any = None, accuracy: bool | None = None,
                 batch_size: int | None = None, eval_batch_size: int = 512,
                 sizes: list[int] | None = None, name: str = "dataset") -> None:
        if (train is None) == (loader is None):
            raise ValueError("give exactly one of train= (a Dataset) or loader= (a factory "
                             "loader(worker, workers, seed) -> iterable of batches)")
        if (loss is None) == (criterion is None):
            raise ValueError("give exactly one of loss= (loss(model, batch) -> tensor) or "
                             "criterion= (criterion(model(x), y), e.g. nn.CrossEntropyLoss())")
        if not (isinstance(model, nn.Module) or callable(model)):
            raise TypeError(f"model ({type(model).__name__}) must be an nn.Module or a "
                            "function that returns one")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        self._model, self.train, self.loader, self.val = model, train, loader, val
        self._loss, self.criterion, self.sizes = loss, criterion, sizes
        self.labels = None if labels is None else np.asarray(labels)
        self.accuracy = (isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss))
                         if accuracy is None else accuracy)
        self.batch_size_override, self.eval_batch_size, self.name = (batch_size,
                                                                     eval_batch_size, name)
        self._shapes_checked = False

    def model(self) -> nn.Module:
        made = copy.deepcopy(self._model) if isinstance(self._model, nn.Module) else self._model()
        if not isinstance(made, nn.Module):
            raise TypeError(f"the task's model factory returned {type(made).__name__}, "
                            "not an nn.Module")
        return made

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if self.criterion is None:
            return self._loss(model, batch)
        x, y = _xy(batch)
        out = model(x)
        if not self._shapes_checked:
            self._shapes_checked = True
            warn_if_broadcast(self.criterion, out, y, self.name)
        return self.criterion(out, y)

    def data(self, workers: int, seed: int, spec: DataConfig) -> IndexPartition | LoaderPartition:
        if self.loader is not None:
            return LoaderPartition(self.loader, workers, seed, self.sizes)
        return deal(self.train, workers, seed, spec, labels=self.labels,
                    batch_size=self.batch_size_override)

    def _val_batches(self) -> Iterable:
        val = self.val() if callable(self.val) and not isinstance(self.val, Dataset) else self.val
        if isinstance(val, Dataset) and hasattr(val, "__len__"):
            n, b = len(val), self.eval_batch_size
            return (gather(val, range(i, min(n, i + b))) for i in range(0, n, b))
        return val

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total, loss_sum, correct = 0, 0.0, 0
        for batch in self._val_batches():
            batch = to_device(batch, device)
            n = self.batch_size(batch)
            if self.criterion is not None:
                x, y = _xy(batch)
                out = model(x)
                loss = check_loss(self.criterion(out, y), "Task.loss (its criterion, evaluating)")
            else:
                loss = check_loss(self._loss(model, batch), "Task.loss (evaluating)")
                if self.accuracy:
                    x, y = _xy(batch)
                    out = model(x)
            loss_sum += float(loss) * n
            if self.accuracy:
                correct += int((out.argmax(dim=-1) == y).sum())
            total += n
        if total == 0:
            raise DataError(f"task {self.name!r}: the validation data is empty")
        metrics = {"eval_loss": loss_sum / total}
        if self.accuracy:
            metrics["accuracy"] = correct / total
        return metrics


# criteria that compare the output with the target element by element: a shape mismatch
# broadcasts silently ((N, 1) against (N,) is an (N, N) loss)
ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss,
               nn.BCEWithLogitsLoss, nn.SoftMarginLoss, nn.PoissonNLLLoss, nn.KLDivLoss)


def warn_if_broadcast(criterion, out: torch.Tensor, y: torch.Tensor, task: str) -> None:
    """Warns (once per task) when an element-wise criterion gets output and target shapes that
    differ but broadcast: it computes something else than the per-sample loss."""
    if not isinstance(criterion, ELEMENTWISE) or not torch.is_tensor(y) or out.shape == y.shape:
        return
    try:
        shape = torch.broadcast_shapes(out.shape, y.shape)
    except RuntimeError:
        return  # torch refuses it itself
    warnings.warn(IslandsWarning(
        f"task {task!r}: the model's output has shape {tuple(out.shape)} and the targets "
        f"{tuple(y.shape)}; {type(criterion).__name__} broadcasts them to {tuple(shape)}, "
        "which is not the per-sample loss: make them the same shape (e.g. out.squeeze(-1), "
        "or targets of shape (N, 1))"), stacklevel=3)


def _xy(batch: Batch) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"criterion= needs batches (x, y); got {type(batch).__name__}: pass loss= "
                    "(loss(model, batch) -> tensor) for other batch shapes")


def deal(dataset: Dataset, workers: int, seed: int, spec: DataConfig, *, labels=None,
         batch_size: int | None = None) -> IndexPartition:
    """``dataset``'s indices dealt to ``workers`` workers as the simulator deals a
    :func:`from_dataset` task's (``[data] partition``, ``alpha``, the seed), each worker's
    batches drawn from a fresh seeded shuffle of its share every epoch.

    Args:
        labels: the training labels for ``partition = "dirichlet"`` (found in the dataset
            when omitted).
        batch_size: samples per batch (default: ``spec.batch_size``).
    """
    n = len(dataset)
    if spec.partition == "dirichlet":
        labels = np.asarray(labels) if labels is not None else labels_of(dataset)
        if labels is None or len(labels) != n:
            raise DataError("data.partition = 'dirichlet' needs the training labels: pass "
                            "labels= (one per training item)")
    else:
        labels = None
    sources = [str(v) for v in labels] if labels is not None else ["all"] * n
    parts = partition(n, sources, np.ones(n, dtype=np.int64), workers, spec.partition,
                      spec.alpha, seed)
    return IndexPartition(dataset, parts, batch_size or spec.batch_size, seed)


class ShareSampler(Sampler):
    """One worker's share of a ``Dataset``, batch by batch, as the simulator deals it: a batch
    sampler, ``DataLoader(dataset, batch_sampler=ShareSampler(...))``.

    The batch of inner step ``s`` is the simulator's batch of (this worker, ``s``), so a loop
    that trains on it (with :func:`islands.inner_optimizer`'s optimizer) sees exactly what the
    simulated worker sees. Iteration yields the steps from ``start`` to the run's last.

    Args:
        dataset: the training set (the one the simulated task deals).
        cfg: the run's config (``workers``, ``seed``, ``steps`` and ``[data]``).
        worker: this worker's id.
        start: the first inner step, or a function giving it when iteration begins (a
            joiner starts where the run is: ``lambda: trainer.inner_step``).
        labels: the training labels for ``partition = "dirichlet"``.
        batch_size: samples per batch (default: ``data.batch_size``), as the task's.
    """

    def __init__(self, dataset: Dataset, cfg, worker: int, *,
                 start: int | Callable[[], int] = 0, labels=None,
                 batch_size: int | None = None) -> None:
        if not 0 <= worker < cfg.workers:
            raise ValueError(f"worker ({worker}) must be in [0, {cfg.workers - 1}]")
        self.part = deal(dataset, cfg.workers, cfg.seed, cfg.data, labels=labels,
                         batch_size=batch_size)
        self.worker, self.steps, self.start = worker, cfg.steps, start

    def _first(self) -> int:
        return self.start() if callable(self.start) else self.start

    @property
    def size(self) -> int:
        """Items in this worker's share (FedAvg's n_k)."""
        return self.part.size(self.worker)

    def __iter__(self):
        for step in range(self._first(), self.steps):
            yield self.part.indices(self.worker, step)

    def __len__(self) -> int:
        return max(0, self.steps - self._first())


def from_dataset(model: ModelSpec, train: Dataset, val: Dataset | Iterable, **kwargs
                 ) -> DatasetTask:
    """A task from a model, a training Dataset and held-out data (see :class:`DatasetTask`)."""
    return DatasetTask(model, train=train, val=val, **kwargs)


def from_loader(model: ModelSpec, loader: Callable[[int, int, int], Iterable],
                val: Dataset | Iterable | Callable[[], Iterable], **kwargs) -> DatasetTask:
    """A task from a model and a DataLoader factory ``loader(worker, workers, seed)``."""
    return DatasetTask(model, loader=loader, val=val, **kwargs)
