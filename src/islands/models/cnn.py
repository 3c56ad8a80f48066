"""A small CNN with BatchNorm for 8x8 grayscale images (the ``digits_cnn`` task).

Two 3x3 convolutions with BatchNorm and ReLU, a 2x2 max-pool and a linear classifier: about
10k parameters, plus BatchNorm's running statistics, the model state beyond parameters that
every sync must keep identical across workers.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class DigitsCNN(nn.Module):
    """CNN for ``(B, 1, 8, 8)`` images.

    Args:
        channels: width of the first convolution (the second has twice as many).
        classes: number of output classes.
    """

    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        if channels < 1 or classes < 2:
            raise ValueError(f"channels ({channels}) must be >= 1 and classes ({classes}) >= 2")
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Linear(2 * c * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8) -> logits (B, classes)
        return self.head(self.features(x).flatten(1))
