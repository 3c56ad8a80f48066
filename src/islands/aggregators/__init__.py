"""Aggregators: pure functions over stacked contributions shaped ``(n, numel)``.

Each takes ``stacked`` (n, numel) and optional ``weights`` (n,) and returns (numel,). The
butterfly all-reduce applies them shard by shard, so coordinate-wise rules cost no extra bytes.
Each registers its ``[aggregator]`` section by name beside its code (``MeanConfig``).
"""

from islands.aggregators.mean import MeanConfig, mean

__all__ = ["MeanConfig", "mean"]
