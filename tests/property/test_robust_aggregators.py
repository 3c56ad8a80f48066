"""The robust aggregation rules against plain numpy references (float64), and their
properties: the rows' order does not matter, equal rows give that row back, ``f`` adversarial
rows among honest rows in the box [-1, 1] move the result no further than each rule states,
and clipped rows keep their norm bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from islands.aggregators import (
    bulyan,
    centered_clip,
    clip_rows,
    coordinate_median,
    foolsgold_weights,
    krum_scores,
    multi_krum,
    sybil,
    trimmed_mean,
)
from islands.aggregators.clipping import BLOCK
from islands.aggregators.coordinate import trimmed_count

# --- numpy references, written from the papers' definitions ---------------------------------


def np_trimmed(x: np.ndarray, trim: float) -> np.ndarray:
    n = len(x)
    b = trimmed_count(n, trim)
    return np.sort(x, axis=0)[b:n - b].mean(axis=0)


def np_sq_dist(x: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=-1)


def np_scores(d: np.ndarray, k: int) -> np.ndarray:
    """The sum of each row's ``k`` smallest distances to the other rows."""
    return np.array([np.sort(np.delete(d[i], i))[:k].sum() for i in range(len(d))])


def np_multi_krum(x: np.ndarray, f: int, m: int) -> np.ndarray:
    pick = np.argsort(np_scores(np_sq_dist(x), len(x) - f - 2), kind="stable")[:m]
    return x[pick].mean(axis=0)


def np_bulyan(x: np.ndarray, f: int) -> np.ndarray:
    d = np_sq_dist(x)
    left, chosen = list(range(len(x))), []
    for _ in range(len(x) - 2 * f):
        k = min(len(x) - f - 2, len(left) - 1)  # Krum's count, of the rows left
        scores = np_scores(d[np.ix_(left, left)], k)
        chosen.append(left.pop(int(np.argsort(scores, kind="stable")[0])))
    sel = x[chosen]
    beta = len(sel) - 2 * f
    near = np.argsort(np.abs(sel - np.median(sel, axis=0)), axis=0, kind="stable")[:beta]
    return np.take_along_axis(sel, near, axis=0).mean(axis=0)


def np_centered_clip(x: np.ndarray, w: np.ndarray | None, tau: float | None,
                     iters: int) -> np.ndarray:
    w = np.full(len(x), 1 / len(x)) if w is None else w / w.sum()
    c = np.median(x, axis=0)
    for _ in range(iters):
        d = x - c
        norms = np.linalg.norm(d, axis=1)
        t = np.median(norms) if tau is None else tau
        factor = np.where(norms > t, t / np.maximum(norms, 1e-300), 1.0)
        c = c + (w * factor) @ d
    return c


def np_foolsgold(x: np.ndarray) -> np.ndarray:
    """As the FoolsGold reference implementation (its cs has 0 on the diagonal)."""
    n = len(x)
    norms = np.linalg.norm(x, axis=1)
    cs = (x @ x.T) / np.maximum(np.outer(norms, norms), 1e-300)
    np.fill_diagonal(cs, 0.0)  # the reference's cs - eye(n), without its rounding
    v = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and v[i] < v[j]:
                cs[i, j] *= v[i] / v[j]
    w = np.clip(1 - cs.max(axis=1), 0, 1)
    if w.max() == 0:
        return w
    w = w / w.max()
    w[w == 1] = 0.99
    with np.errstate(divide="ignore"):
        w = np.log(w / (1 - w)) + 0.5
    return np.clip(np.nan_to_num(w, posinf=1, neginf=0), 0, 1)


def np_sybil(x: np.ndarray) -> np.ndarray:
    w = np_foolsgold(x)
    return x.mean(axis=0) if w.sum() == 0 else (w / w.sum()) @ x


# --- the rules under test, with what each needs of n ----------------------------------------

