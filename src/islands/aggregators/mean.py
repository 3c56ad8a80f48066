"""Mean and weighted mean (FedAvg's aggregation, McMahan et al. 2017)."""

from __future__ import annotations

import torch


def mean(stacked: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Averages contributions, weighted when ``weights`` is given.

    Args:
        stacked: (n, numel) contributions, rows in a fixed (rank) order so sums are reproducible.
        weights: (n,) non-negative weights with a positive sum, or None for the plain mean.

    Returns:
        (numel,) the (weighted) mean.
    """
    if stacked.shape[0] == 1:
        return stacked[0].clone()
    if weights is None:
        return stacked.mean(dim=0)
    if bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError(f"weights ({weights.tolist()}) must be >= 0 with a positive sum")
    w = (weights / weights.sum()).to(stacked.dtype)
    return (w[:, None] * stacked).sum(dim=0)
