"""The streamed mean equals the stacked one bit for bit (the collective's reduction may not
change a single result), and torch's own order from five rows on is why larger groups stack."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from islands.aggregators.mean import MAX_STREAMED_ROWS, mean, mean_of_rows, streams

SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-38, 3e38, -3e38, 1.0, -1.0, 1 / 3, 65504.0]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (``torch.equal`` calls -0.0 and +0.0 equal; this does not)."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def rows_of(n: int, numel: int, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Rows of very different magnitudes (so any change of order shows), with a few columns
    of special values and one column that is -0.0 in every row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        r = torch.randn(numel, generator=g, dtype=torch.float64) * 10.0 ** (3 * i - 4)
        if numel > 4:
            pick = torch.randint(0, len(SPECIAL), (numel // 5,), generator=g)
            where = torch.randint(0, numel, (numel // 5,), generator=g)
            r[where] = torch.tensor(SPECIAL, dtype=torch.float64)[pick]
        rows.append(r.to(dtype))
    if numel:
        for r in rows:
            r[-1] = -0.0
    return rows


def check(rows: list[torch.Tensor], weights: torch.Tensor | None, chunk: int) -> None:
    want = mean(torch.stack(rows), weights)
    got = mean_of_rows(rows, weights, torch.empty_like(rows[0]), chunk=chunk)
    assert same_bits(got, want), (got - want).abs().max()


@settings(max_examples=200)
@given(n=st.integers(1, MAX_STREAMED_ROWS), numel=st.integers(0, 300),
       weighted=st.booleans(), seed=st.integers(0, 2**31),
       chunk=st.sampled_from([1, 7, 64, 1 << 20]), double=st.booleans())
def test_mean_of_rows_is_mean_bit_for_bit(n, numel, weighted, seed, chunk, double):
    rows = rows_of(n, numel, seed, torch.float64 if double else torch.float32)
    weights = None
    if weighted:
        weights = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        weights[0] += 0.1  # a positive sum
    check(rows, weights, chunk)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", range(1, MAX_STREAMED_ROWS + 1))
def test_mean_of_rows_is_mean_at_the_vector_loops_edges(n, threads):
    """Columns at the ends of torch's vectorized loops (multiples of 8, 16, 32, 64 and past
    them), large tensors that torch splits across threads, zero weights."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for numel in (1, 7, 8, 15, 31, 32, 33, 63, 64, 65, 127, 129, 4097, 70_001, 300_007):
            rows = rows_of(n, numel, seed=numel + n)
            check(rows, None, chunk=1 << 20)
            check(rows, torch.tensor([0.0] + [1.5] * (n - 1), dtype=torch.float64)
                  if n > 1 else torch.ones(1, dtype=torch.float64), chunk=4096)
    finally:
        torch.set_num_threads(before)


def test_five_rows_and_more_are_summed_in_another_order_so_they_stack():
    """Why MAX_STREAMED_ROWS is 4: from five rows on, some columns of torch's sum are not the
    row-order sum (if this fails, torch changed its order: revisit MAX_STREAMED_ROWS)."""
    assert not streams(MAX_STREAMED_ROWS + 1, torch.float32)
    for n in range(MAX_STREAMED_ROWS + 1, 10):
        differs = False
        for seed in range(10):
            g = torch.Generator().manual_seed(seed)
            # 1000 = 15 · 64 + 40 columns: some past torch's vector loop, where the order differs
            rows = list(torch.randn(n, 1000, generator=g) * torch.logspace(-3, 3, n)[:, None])
            in_order = rows[0].clone()
            for r in rows[1:]:
                in_order += r
            differs |= not same_bits(in_order + 0.0, torch.stack(rows).sum(0))
        assert differs, n


def test_weights_are_validated_as_mean_does():
    rows = [torch.ones(3), torch.ones(3)]
    with pytest.raises(ValueError, match="weights"):
        mean_of_rows(rows, torch.tensor([-1.0, 2.0], dtype=torch.float64), torch.empty(3))
    with pytest.raises(ValueError, match="weights"):
        mean(torch.stack(rows), torch.zeros(2, dtype=torch.float64))
