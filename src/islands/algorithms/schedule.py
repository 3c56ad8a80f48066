"""Schedules of a run's recipe: the inner steps per round (H) as a function of the inner step,
the round boundaries that follow from it, and the outer optimizer's settings per outer step.

The DiLoCo papers sync more often early in training, when the parameters move fast, and less
later (Charles et al. 2025, "Communication-Efficient Language Model Training Scales Reliably
and Robustly: Scaling Laws for DiLoCo", tune H and the outer learning rate per scale); the
forms here are what ``[algorithm] sync_every`` and ``[outer] lr`` / ``momentum`` accept:

* H: an int, or ``[[step, H], ...]`` pairs: from inner step ``step`` on, rounds of ``H`` inner
  steps. A round that starts at step ``s`` lasts the ``H`` in force at ``s``; a change point
  inside a round takes effect at the next round (a round is never cut short, which would pay a
  full sync for a few steps).
* an outer setting: a number, or ``[[outer_step, value], ...]`` points joined by straight
  lines, the last value after the last point (a warm-up of the outer lr, a momentum ramp).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from islands.core.sections import check, listed, points

SyncEvery = int | Sequence[Sequence[int]]
Points = float | Sequence[Sequence[float]]


def h_at(sync_every: SyncEvery, step: int) -> int:
    """The H in force at inner step ``step``: the last pair whose step is <= ``step``."""
    if isinstance(sync_every, int):
        return sync_every
    starts = [s for s, _ in sync_every]
    return int(sync_every[max(0, bisect.bisect_right(starts, step) - 1)][1])


def check_sync_every(sync_every: SyncEvery) -> None:
    """Raises ``ValueError`` unless ``sync_every`` is an int >= 1 or ``[[0, H], [step, H],
    ...]`` with increasing steps and every H >= 1."""
    if isinstance(sync_every, int):
        if sync_every < 1:
            raise ValueError(f"sync_every ({sync_every}) must be >= 1")
        return
    pairs = [tuple(p) for p in sync_every]
    if not pairs or pairs[0][0] != 0 or any(len(p) != 2 for p in pairs):
        raise ValueError(f"sync_every ({sync_every}) must be [[0, H], [step, H], ...]")
    if any(b[0] <= a[0] for a, b in zip(pairs, pairs[1:])) or any(h < 1 for _, h in pairs):
        raise ValueError(f"sync_every ({sync_every}): steps must increase and every H be >= 1")


def round_bounds(steps: int, sync_every: SyncEvery,
                 syncs_gradients_at: Callable[[int], bool]) -> list[int]:
    """The inner step each round starts at, and ``steps`` last (``len - 1`` rounds).

    A step that all-reduces gradients (DDP, a data-parallel phase) is a round of its own; the
    others form rounds of :func:`h_at` steps; the last round ends at ``steps``.
    """
    bounds = [0]
    while bounds[-1] < steps:
        s = bounds[-1]
        h = 1 if syncs_gradients_at(s) else h_at(sync_every, s)
        bounds.append(min(steps, s + h))
    return bounds


def value_at(points: Points, x: float) -> float:
    """A setting at ``x``: the number itself, or the straight line through ``points``
    (``[[x0, v0], [x1, v1], ...]``, x increasing), flat before the first and after the last."""
    if isinstance(points, (int, float)):
        return float(points)
    xs = [p[0] for p in points]
    i = bisect.bisect_right(xs, x)
    if i == 0:
        return float(points[0][1])
    if i == len(points):
        return float(points[-1][1])
    (x0, v0), (x1, v1) = points[i - 1], points[i]
    return float(v0 + (v1 - v0) * (x - x0) / (x1 - x0))


def outer_schedule(**settings: Points) -> Callable[[int], dict[str, float]] | None:
    """``outer_step -> {param-group key: value}`` for the settings given as points (those
    given as plain numbers are the optimizer's own and never rewritten); None when there are
    none, so a run without a schedule never touches its outer optimizer's settings."""
    scheduled = {k: v for k, v in settings.items() if not isinstance(v, (int, float))}
    if not scheduled:
        return None
    return lambda k: {key: value_at(points, k) for key, points in scheduled.items()}


def largest(points: Points) -> float:
    """The largest value a setting takes (a plain number: itself)."""
    if isinstance(points, (int, float)):
        return float(points)
    return float(max(v for _, v in points))


def sync_every_setting(value) -> SyncEvery:
    """``[algorithm] sync_every`` validated for a config: an int >= 1 or an H schedule
    (returned as tuples); a ``ConfigError`` names the key otherwise."""
    if isinstance(value, int):
        check(value >= 1, "algorithm.sync_every", value, "must be >= 1")
        return value
    value = points("algorithm.sync_every", value, "H", int)
    check(all(h >= 1 for _, h in value), "algorithm.sync_every", listed(value),
          "needs every H >= 1")
    return value
