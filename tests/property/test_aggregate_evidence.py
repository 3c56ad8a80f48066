"""The bound a coordinator holds a shard owner's aggregate to (:func:`islands.runtime.
evidence.misaggregated`): every honest float32 computation of a coordinate-wise rule passes,
whatever order it sums in and whatever slice of the shard it is shown, and a value moved
farther than the bound is caught."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from islands.aggregators import Median, TrimmedMean, mean
from islands.collectives.verify import recompute
from islands.core import signing
from islands.runtime.evidence import misaggregated

RULES = {"mean": mean, "median": Median(), "trimmed_mean": TrimmedMean(trim=0.25)}


def _rows(seed: int, n: int, numel: int, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(n, 1, generator=g) * spread)
    return torch.randn(n, numel, generator=g) * scale


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), numel=st.integers(1, 9000),
       spread=st.floats(0, 6), rule=st.sampled_from(sorted(RULES)),
       weighted=st.booleans())
def test_every_honest_float32_aggregate_passes_on_any_leaf(seed, n, numel, spread, rule,
                                                           weighted):
    """The rule on the whole shard (torch's own order of summation, which differs from a
    leaf's alone from five rows on), on each 16 KiB leaf by itself, and a plain row-by-row
    sum in reverse order are all within the bound of the float64 reference."""
    x = _rows(seed, n, numel, spread)
    w = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.1 \
        if weighted else None
    full = recompute(RULES[rule], x, w)
    per = signing.LEAF_BYTES // 4
    for a in range(0, numel, per):
        leaf = x[:, a:a + per]
        assert misaggregated(RULES[rule], leaf, w, full[a:a + per]) is None
        assert misaggregated(RULES[rule], leaf, w, recompute(RULES[rule], leaf, w)) is None
    if rule == "mean" and w is None:
        backwards = torch.zeros(numel)
        for row in x.flip(0):
            backwards += row
        assert misaggregated(mean, x, None, backwards / n) is None


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), numel=st.integers(1, 5000),
       rule=st.sampled_from(sorted(RULES)), at=st.integers(0, 4999),
       factor=st.sampled_from([2.0, 100.0, -1.0]))
def test_a_value_moved_past_the_bound_is_caught(seed, n, numel, rule, at, factor):
    """One value of the aggregate moved by ``factor`` times the bound (or negated where that
    moves it past the bound), or made NaN: caught, counted, at that value."""
    x = _rows(seed, n, numel, 1.0)
    out = recompute(RULES[rule], x, None).clone()
    at %= numel
    bound = 2 * (n + 2) * torch.finfo(torch.float32).eps / 2 * float(x[:, at].abs().max())
    if factor < 0:
        if abs(2 * float(out[at])) <= 2 * bound:
            out[at] = float("nan")
        else:
            out[at] = -out[at]
    else:
        out[at] += factor * bound + abs(float(out[at])) * 1e-6
    count, gap, bnd = misaggregated(RULES[rule], x, None, out)
    assert count == 1 and (gap > bnd or gap != gap)
