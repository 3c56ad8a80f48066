"""CenteredClip (Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust
Optimization"), the robust aggregator of BTARD (Gorbunov et al. 2022, "Secure Distributed
Training at Scale").

Starting from a center ``x`` (the previous round's result for this shard, or the coordinate
median), each iteration moves ``x`` by the weighted mean of the rows' offsets, each offset
clipped to length ``tau``::

    x <- x + sum_i w_i (v_i - x) min(1, tau / ||v_i - x||)

so no row moves ``x`` by more than ``w_i · tau`` per iteration, however far it is. With
``tau = None`` the radius is chosen anew at each iteration as the median of the distances
``||v_i - x||`` (our choice, not the paper's: it needs no scale of the pseudo-gradients to be
known, and clips the farther half of the rows). The iteration is elementwise plus one norm per
row, so it runs shard by shard (the distances are then those within the shard).

Each iteration is one pass over the rows, by blocks of columns: the block's offsets are
formed in cache, ``x``'s block is updated, and the next iteration's distances are summed from
the same block while it is still there.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from islands.aggregators.clipping import BLOCK, row_sq_norms
from islands.aggregators.coordinate import kept_mean
from islands.aggregators.mean import _normalized
from islands.aggregators.rule import Rule, check_rows
from islands.core.registry import register
from islands.core.sections import AggregatorConfig, check


def centered_clip(stacked: torch.Tensor, weights: torch.Tensor | None = None, *,
                  tau: float | None, iters: int,
                  center: torch.Tensor | None = None) -> torch.Tensor:
    """CenteredClip's center after ``iters`` iterations.

    Args:
        stacked: (n, numel) contributions.
        weights: (n,) non-negative, with a positive sum (normalized here), or None: 1/n each.
        tau: the clipping radius, > 0, or None: the median distance at each iteration.
        iters: iterations, >= 1.
        center: (numel,) where to start, or None: the coordinate median.

    Returns:
        (numel,) a new tensor.
    """
    check_rows(stacked, "centered_clip")
    return clip_iterations(stacked, weights, tau=tau, iters=iters, center=center)[0]


def clip_iterations(stacked: torch.Tensor, weights: torch.Tensor | None, *,
                    tau: float | None, iters: int,
                    center: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`centered_clip`, and the last iteration's clip factors (n,) float64."""
    if tau is not None and not tau > 0:
        raise ValueError(f"centered_clip: tau ({tau!r}) must be > 0, or None for the median "
                         f"distance")
    if iters < 1:
        raise ValueError(f"centered_clip: iters ({iters!r}) must be >= 1")
    n, numel = stacked.shape
    if n == 1:
        return stacked[0].clone(), torch.ones(1, dtype=torch.float64)
    w = (torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None
         else _normalized(weights.to(torch.float64).cpu(), torch.float64))
    if center is None:
        x = kept_mean(stacked, (n - 1) // 2)[0]
    else:
        x = center.to(dtype=stacked.dtype, device=stacked.device, copy=True)
    sq = row_sq_norms(stacked, x)
    for t in range(iters):
        dist = sq.sqrt().cpu()
        # the median as numpy's: the mean of the two middle distances for even n
        middle = dist.sort().values[(n - 1) // 2:n // 2 + 1]
        radius = float(middle.mean()) if tau is None else tau
        # a row at the center (distance 0, <= any radius) keeps factor 1: no 0/0
        factors = torch.where(dist > radius, radius / dist.clamp_min(1e-300), 1.0)
        coef = (w * factors).to(dtype=stacked.dtype, device=stacked.device)
        sq = _step(stacked, x, coef, distances=t + 1 < iters)
    return x, factors


def _step(stacked: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, *,
          distances: bool) -> torch.Tensor:
    """``x += coef @ (stacked - x)`` in place, block by block; with ``distances``, the rows'
    squared distances (n,) float64 to the new ``x`` from the same blocks."""
    n, numel = stacked.shape
    sq = torch.zeros(n, dtype=torch.float64, device=stacked.device)
    offsets = torch.empty(n, min(BLOCK, numel), dtype=stacked.dtype, device=stacked.device)
    for a in range(0, numel, BLOCK):
        block, xb = stacked[:, a:a + BLOCK], x[a:a + BLOCK]
        d = offsets[:, :block.shape[1]]
        torch.sub(block, xb, out=d)
        torch.addmv(xb, d.T, coef, out=xb)
        if distances:
            torch.sub(block, xb, out=d)
            sq += torch.linalg.vector_norm(d, dim=1, dtype=torch.float64).square()
    return sq


class CenteredClip(Rule):
    """CenteredClip (Karimireddy et al. 2021; BTARD, Gorbunov et al. 2022) with its center
    kept per shard: a call's result for ``key`` is the next call's starting center for that
    key (when the shapes match), as the paper starts from the previous round's aggregate.
    ``weights`` weight the average (None: equal).

    Breakdown: ``(n - 1) // 2``, a nominal bound: each row moves the center by at most
    ``w_i · tau`` per iteration, so a minority cannot carry it arbitrarily far in ``iters``
    iterations (a majority can). The error bounds that are proven (Karimireddy et al. 2021)
    assume a radius matched to the honest rows' spread and a Byzantine fraction well below
    one half; with ``tau = None`` the radius follows the rows, and so partly the attackers.
    ``influence``: the last iteration's clip factor ``min(1, tau / ||v_i - x||)``.

    Args:
        tau: the clipping radius, or None: the median distance at each iteration.
        iters: iterations per call.
        clip_norm: see :class:`~islands.aggregators.rule.Rule`.
    """

    stateful = True

    def __init__(self, *, tau: float | None = None, iters: int = 3,
                 clip_norm: float | None = None) -> None:
        super().__init__(clip_norm=clip_norm)
        self.tau, self.iters = tau, iters
        self._centers: dict[Hashable, torch.Tensor] = {}  # key -> (numel,) the last result

    def _aggregate(self, stacked, weights, key):
        center = self._centers.get(key)
        if center is not None and center.shape != stacked.shape[1:]:
            center = None
        out, factors = clip_iterations(stacked, weights, tau=self.tau, iters=self.iters,
                                       center=center)
        self._centers[key] = out.clone()  # the caller may write into out
        return out, factors

    def breakdown(self, n: int) -> int:
        return (n - 1) // 2

    def state_dict(self) -> dict:
        """``{"centers": [(key, center), ...]}`` (a list: keys may be tuples)."""
        return {"centers": [(k, v.clone()) for k, v in self._centers.items()]}

    def load_state_dict(self, state: dict) -> None:
        """Restores the centers; list keys (a round trip through JSON) become tuples."""
        self._centers = {_hashable(k): v.clone() for k, v in state.get("centers", [])}

    def __repr__(self) -> str:
        return f"CenteredClip(tau={self.tau}, iters={self.iters}{self._clip_repr(', ')})"


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


@register("aggregator", "centered_clip")
@dataclass(frozen=True, kw_only=True)
class CenteredClipConfig(AggregatorConfig):
    """``[aggregator] name = "centered_clip"``: CenteredClip, its center kept per shard.

    Attributes:
        tau: the clipping radius (in the pseudo-gradients' L2 units); None: the median
            distance of the rows to the center, at each iteration.
        iters: iterations per aggregation.
    """

    name: str = "centered_clip"
    tau: float | None = None
    iters: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.tau is None or self.tau > 0, "aggregator.tau", self.tau,
              "must be > 0 for centered_clip (the clipping radius), or None for the median "
              "distance at each iteration")
        check(self.iters >= 1, "aggregator.iters", self.iters,
              "must be >= 1 for centered_clip (iterations per aggregation): use e.g. 3")

    def build(self) -> CenteredClip:
        """A new :class:`CenteredClip` (one per worker: the centers are its own)."""
        return CenteredClip(tau=self.tau, iters=self.iters, clip_norm=self.clip_norm)