# name -> (function of stacked, numpy reference, smallest n)
RULES = {
    "median": (coordinate_median, lambda x: np.median(x, axis=0), 1),
    "trimmed_mean": (lambda s: trimmed_mean(s, trim=0.2), lambda x: np_trimmed(x, 0.2), 1),
    "krum": (lambda s: multi_krum(s, f=1, m=1), lambda x: np_multi_krum(x, 1, 1), 5),
    "multi_krum": (lambda s: multi_krum(s, f=1, m=None),
                   lambda x: np_multi_krum(x, 1, len(x) - 1), 5),
    "bulyan": (lambda s: bulyan(s, f=1), lambda x: np_bulyan(x, 1), 7),
    "centered_clip": (lambda s: centered_clip(s, tau=None, iters=3),
                      lambda x: np_centered_clip(x, None, None, 3), 1),
    "sybil": (sybil, np_sybil, 1),
}
COORDINATE = {"median", "trimmed_mean"}


def rows(seed: int, n: int, numel: int, dtype=torch.float64) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.uniform(-1, 1, (n, numel))).to(dtype)


def close(a: torch.Tensor, b, dtype) -> bool:
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    return np.allclose(a.double().numpy(), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", RULES)
@given(extra=st.integers(0, 5), numel=st.integers(1, 40), seed=st.integers(0, 2**31),
       double=st.booleans())
def test_agrees_with_the_numpy_reference(name, extra, numel, seed, double):
    fn, ref, least = RULES[name]
    dtype = torch.float64 if double else torch.float32
    x = rows(seed, least + extra, numel, dtype)
    got = fn(x)
    assert got.dtype == dtype and got.shape == (numel,)
    assert close(got, ref(x.double().numpy()), dtype)


@pytest.mark.parametrize("name", RULES)
@given(extra=st.integers(0, 5), numel=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_the_rows_order_does_not_matter(name, extra, numel, seed):
    fn, _, least = RULES[name]
    x = rows(seed, least + extra, numel, torch.float32)
    perm = torch.from_numpy(np.random.default_rng(seed + 1).permutation(len(x)))
    a, b = fn(x), fn(x[perm])
    if name in COORDINATE:  # the kept values are summed in sorted order: bit for bit
        assert torch.equal(a, b)
    else:  # distinct rows select the same rows; sums may run in another order
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", RULES)
@given(n=st.integers(1, 10), numel=st.integers(1, 40), seed=st.integers(0, 2**31),
       scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_equal_rows_give_the_row(name, n, numel, seed, scale):
    fn, _, least = RULES[name]
    x = rows(seed, 1, numel, torch.float32)[0] * scale
    n = 1 if n < least else n  # one row is always enough
    got = fn(x.expand(n, numel).contiguous())
    assert torch.allclose(got, x, rtol=1e-6, atol=0)


# --- breakdown: f adversarial rows among honest rows in [-1, 1] ------------------------------


@st.composite
def attacked(draw, least_honest: int, f_max: int):
    """(honest (h, numel), adversarial (f, numel)) float64: far points (±1e6 per coordinate,
    one far point repeated: a cluster, or huge random values)."""
    numel = draw(st.integers(1, 30))
    f = draw(st.integers(1, f_max))
    h = draw(st.integers(least_honest(f), least_honest(f) + 4))
    g = np.random.default_rng(draw(st.integers(0, 2**31)))
    honest = g.uniform(-1, 1, (h, numel))
    kind = draw(st.sampled_from(["huge", "cluster", "far_point"]))
    if kind == "huge":
        bad = g.choice([-1e6, 1e6], (f, numel))
    elif kind == "cluster":
        bad = np.repeat(g.uniform(-1, 1, (1, numel)) + 1e3, f, axis=0)
    else:
        bad = g.normal(0, 1, (f, numel)) * 1e5
    return honest, bad


def mixed(honest: np.ndarray, bad: np.ndarray, seed: int = 0) -> torch.Tensor:
    x = np.concatenate([honest, bad])
    return torch.from_numpy(x[np.random.default_rng(seed).permutation(len(x))])


def within_honest_range(got: torch.Tensor, honest: np.ndarray) -> bool:
    out = got.numpy()
    return bool(np.all(out >= honest.min(axis=0) - 1e-12) and
                np.all(out <= honest.max(axis=0) + 1e-12))


@given(attacked(lambda f: f + 1, 4))
def test_the_median_stays_within_the_honest_values(case):
    honest, bad = case
    assert within_honest_range(coordinate_median(mixed(honest, bad)), honest)


@given(attacked(lambda f: 2 * f + 1, 3), st.integers(0, 2**31))
def test_the_trimmed_mean_stays_within_the_honest_values(case, seed):
    honest, bad = case
    n = len(honest) + len(bad)
    trim = (len(bad) + 0.5) / n  # cuts f from each end: b = floor(trim · n) = f
    assert trimmed_count(n, trim) == len(bad)
    assert within_honest_range(trimmed_mean(mixed(honest, bad, seed), trim=trim), honest)


@pytest.mark.parametrize("m", [1, None])
@given(case=attacked(lambda f: f + 3, 3))
def test_krum_averages_honest_rows_only(m, case):
    honest, bad = case
    f = len(bad)
    got = multi_krum(mixed(honest, bad), f=f, m=m).numpy()
    if m == 1:  # one of the honest rows itself
        assert np.any(np.all(np.isclose(honest, got, rtol=0, atol=1e-12), axis=1))
    else:  # the mean of n - f rows, all honest: every honest row, here
        assert np.allclose(got, honest.mean(axis=0), rtol=0, atol=1e-12)


@given(attacked(lambda f: 3 * f + 3, 2))
def test_bulyan_stays_within_the_honest_values(case):
    honest, bad = case
    assert within_honest_range(bulyan(mixed(honest, bad), f=len(bad)), honest)


@given(case=attacked(lambda f: f + 1, 3), tau=st.sampled_from([0.1, 1.0, 10.0]),
       iters=st.integers(1, 5))
def test_centered_clip_stays_near_the_honest_mean(case, tau, iters):
    """Let ``e_t`` be the center's distance to the honest mean μ and ``r`` the farthest honest
    row from μ. With weights 1/n each clipped offset is a convex step for the honest rows and
    at most ``tau`` long for a bad one, so ``e_{t+1} <= max(e_t, r) + (f / n) tau``. The start,
    the coordinate median, lies in the honest rows' bounding box (f < n / 2), so ``e_0`` and
    ``r`` are at most its diagonal ``D``: ``e_T <= D + T (f / n) tau``."""
    honest, bad = case
    n, f = len(honest) + len(bad), len(bad)
    got = centered_clip(mixed(honest, bad), tau=tau, iters=iters).numpy()
    diagonal = np.linalg.norm(honest.max(axis=0) - honest.min(axis=0))
    bound = diagonal + iters * f / n * tau
    assert np.linalg.norm(got - honest.mean(axis=0)) <= bound * (1 + 1e-9)


@given(n=st.integers(1, 8), numel=st.integers(1, 50), seed=st.integers(0, 2**31),
       clip_norm=st.sampled_from([1e-3, 0.5, 2.0, 1e3]), double=st.booleans())
def test_clipped_rows_keep_the_bound_and_short_rows_are_untouched(n, numel, seed, clip_norm,
                                                                  double):
    dtype = torch.float64 if double else torch.float32
    x = rows(seed, n, numel, dtype) * torch.logspace(-4, 4, n, dtype=dtype)[:, None]
    got = clip_rows(x, clip_norm)
    norms = x.double().norm(dim=1)
    assert torch.all(got.double().norm(dim=1) <= clip_norm)
    short = norms <= clip_norm
    assert torch.equal(got[short], x[short])
    long_ = ~short  # scaled, not turned: the same direction, at the bound
    assert torch.allclose(got[long_].double().norm(dim=1), torch.full_like(norms[long_],
                          clip_norm), rtol=1e-5)


def test_foolsgold_weights_agree_with_the_reference_implementation():
    g = np.random.default_rng(0)
    for n in range(2, 9):
        base = g.normal(size=(n, 30))
        base[n // 2:] += g.normal(size=30) * 3  # a group that points alike
        got = foolsgold_weights(torch.from_numpy(base)).numpy()
        assert np.allclose(got, np_foolsgold(base), atol=1e-9), n


@pytest.mark.parametrize("name", sorted(set(RULES) - {"krum", "multi_krum"}))
def test_columns_across_blocks_agree_with_the_reference(name):
    """More columns than one block (and a partial last block) of the blocked loops."""
    fn, ref, least = RULES[name]
    x = rows(1, max(least, 7), 2 * BLOCK + 3)
    assert close(fn(x), ref(x.numpy()), torch.float64)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31))
def test_krum_scores_agree_with_the_reference(seed):
    x = rows(seed, 9, 20)
    assert np.allclose(krum_scores(x, 2).numpy(), np_scores(np_sq_dist(x.numpy()), 9 - 2 - 2),
                       rtol=1e-9)
