"""Aggregators: pure functions over stacked contributions shaped ``(n, numel)``.

Each takes ``stacked`` (n, numel) and optional ``weights`` (n,) and returns (numel,). The
butterfly all-reduce applies them shard by shard, so coordinate-wise rules cost no extra bytes.
"""

from islands.aggregators.mean import mean

AGGREGATORS = {"mean": mean}

__all__ = ["AGGREGATORS", "mean"]
