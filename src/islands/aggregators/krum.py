"""Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent") and Bulyan (El Mhamdi, Guerraoui and Rouault 2018, "The Hidden
Vulnerability of Distributed Learning in Byzantium").

Krum scores each row by the sum of its squared distances to its ``n - f - 2`` nearest other
rows and keeps the row of lowest score; Multi-Krum averages the ``m`` rows of lowest score.
Bulyan selects ``θ = n - 2f`` rows by Krum over and over (each time on the rows not yet
selected), then averages, per coordinate, the ``β = θ - 2f`` selected values closest to the
selected values' median. All three compare whole contributions, so the engine all-gathers
the rows for them (``whole_vector``).

Distances come from the Gram matrix ``G = X Xᵀ`` (``||a - b||² = G_aa + G_bb - 2 G_ab``),
accumulated in float64 over blocks of columns: one pass over the rows, ``n² · numel``
multiply-adds that BLAS runs near memory speed, and a float64 copy of one block at a time
rather than of every row. float32 products are exact in float64, so the cancellation in
``G_aa + G_bb - 2 G_ab`` costs about 1e-16 of the squared norms, not float32's 1e-7: rows
closer than about 1e-8 of their norms tie, and ties go to the lower row index.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from islands.aggregators.clipping import BLOCK, gram
from islands.aggregators.coordinate import BlockSorter
from islands.aggregators.rule import Rule, check_rows
from islands.core.errors import IslandsWarning
from islands.core.registry import register
from islands.core.sections import AggregatorConfig, check


def sq_distances(stacked: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances between the rows, (n, n) float64, from :func:`gram`."""
    g = gram(stacked)
    diag = g.diagonal()
    return (diag[:, None] + diag[None, :] - 2 * g).clamp_min_(0).fill_diagonal_(0)


def _need(rule: str, n: int, f: int, *, rows: int) -> None:
    # (f = 0 tolerates no Byzantine row: any n >= 1 will do)
    if f < 0 or (f > 0 and n < rows):
        raise ValueError(f"{rule} with f = {f} needs n >= {rows} rows and f >= 0, got n = {n}:"
                         f" lower f or aggregate more workers")


