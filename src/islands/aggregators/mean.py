"""Mean and weighted mean (FedAvg's aggregation, McMahan et al. 2017).

:func:`mean` is the definition, over stacked rows. :func:`mean_of_rows` computes the same bits
from a list of rows without stacking them (no ``(n, numel)`` copy), for the groups where that
can be proven: torch sums ``n <= 4`` rows over ``dim=0`` in row order starting from ``+0.0``,
whatever the column or the thread count (its outer-sum loop adds rows one by one; its inner
loop keeps four partial sums, one per row when ``n <= 4``). From five rows on, the columns
that torch's vectorized loop leaves over are summed in another order, so :func:`streams` says
no and callers stack (``tests/property/test_aggregators.py`` checks both against
:func:`mean`, bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from islands.aggregators.rule import Rule
from islands.core.registry import register
from islands.core.sections import AggregatorConfig

# The most rows mean_of_rows reproduces mean() for (see the module docstring).
MAX_STREAMED_ROWS = 4


def _normalized(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError(f"weights ({weights.tolist()}) must be >= 0 with a positive sum")
    return (weights / weights.sum()).to(dtype)


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
    w = _normalized(weights, stacked.dtype)
    return (w[:, None] * stacked).sum(dim=0)


mean.coordinatewise = True  # each coordinate reads only its own (rule.coordinatewise)


def streams(n: int, dtype: torch.dtype) -> bool:
    """Whether :func:`mean_of_rows` gives :func:`mean`'s bits for ``n`` rows of ``dtype``
    (float32 and float64, whose sums accumulate in their own precision)."""
    return n <= MAX_STREAMED_ROWS and dtype in (torch.float32, torch.float64)


def mean_of_rows(rows: list[torch.Tensor], weights: torch.Tensor | None, out: torch.Tensor,
                 *, chunk: int = 1 << 20) -> torch.Tensor:
    """``mean(torch.stack(rows), weights)`` written into ``out``, bit for bit, without a stack.

    Works through the columns ``chunk`` at a time so that each chunk's partial sum stays in
    cache between the row additions (every operation is elementwise, so the chunking cannot
    change a bit).

    Args:
        rows: ``n`` 1-D tensors of ``out``'s length and dtype, in member order; read only.
            ``n`` must satisfy :func:`streams`.
        weights: (n,) as for :func:`mean`, or None.
        out: (numel,) the result; may be one of ``rows`` only when ``n == 1``.

    Returns:
        ``out``.
    """
    n = len(rows)
    assert streams(n, out.dtype), (n, out.dtype)
    if n == 1:
        return out.copy_(rows[0])
    w = None if weights is None else _normalized(weights, out.dtype)
    scratch = None if w is None else torch.empty(min(chunk, out.numel()), dtype=out.dtype,
                                                 device=out.device)
    for a in range(0, out.numel(), chunk):
        b = min(out.numel(), a + chunk)
        acc = out[a:b]
        if w is None:
            torch.add(rows[0][a:b], rows[1][a:b], out=acc)
            for r in rows[2:]:
                acc.add_(r[a:b])
        else:
            torch.mul(rows[0][a:b], w[0], out=acc)
            for i in range(1, n):
                acc.add_(torch.mul(rows[i][a:b], w[i], out=scratch[:b - a]))
        # torch's sum starts from +0.0 and adds zeros at the end: -0.0 becomes +0.0.
        acc.add_(0.0)
        if w is None:
            acc.div_(n)
    return out


class Mean(Rule):
    """The (weighted) mean as a :class:`~islands.aggregators.rule.Rule`, for rows clipped
    first (``clip_norm``). Breakdown: 0 (one row moves it arbitrarily far; clipped, by at
    most its normalized weight times ``2 · clip_norm``). ``influence``: 1 for every row.

    Args:
        clip_norm: see :class:`~islands.aggregators.rule.Rule`.
    """

    caps_weights = False  # FedAvg's weights as they are
    coordinatewise = True

    def _aggregate(self, stacked, weights, key):
        return mean(stacked, weights), torch.ones(stacked.shape[0], dtype=torch.float64)

    def breakdown(self, n: int) -> int:
        return 0

    def __repr__(self) -> str:
        return f"Mean({self._clip_repr()})"


@register("aggregator", "mean", default=True)
@dataclass(frozen=True, kw_only=True)
class MeanConfig(AggregatorConfig):
    """``[aggregator] name = "mean"``: the (weighted) mean."""

    name: str = "mean"

    def build(self):
        """The aggregator: :func:`mean` itself (``(stacked (n, numel), weights (n,) | None)
        -> (numel,)``), or a new :class:`Mean` when ``clip_norm`` is set."""
        return mean if self.clip_norm is None else Mean(clip_norm=self.clip_norm)
