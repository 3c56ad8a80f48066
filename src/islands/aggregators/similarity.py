"""A Sybil defence by similarity, after FoolsGold (Fung, Yoon and Beschastnikh 2020, "The
Limitations of Federated Learning in Sybil Settings") and SybilWall.

Sybils (many workers run by one adversary) send updates that point the same way far more
than honest workers' do. FoolsGold weights each row down by its largest cosine similarity to
another row, so that identical rows (clones) get weight 0. It is stateless here: the paper
compares each worker's history of updates, this compares the round's rows alone.

The weights, from the pairwise cosine similarities ``cs`` of the rows (diagonal left out):

1. ``v_i = max(0, max_{j != i} cs_ij)``;
2. pardoning: ``cs_ij *= v_i / v_j`` where ``v_j > v_i`` (an honest row that merely resembles
   a Sybil is not punished for the Sybil's own resemblance to others);
3. ``w_i = 1 - max_{j != i} cs_ij``, clipped to [0, 1], then divided by the largest;
4. the logit ``w = clip(ln(w / (1 - w)) + 0.5, 0, 1)`` (the paper's confidence κ = 1), with
   ``w = 1`` mapped to 1 (the reference implementation's 0.99 then clips to 1).

The result is the mean weighted by ``w``, or the plain mean if every weight is 0 (all rows
alike: nothing tells the Sybils from the honest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from islands.aggregators.clipping import BLOCK, cosine_similarities
from islands.aggregators.mean import mean
from islands.aggregators.rule import Rule, check_rows
from islands.core.registry import register
from islands.core.sections import AggregatorConfig

# below this, 1 - cosine similarity is rounding: the rows point the same way
SAME = 1e-12


def foolsgold_weights(stacked: torch.Tensor) -> torch.Tensor:
    """FoolsGold's weight of every row (see the module docstring).

    Args:
        stacked: (n, numel) contributions.

    Returns:
        (n,) float64 in [0, 1]; all 0 when nothing tells the rows apart (all alike).
    """
    check_rows(stacked, "sybil")
    n = stacked.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    cs = cosine_similarities(stacked).cpu()
    cs.fill_diagonal_(-math.inf)
    v = cs.max(dim=1).values.clamp_min(0.0)
    pardon = v[None, :] > v[:, None]  # [i, j]: v_j > v_i
    cs = torch.where(pardon, cs * v[:, None] / v[None, :].clamp_min(1e-300), cs)
    w = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    # identical rows' similarity is 1 to within rounding (~1e-16); a residue of it would be
    # blown up to 1 by the division below when every row is alike
    w[w < SAME] = 0.0
    if float(w.max()) == 0.0:
        return w
    w = w / w.max()
    logit = torch.log(w / (1.0 - w)) + 0.5  # w = 1: +inf, clipped to 1; w = 0: -inf, to 0
    return logit.nan_to_num(nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def sybil(stacked: torch.Tensor) -> torch.Tensor:
    """The mean weighted by :func:`foolsgold_weights` (the plain mean if they are all 0).

    Args:
        stacked: (n, numel) contributions.

    Returns:
        (numel,) a new tensor.
    """
    return _weighted(stacked, foolsgold_weights(stacked))[0]


def _weighted(stacked: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean weighted by ``w`` (the plain mean if ``w`` is all 0), and the weights used.
    Block by block (``w @ block``): no (n, numel) product is materialized."""
    if float(w.sum()) == 0.0:
        return mean(stacked), torch.ones_like(w)
    coef = (w / w.sum()).to(dtype=stacked.dtype, device=stacked.device)
    out = torch.empty(stacked.shape[1], dtype=stacked.dtype, device=stacked.device)
    for a in range(0, stacked.shape[1], BLOCK):
        torch.mv(stacked[:, a:a + BLOCK].T, coef, out=out[a:a + BLOCK])
    return out, w


class FoolsGold(Rule):
    """The stateless FoolsGold Sybil defence (Fung et al. 2020): the mean weighted down by
    each row's similarity to the others; identical rows (clones) get weight 0.

    Breakdown: 0. It is no defence against Byzantine rows in general (one row far from the
    others keeps weight 1); it defends against several workers sending alike updates.
    ``weights`` are ignored. ``influence``: each row's FoolsGold weight (1 for every row when
    all weights are 0 and the plain mean is used).

    Args:
        clip_norm: see :class:`~islands.aggregators.rule.Rule`.
    """

    whole_vector = True

    def _aggregate(self, stacked, weights, key):
        return _weighted(stacked, foolsgold_weights(stacked))

    def breakdown(self, n: int) -> int:
        return 0

    def __repr__(self) -> str:
        return f"FoolsGold({self._clip_repr()})"


@register("aggregator", "sybil")
@dataclass(frozen=True, kw_only=True)
class SybilConfig(AggregatorConfig):
    """``[aggregator] name = "sybil"``: the stateless FoolsGold Sybil defence."""

    name: str = "sybil"

    def build(self) -> FoolsGold:
        """A new :class:`FoolsGold` (one per worker)."""
        return FoolsGold(clip_norm=self.clip_norm)