def tolerated(rule: str, f: int, n: int, *, per: int) -> int:
    """The ``f`` a rule that needs ``n >= per·f + 3`` rows can keep for a call on ``n`` rows:
    ``f`` itself where they suffice, else the largest ``f`` that does (0 at least), with a
    warning. A run's rows fall below what it started with when workers are banned, left out
    of a round or dropped as clones; the ones banned or dropped were among those to tolerate,
    so going on with fewer is what the rule can still promise, where refusing would end the
    run."""
    fit = max(0, (n - 3) // per)
    if f <= fit or n == 1:  # (one row is the result, whatever f)
        return min(f, fit)
    warnings.warn(IslandsWarning(
        f"{rule} with f = {f} needs n >= {per * f + 3} rows and got {n} (workers banned, left "
        f"out or dropped as clones): it tolerates f = {fit} of them until enough rows return"),
        stacklevel=3)
    return fit


def _scores(d: torch.Tensor, k: int) -> torch.Tensor:
    """The sum of each row's ``k`` smallest distances to the other rows, (n,) float64, from
    the (n, n) distances ``d``; Krum's score with ``k = n - f - 2``."""
    n = d.shape[0]
    others = d + torch.diag(torch.full((n,), torch.inf, dtype=d.dtype, device=d.device))
    return others.sort(dim=1).values[:, :k].sum(dim=1).cpu()


def _lowest(scores: torch.Tensor, m: int) -> list[int]:
    """The ``m`` rows of lowest score, lowest first, ties to the lower index."""
    return scores.sort(stable=True).indices[:m].tolist()


def krum_scores(stacked: torch.Tensor, f: int) -> torch.Tensor:
    """Each row's Krum score: the sum of its squared distances to its ``n - f - 2`` nearest
    other rows (Blanchard et al. 2017).

    Args:
        stacked: (n, numel), with ``n >= 2f + 3``.
        f: the Byzantine rows tolerated.

    Returns:
        (n,) float64.
    """
    check_rows(stacked, "krum")
    _need("krum", stacked.shape[0], f, rows=2 * f + 3)
    return _scores(sq_distances(stacked), stacked.shape[0] - f - 2)


def multi_krum_rows(stacked: torch.Tensor, f: int, m: int | None) -> list[int]:
    """The rows Multi-Krum averages: the ``m`` of lowest Krum score (None: ``n - f``)."""
    n = stacked.shape[0]
    if n == 1:
        return [0]
    _need("krum" if m == 1 else "multi_krum", n, f, rows=2 * f + 3)
    m = n - f if m is None else m
    if not 1 <= m <= n - f:
        raise ValueError(f"multi_krum: m ({m}) must be in [1, n - f] = [1, {n - f}] "
                         f"(n = {n}, f = {f}): lower m, or leave it unset for n - f")
    return _lowest(_scores(sq_distances(stacked), n - f - 2), m)


def multi_krum(stacked: torch.Tensor, *, f: int, m: int | None) -> torch.Tensor:
    """The mean of the ``m`` rows of lowest Krum score (``m = 1``: Krum).

    Args:
        stacked: (n, numel), with ``n >= 2f + 3`` (or ``n == 1``).
        f: the Byzantine rows tolerated.
        m: rows averaged, in [1, n - f]; None: ``n - f``.

    Returns:
        (numel,) a new tensor.
    """
    check_rows(stacked, "multi_krum")
    return mean_of(stacked, multi_krum_rows(stacked, f, m))


def mean_of(stacked: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The mean of ``rows`` of ``stacked``, summed in the order given."""
    out = stacked[rows[0]].clone()
    for r in rows[1:]:
        out += stacked[r]
    return out.div_(len(rows)) if len(rows) > 1 else out


def bulyan_rows(stacked: torch.Tensor, f: int) -> list[int]:
    """Bulyan's ``θ = n - 2f`` rows, in the order selected: each the lowest Krum score among
    the ``r`` rows not yet selected.

    Krum's ``n - f - 2`` neighbours are counted of the whole group, capped at the ``r - 1``
    others left (Krum on the ``r`` rows alone would need ``r >= 2f + 3``, which the last picks
    lack). So every pick (f >= 1) sums at least two distances: with one, the closest pair
    always ties and the row order, not the rows, would decide.
    """
    n = stacked.shape[0]
    d = sq_distances(stacked)
    left, chosen = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = d[left][:, left]
        pick = left[_lowest(_scores(sub, min(n - f - 2, len(left) - 1)), 1)[0]]
        chosen.append(pick)
        left.remove(pick)
    return chosen


def bulyan(stacked: torch.Tensor, *, f: int) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018) over Krum.

    Args:
        stacked: (n, numel), with ``n >= 4f + 3`` (or ``n == 1``).
        f: the Byzantine rows tolerated.

    Returns:
        (numel,) a new tensor.
    """
    check_rows(stacked, "bulyan")
    return bulyan_influence(stacked, f)[0]


def bulyan_influence(stacked: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bulyan`, and each row's share of coordinates whose value lies within the values
    averaged there (0 for a row not selected)."""
    n, numel = stacked.shape
    if n == 1:
        return stacked[0].clone(), torch.ones(1, dtype=torch.float64)
    _need("bulyan", n, f, rows=4 * f + 3)
    chosen = bulyan_rows(stacked, f)
    theta, beta = len(chosen), len(chosen) - 2 * f
    out = torch.empty(numel, dtype=stacked.dtype, device=stacked.device)
    counts = torch.zeros(theta, dtype=torch.int64, device=stacked.device)
    sorter = BlockSorter(theta, range(theta), stacked)
    picked = torch.tensor(chosen, device=stacked.device)
    for a in range(0, numel, BLOCK):
        block = stacked[:, a:a + BLOCK].index_select(0, picked)
        lo, hi = _closest_window(sorter.sort(block), beta, 2 * f, out=out[a:a + BLOCK])
        counts += ((block >= lo) & (block <= hi)).sum(dim=1)
    influence = torch.zeros(n, dtype=torch.float64)
    influence[chosen] = (counts.cpu().to(torch.float64) / numel if numel
                         else torch.ones(theta, dtype=torch.float64))
    return out, influence


def _closest_window(values: list[torch.Tensor], beta: int, starts: int, *,
                    out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes into ``out`` the mean of the ``beta`` of the sorted ``values`` (θ rows of a
    block) closest to their median, and returns the smallest and largest of them.

    The ``beta`` closest form a window of the sorted values starting at one of
    ``0 .. starts``: the window whose farther end is closest to the median (the first such on
    ties). Each window's sum is formed in sorted order and kept where it is the best so far
    (``torch.where``: the windows are few, and ``argmin``/``gather`` along dim 0 are slower).
    """
    theta = len(values)
    median = values[(theta - 1) // 2]
    if theta % 2 == 0:
        median = (median + values[theta // 2]) / 2
    best = lo = hi = None
    for s in range(starts + 1):
        first, last = values[s], values[s + beta - 1]
        end = torch.maximum((first - median).abs(), (last - median).abs())
        total = first + values[s + 1]
        for v in values[s + 2:s + beta]:
            total += v
        if best is not None:
            better = end < best  # on a tie the earlier window stays
            end, total = torch.where(better, end, best), torch.where(better, total, out)
            first, last = torch.where(better, first, lo), torch.where(better, last, hi)
        best, lo, hi = end, first, last
        out.copy_(total)
    out.div_(beta)
    return lo, hi


class Krum(Rule):
    """Krum (Blanchard et al. 2017): the row of lowest Krum score. Breakdown: ``f`` of
    ``n >= 2f + 3`` rows (a call on fewer tolerates the most they allow: :func:`tolerated`).
    ``weights`` are ignored. ``influence``: 1 for the selected row, 0 for the others.

    Args:
        f: the Byzantine rows tolerated.
        clip_norm: see :class:`~islands.aggregators.rule.Rule`.
    """

    whole_vector = True

    def __init__(self, *, f: int = 1, clip_norm: float | None = None) -> None:
        super().__init__(clip_norm=clip_norm)
        self.f = f

    def _aggregate(self, stacked, weights, key):
        f = tolerated("krum", self.f, stacked.shape[0], per=2)
        return _selected(stacked, multi_krum_rows(stacked, f, 1))

    def breakdown(self, n: int) -> int:
        _need("krum", n, self.f, rows=2 * self.f + 3)
        return self.f

    def __repr__(self) -> str:
        return f"Krum(f={self.f}{self._clip_repr(', ')})"


class MultiKrum(Rule):
    """Multi-Krum (Blanchard et al. 2017): the mean of the ``m`` rows of lowest Krum score.
    Breakdown: ``f`` of ``n >= 2f + 3`` rows (a call on fewer tolerates the most they allow,
    :func:`tolerated`, and averages at most ``n - f``). ``weights`` are ignored.
    ``influence``: 1 for the selected rows, 0 for the others.

    Args:
        f: the Byzantine rows tolerated.
        m: rows averaged; None: ``n - f`` of the call's ``n``.
        clip_norm: see :class:`~islands.aggregators.rule.Rule`.
    """

    whole_vector = True

    def __init__(self, *, f: int = 1, m: int | None = None,
                 clip_norm: float | None = None) -> None:
        super().__init__(clip_norm=clip_norm)
        self.f, self.m = f, m

    def _aggregate(self, stacked, weights, key):
        n = stacked.shape[0]
        f, m = tolerated("multi_krum", self.f, n, per=2), self.m
        if m is not None and m > n - f:
            warnings.warn(IslandsWarning(
                f"multi_krum with m = {m} averages at most n - f = {n - f} of {n} rows (workers "
                f"banned, left out or dropped as clones): it averages {n - f}"), stacklevel=2)
            m = n - f
        return _selected(stacked, multi_krum_rows(stacked, f, m))

    def breakdown(self, n: int) -> int:
        _need("multi_krum", n, self.f, rows=2 * self.f + 3)
        return self.f

    def __repr__(self) -> str:
        return f"MultiKrum(f={self.f}, m={self.m}{self._clip_repr(', ')})"


def _selected(stacked: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    influence = torch.zeros(stacked.shape[0], dtype=torch.float64)
    influence[rows] = 1.0
    return mean_of(stacked, rows), influence


class Bulyan(Rule):
    """Bulyan over Krum (El Mhamdi et al. 2018). Breakdown: ``f`` of ``n >= 4f + 3`` rows (a
    call on fewer tolerates the most they allow: :func:`tolerated`). ``weights`` are ignored.
    ``influence``: each row's share of coordinates whose value lies within the values averaged
    there (0 for a row Krum did not select).

    Args:
        f: the Byzantine rows tolerated.
        clip_norm: see :class:`~islands.aggregators.rule.Rule`.
    """

    whole_vector = True

    def __init__(self, *, f: int = 1, clip_norm: float | None = None) -> None:
        super().__init__(clip_norm=clip_norm)
        self.f = f

    def _aggregate(self, stacked, weights, key):
        return bulyan_influence(stacked, tolerated("bulyan", self.f, stacked.shape[0], per=4))

    def breakdown(self, n: int) -> int:
        _need("bulyan", n, self.f, rows=4 * self.f + 3)
        return self.f

    def __repr__(self) -> str:
        return f"Bulyan(f={self.f}{self._clip_repr(', ')})"


def _check_f(f: int, rule: str, rows: str) -> None:
    check(f >= 0, "aggregator.f", f,
          f"must be >= 0 for {rule} (the Byzantine workers tolerated; it needs {rows} workers)")


@register("aggregator", "krum")
@dataclass(frozen=True, kw_only=True)
class KrumConfig(AggregatorConfig):
    """``[aggregator] name = "krum"``: Krum, which needs ``workers >= 2f + 3``.

    Attributes:
        f: the Byzantine workers tolerated.
    """

    name: str = "krum"
    f: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_f(self.f, self.name, "2f + 3")

    def build(self) -> Krum:
        """A new :class:`Krum` (one per worker)."""
        return Krum(f=self.f, clip_norm=self.clip_norm)


@register("aggregator", "multi_krum")
@dataclass(frozen=True, kw_only=True)
class MultiKrumConfig(AggregatorConfig):
    """``[aggregator] name = "multi_krum"``: Multi-Krum, which needs ``workers >= 2f + 3``.

    Attributes:
        f: the Byzantine workers tolerated.
        m: the rows averaged, at most ``workers - f``; None: ``n - f`` of each aggregation.
    """

    name: str = "multi_krum"
    f: int = 1
    m: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_f(self.f, self.name, "2f + 3")
        check(self.m is None or self.m >= 1, "aggregator.m", self.m,
              "must be >= 1 for multi_krum (the rows averaged), or None for n - f")

    def build(self) -> MultiKrum:
        """A new :class:`MultiKrum` (one per worker)."""
        return MultiKrum(f=self.f, m=self.m, clip_norm=self.clip_norm)


@register("aggregator", "bulyan")
@dataclass(frozen=True, kw_only=True)
class BulyanConfig(AggregatorConfig):
    """``[aggregator] name = "bulyan"``: Bulyan over Krum, which needs ``workers >= 4f + 3``.

    Attributes:
        f: the Byzantine workers tolerated.
    """

    name: str = "bulyan"
    f: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_f(self.f, self.name, "4f + 3")

    def build(self) -> Bulyan:
        """A new :class:`Bulyan` (one per worker)."""
        return Bulyan(f=self.f, clip_norm=self.clip_norm)
