"""Coordinate-wise robust rules: the coordinate median and the trimmed mean (Yin et al. 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").

Each coordinate is aggregated on its own, so both rules run shard by shard in the butterfly
at no extra bytes. The trimmed mean with ``trim`` = β drops the ``b = floor(β · n)`` smallest
and the ``b`` largest values of every coordinate and averages the rest; the median is the
trimmed mean that keeps the middle value (odd ``n``) or the two middle values (even ``n``,
averaged, as ``numpy.median``).

The rows are sorted per coordinate by a sorting network (Batcher's odd-even merge sort) run
with elementwise ``minimum``/``maximum`` over blocks of columns that stay in cache, rather than
by ``torch.sort`` along ``dim=0``, which on a CPU sorts every column as a separate short array
(a GPU, and more than :data:`NETWORK_MAX_ROWS` rows, use ``torch.sort``). Comparators whose
outputs no kept position reads are skipped. The kept values are summed in sorted order, so the
result does not depend on the rows' order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from islands.aggregators.clipping import BLOCK
from islands.aggregators.rule import Rule, check_rows
from islands.core.registry import register
from islands.core.sections import AggregatorConfig, check

# Past this many rows torch.sort along dim 0 sorts instead of the network (whose comparator
# count grows as n log² n, each one a Python-level call per block).
NETWORK_MAX_ROWS = 32


def trimmed_count(n: int, trim: float) -> int:
    """``b = floor(trim · n)``: the values cut from each end of ``n`` (a relative 1e-12
    absorbs binary fractions: 0.29 · 100 is 28.999999999999996 in floats and cuts 29).

    Raises:
        ValueError: ``trim < 0`` or ``2b >= n`` (nothing would be left).
    """
    b = math.floor(trim * n * (1 + 1e-12)) if trim >= 0 else -1
    if not 0 <= 2 * b < n:
        raise ValueError(f"trimmed_mean: trim ({trim}) cuts b = floor(trim · n) = {b} of n = "
                         f"{n} rows from each end; it needs 0 <= trim and 2b < n: lower trim")
    return b


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """The median of every coordinate (even ``n``: the mean of the two middle values).

    Args:
        stacked: (n, numel) contributions.

    Returns:
        (numel,) a new tensor.
    """
    check_rows(stacked, "median")
    return kept_mean(stacked, (stacked.shape[0] - 1) // 2)[0]


def trimmed_mean(stacked: torch.Tensor, *, trim: float) -> torch.Tensor:
    """The mean of every coordinate's values once the ``b = floor(trim · n)`` smallest and
    ``b`` largest are cut.

    Args:
        stacked: (n, numel) contributions.
        trim: the fraction cut from each end, with ``2b < n``.

    Returns:
        (numel,) a new tensor.
    """
    check_rows(stacked, "trimmed_mean")
    return kept_mean(stacked, trimmed_count(stacked.shape[0], trim))[0]


def kept_mean(stacked: torch.Tensor, b: int,
              influence: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every coordinate's mean over its sorted values ``b .. n - b - 1``.

    Args:
        stacked: (n, numel) with ``2b < n``.
        b: values cut from each end.
        influence: also return each row's share of coordinates whose value lies within the
            kept values' range (a row tied with a kept value counts as kept).

    Returns:
        (numel,) the result and (n,) float64 shares, or None.
    """
    n, numel = stacked.shape
    assert 0 <= b and 2 * b < n, (n, b)
    out = torch.empty(numel, dtype=stacked.dtype, device=stacked.device)
    counts = torch.zeros(n, dtype=torch.int64, device=stacked.device)
    sorter = BlockSorter(n, range(b, n - b), stacked)
    for a in range(0, numel, BLOCK):
        block = stacked[:, a:a + BLOCK]
        rows = sorter.sort(block)
        acc = out[a:a + BLOCK]
        if n - 2 * b == 1:
            acc.copy_(rows[b])
        else:
            torch.add(rows[b], rows[b + 1], out=acc)
            for r in rows[b + 2:n - b]:
                acc.add_(r)
            acc.div_(n - 2 * b)
        if influence:
            counts += ((block >= rows[b]) & (block <= rows[n - b - 1])).sum(dim=1)
    shares = None
    if influence:
        shares = (counts.cpu().to(torch.float64) / numel if numel
                  else torch.ones(n, dtype=torch.float64))
    return out, shares


@functools.lru_cache(maxsize=None)
def network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort on ``n`` wires: comparators ``(i, j)``, ``i < j``, that
    leave the minimum on wire ``i``. Built for the next power of two with the extra wires
    holding +inf, which no comparator moves, so those touching them are dropped."""
    size = 1 << max(0, (n - 1).bit_length())
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((i, j) for i, j in pairs if j < n)


@functools.lru_cache(maxsize=None)
def plan(n: int, kept: tuple[int, ...]) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators of :func:`network` that the sorted positions ``kept`` depend on, each
    with whether its minimum and its maximum are read later."""
    needed = set(kept)
    steps = []
    for i, j in reversed(network(n)):
        want_min, want_max = i in needed, j in needed
        if want_min or want_max:
            steps.append((i, j, want_min, want_max))
            needed |= {i, j}
    return tuple(reversed(steps))


