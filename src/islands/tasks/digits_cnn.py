"""The built-in ``digits_cnn`` task: :class:`~islands.models.DigitsCNN` (with BatchNorm) on
scikit-learn's bundled 8x8 digits, cross-entropy, evaluated on a fixed held-out fifth
(``eval_loss`` and ``accuracy``). Non-IID by label with ``[data] partition = "dirichlet"``.

    islands sim examples/digits_cnn.toml
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn
from torch.utils.data import TensorDataset

from islands.core.registry import register
from islands.core.sections import DataConfig, TaskConfig
from islands.core.seeding import derive_seed
from islands.data.digits import load_digits_tensors
from islands.models import DigitsCNN
from islands.tasks.dataset import DatasetTask


def make_digits_cnn(channels: int = 16, val_fraction: float = 0.2) -> DatasetTask:
    """The digits task.

    Args:
        channels: width of the CNN's first convolution.
        val_fraction: share of the 1,797 images held out (the same images on every run).
    """
    if channels < 1:
        raise ValueError(f"channels ({channels}) must be >= 1")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction ({val_fraction}) must be in (0, 1)")
    x, y = load_digits_tensors()
    order = np.random.default_rng(derive_seed("digits", "validation")).permutation(len(y))
    n_val = int(round(val_fraction * len(y)))
    val, train = order[:n_val], np.sort(order[n_val:])
    task = DatasetTask(lambda: DigitsCNN(channels), train=TensorDataset(x[train], y[train]),
                       val=TensorDataset(x[val], y[val]), criterion=nn.CrossEntropyLoss(),
                       name="digits_cnn")
    task.classes = 10
    return task


register("task", "digits_cnn", sections={"data": DataConfig},
         factory=lambda run: make_digits_cnn(**run.task.kwargs))(TaskConfig)
