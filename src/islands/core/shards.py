"""Cutting a flat vector into contiguous pieces: the butterfly's shards (one per member),
Streaming DiLoCo's fragments. Pure arithmetic, shared by the layers above."""

from __future__ import annotations


def shard_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """Deterministic plan: ``n`` contiguous ``[start, end)`` shards covering ``numel``."""
    q, r = divmod(numel, n)
    bounds, start = [], 0
    for j in range(n):
        end = start + q + (1 if j < r else 0)
        bounds.append((start, end))
        start = end
    return bounds