class BlockSorter:
    """Sorts blocks of columns of ``(n, numel)`` rows into preallocated buffers.

    Args:
        n: rows.
        kept: the sorted positions the caller reads; others may hold anything.
        like: a tensor of the rows' dtype and device.
    """

    def __init__(self, n: int, kept: range, like: torch.Tensor) -> None:
        self.n, self.kept = n, tuple(kept)
        network_ok = n <= NETWORK_MAX_ROWS and like.device.type == "cpu"
        self.steps = plan(n, self.kept) if network_ok else None
        self.buffer = torch.empty(n + 1, BLOCK, dtype=like.dtype, device=like.device)

    def sort(self, block: torch.Tensor) -> list[torch.Tensor]:
        """``block`` (n, width) sorted along dim 0, as a list of ``n`` (width,) rows (views
        into the buffer, valid until the next call); only the kept positions are exact."""
        if self.steps is None:
            return list(torch.sort(block, dim=0).values.unbind(0))
        width = block.shape[1]
        self.buffer[:self.n, :width].copy_(block)
        rows = [r[:width] for r in self.buffer.unbind(0)]
        spare = rows.pop()
        for i, j, want_min, want_max in self.steps:
            x, y = rows[i], rows[j]
            if want_min and want_max:
                # the minimum goes to the spare row and the maximum over x: no allocation
                torch.minimum(x, y, out=spare)
                torch.maximum(x, y, out=x)
                rows[i], rows[j], spare = spare, x, y
            elif want_min:
                torch.minimum(x, y, out=x)
            else:
                torch.maximum(x, y, out=y)
        return rows


class Median(Rule):
    """The coordinate median (Yin et al. 2018): tolerates ``(n - 1) // 2`` Byzantine rows,
    each coordinate staying within the honest values' range. ``weights`` are ignored.
    ``influence``: each row's share of coordinates whose value lies within the middle
    value(s)."""

    coordinatewise = True

    def _aggregate(self, stacked, weights, key):
        return kept_mean(stacked, (stacked.shape[0] - 1) // 2, influence=True)

    def breakdown(self, n: int) -> int:
        return (n - 1) // 2

    def __repr__(self) -> str:
        return f"Median({self._clip_repr()})"


class TrimmedMean(Rule):
    """The coordinate-wise trimmed mean (Yin et al. 2018): tolerates ``b = floor(trim · n)``
    Byzantine rows, each coordinate staying within the honest values' range. ``weights`` are
    ignored. ``influence``: each row's share of coordinates whose value lies within the kept
    values' range.

    Args:
        trim: the fraction cut from each end, in [0, 0.5).
        clip_norm: see :class:`~islands.aggregators.rule.Rule`.
    """

    coordinatewise = True

    def __init__(self, *, trim: float, clip_norm: float | None = None) -> None:
        super().__init__(clip_norm=clip_norm)
        self.trim = trim

    def _aggregate(self, stacked, weights, key):
        return kept_mean(stacked, trimmed_count(stacked.shape[0], self.trim), influence=True)

    def breakdown(self, n: int) -> int:
        return trimmed_count(n, self.trim)

    def __repr__(self) -> str:
        return f"TrimmedMean(trim={self.trim}{self._clip_repr(', ')})"


@register("aggregator", "median")
@dataclass(frozen=True, kw_only=True)
class MedianConfig(AggregatorConfig):
    """``[aggregator] name = "median"``: the coordinate median."""

    name: str = "median"

    def build(self) -> Median:
        """A new :class:`Median` (one per worker)."""
        return Median(clip_norm=self.clip_norm)


@register("aggregator", "trimmed_mean")
@dataclass(frozen=True, kw_only=True)
class TrimmedMeanConfig(AggregatorConfig):
    """``[aggregator] name = "trimmed_mean"``: the coordinate-wise trimmed mean.

    Attributes:
        trim: the fraction of rows cut from each end of every coordinate, in [0, 0.5).
    """

    name: str = "trimmed_mean"
    trim: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.trim < 0.5, "aggregator.trim", self.trim,
              "must be in [0, 0.5) for trimmed_mean (the fraction cut from each end): "
              "use e.g. 0.25, or name = \"median\" to keep only the middle")

    def build(self) -> TrimmedMean:
        """A new :class:`TrimmedMean` (one per worker)."""
        return TrimmedMean(trim=self.trim, clip_norm=self.clip_norm)
