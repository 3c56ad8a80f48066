"""A user's own task, as a user would write it: a small MLP with BatchNorm and a frozen input
projection, on synthetic 4-class data with label noise (so every good run ends near the same
irreducible loss), built with ``islands.tasks.from_dataset``.

Used by import path (``tests.user_task:make_task`` or ``tests/user_task.py:make_task``) in the
simulator, ``islands launch`` and the drop-in loop.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from islands.tasks import from_dataset


def make_task(hidden: int = 16, samples: int = 600, noise: float = 1.0):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, 8, generator=g)
    logits = x @ torch.randn(8, 4, generator=g)
    y = (logits + noise * torch.randn(samples, 4, generator=g)).argmax(dim=1)
    cut = samples * 4 // 5

    def model() -> nn.Module:
        net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, hidden), nn.BatchNorm1d(hidden),
                            nn.ReLU(), nn.Linear(hidden, 4))
        net[0].requires_grad_(False)  # frozen: never sent, never changed
        return net

    return from_dataset(model, TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:]),
                        criterion=nn.CrossEntropyLoss(), name="user_mlp")
