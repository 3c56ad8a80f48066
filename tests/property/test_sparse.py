"""The sparse compressors' own properties: chunked top-k keeps exactly the stated count per
chunk (chunks following the tensors), the value quantizer's bound, the accumulator's mass
conservation (with and without decay), bytes equal to the documented formulas, and the
all-gather of sparse payloads equal to the dense mean of the decoded contributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from islands.aggregators import mean
from islands.codecs import Chain, ChunkTopK, DCTTopK, ErrorFeedback, Quant
from islands.codecs.chunk_topk import layout_bounds, runs
from islands.codecs.packing import unpack_bits
from islands.collectives.butterfly import MESSAGE_HEADER_BYTES, Group
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock

finite = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)


def test_runs_follow_the_tensors_and_a_slice_starts_with_the_rest_of_its_chunk():
    bounds = layout_bounds([torch.Size([10]), torch.Size([3]), torch.Size([2, 4])])  # 0 10 13 21
    assert runs(bounds, 4, 0, 21) == [(0, 10), (10, 3), (13, 8)]
    # the slice [6, 15): tensor 0 from 6 (its chunk [4, 8) has 2 left, then [8, 10)),
    # tensor 1 whole, tensor 2's first 2 values
    assert runs(bounds, 4, 6, 9) == [(0, 2), (2, 2), (4, 3), (7, 2)]
    assert runs(None, 4, 6, 9) == [(0, 9)]  # no layout: the slice is one tensor
    assert runs(bounds, 4, 0, 0) == []


@settings(max_examples=60)
@given(sizes=st.lists(st.integers(1, 70), min_size=1, max_size=5),
       chunk=st.integers(1, 33), k=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_chunked_top_k_keeps_exactly_k_per_chunk_and_the_largest(sizes, chunk, k, seed):
    shapes = [torch.Size([n]) for n in sizes]
    k = min(k, chunk)  # a chunk keeps at most all of itself
    x = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed))
    codec = ChunkTopK(count=k, chunk=chunk)
    codec.bind_layout(shapes)
    e = codec.encode(x)
    d = codec.decode(e)
    start = 0
    for n in sizes:
        for a in range(start, start + n, chunk):
            b = min(a + chunk, start + n)
            kept = d[a:b] != 0  # randn has no zeros
            assert int(kept.sum()) == min(k, b - a)
            if (~kept).any():
                assert float(x[a:b][~kept].abs().max()) <= float(x[a:b][kept].abs().min())
            assert torch.equal(d[a:b][kept], x[a:b][kept])
        start += n
    want = sum((n // chunk) * k + min(k, n % chunk) for n in sizes)
    offsets = unpack_bits(e.tensors["indices"], max(1, (chunk - 1).bit_length()), want)
    assert bool((offsets < chunk).all()) and e.tensors["values"].numel() == want
    assert e.nbytes == 4 * want + math.ceil(want * max(1, (chunk - 1).bit_length()) / 8)


def _reference_top(x: np.ndarray, chunk: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (ascending, per chunk) and values of each chunk's k largest |x|, ties to the
    lower offset: a full sort, written plainly."""
    offsets, values = [], []
    for a in range(0, len(x), chunk):
        part = x[a:a + chunk]
        order = np.lexsort((np.arange(len(part)), -np.abs(part)))[:k]  # |x| desc, offset asc
        kept = np.sort(order)
        offsets += kept.tolist()
        values += part[kept].tolist()
    return np.array(offsets, np.int64), np.array(values, np.float32)


@settings(max_examples=80)
@given(data=hnp.arrays(np.float32, st.integers(0, 400),
                       elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 3e-39,
                                                 7.0, 1e30]) | finite),
       chunk=st.integers(1, 100), k=st.integers(1, 30))
def test_the_compiled_selection_is_a_full_sort_s_first_k_with_ties_to_the_lower_offset(
        data, chunk, k):
    from islands.codecs import kernels

    k = min(k, chunk)
    offsets, values = kernels.chunk_top(torch.from_numpy(data), chunk, k)
    want_offsets, want_values = _reference_top(data, chunk, k)
    assert offsets.tolist() == want_offsets.tolist()
    assert values.numpy().tobytes() == want_values.tobytes()  # the very bits (signed zeros)
    # decoding: each chunk zeroed, the kept values at their offsets
    out = torch.full((len(data),), 9.0)
    kernels.scatter(out, offsets, values, chunk, k)
    want = np.zeros_like(data)
    starts = np.repeat(np.arange(0, len(data), chunk), [min(k, len(data) - a)
                                                        for a in range(0, len(data), chunk)])
    want[starts + want_offsets] = want_values
    assert out.numpy().tobytes() == want.tobytes()


def test_the_compiled_kernels_leave_torch_s_thread_count_as_they_found_it():
    """Numba's OpenMP layer can share torch's runtime: setting one's count set the other's
    (a benchmark at one torch thread ran on two after the first top-k)."""
    from islands.codecs import kernels

    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            offsets, values = kernels.chunk_top(torch.randn(10_000), 64, 2)
            assert torch.get_num_threads() == threads
            kernels.scatter(torch.empty(10_000), offsets, values, 64, 2)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 63, 777, 999])  # a full chunk's ends, the short tail
def test_a_non_finite_value_is_refused_by_the_chunked_top_k(bad, where):
    """A NaN/Inf outranks every finite magnitude, so its chunk keeps it: the codec checks
    the kept values only (no second pass over the input), and still refuses it."""
    from islands.core.errors import CodecError

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    x[where] = bad
    codec = Chain(ChunkTopK(count=4, chunk=64), Quant(2, block=8))
    assert codec.checks_finite
    with pytest.raises(CodecError, match=r"'delta\[100:1100\]' holds 1 NaN/Inf"):
        codec.encode(x, key="delta", offset=100)


@settings(max_examples=40)
@given(sizes=st.lists(st.integers(1, 90), min_size=1, max_size=4), chunk=st.integers(1, 40),
       k=st.integers(1, 12), cut=st.integers(0, 400), seed=st.integers(0, 2**31))
def test_decoding_a_shard_into_a_buffer_equals_decoding_it_afresh(sizes, chunk, k, cut, seed):
    """A butterfly shard starts inside a tensor: the compiled decode writes each piece's
    chunks where the torch decode (a scatter of every kept position) does."""
    total = sum(sizes)
    a = cut % total
    x = torch.randn(total, generator=torch.Generator().manual_seed(seed))[a:]
    codec = ChunkTopK(count=min(k, chunk), chunk=chunk)
    codec.bind_layout([torch.Size([n]) for n in sizes])
    e = codec.encode(x, offset=a)
    out = torch.full_like(x, 5.0)
    assert torch.equal(codec.decode_into(e, out), codec.decode(e))


@settings(max_examples=60)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
       chunk=st.sampled_from([1, 7, 16, 64, 256]), k=st.integers(1, 20),
       seed=st.integers(0, 2**31))
def test_rice_coded_offsets_decode_alike_and_cost_their_formula(sizes, chunk, k, seed):
    """Rice gaps: the same decoded tensor as packed offsets, in ``ceil((K + Σ q) / 8) +
    ceil(K r / 8)`` index bytes, ``q`` each gap's quotient."""
    x = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed))
    shapes = [torch.Size([n]) for n in sizes]
    packed, rice = ChunkTopK(count=k, chunk=chunk), ChunkTopK(count=k, chunk=chunk, index="rice")
    packed.bind_layout(shapes)
    rice.bind_layout(shapes)
    e = rice.encode(x)
    d = rice.decode(e)
    assert torch.equal(d, packed.decode(packed.encode(x)))
    gaps, start = [], 0
    for n in sizes:  # the gaps between the ascending kept positions of every chunk
        for a in range(start, start + n, chunk):
            where = (d[a:min(a + chunk, start + n)] != 0).nonzero().reshape(-1).tolist()
            gaps += [p - q - 1 for p, q in zip(where, [-1, *where[:-1]])]
        start += n
    r, kept = rice.rice, len(gaps)
    quotients = sum(g >> r for g in gaps)
    assert e.nbytes == 4 * kept + math.ceil((kept + quotients) / 8) + math.ceil(kept * r / 8)


@given(data=hnp.arrays(np.float32, st.integers(1, 300), elements=finite),
       bits=st.integers(1, 8), block=st.integers(1, 64))
def test_quantized_values_are_within_half_a_bin_with_their_sign(data, bits, block):
    x = torch.from_numpy(data)
    codec = Quant(bits, block=block)
    e = codec.encode(x)
    d = codec.decode(e)
    for xb, db in zip(x.split(block), d.split(block)):
        m = xb.abs()
        half = float(m.max() - m.min()) / 2 ** bits
        # (+ a denormal's worth: the bin width of denormal magnitudes underflows)
        assert float((xb - db).abs().max()) <= half * (1 + 1e-5) + 1e-4 * float(m.max()) + 1e-38
        moved = db != 0
        assert bool(((db < 0) == (xb < 0))[moved].all())
    assert e.nbytes == math.ceil(x.numel() * bits / 8) + 8 * math.ceil(x.numel() / block)


def _sparseloco(beta: float) -> ErrorFeedback:
    codec = ErrorFeedback(Chain(ChunkTopK(count=3, chunk=16), Quant(2, block=8)), beta=beta)
    codec.bind_layout([torch.Size([20, 3]), torch.Size([17])])
    return codec


@pytest.mark.parametrize("beta", [1.0, 0.95, 0.5])
@given(rounds=st.lists(hnp.arrays(np.float32, 77, elements=finite), min_size=1, max_size=6))
def test_the_accumulator_conserves_mass(beta, rounds):
    """Σ_t β^(T−t) (Δ_t − c_t) = e_T: with β = 1, Σ sent + e_T = Σ Δ."""
    codec = _sparseloco(beta)
    owed = torch.zeros(77, dtype=torch.float64)
    for data in rounds:
        delta = torch.from_numpy(data)
        sent = codec.decode(codec.encode(delta, key="w0/pseudo-gradient"))
        owed = beta * owed + delta.double() - sent.double()
    e = codec.state_dict()["residual/w0/pseudo-gradient"].double()
    scale = max(1.0, float(owed.abs().max()), max(float(np.abs(r).max()) for r in rounds))
    torch.testing.assert_close(e, owed, rtol=0, atol=1e-5 * scale * len(rounds))


@pytest.mark.parametrize("n", range(1, 10))
def test_the_all_gather_of_sparse_payloads_is_the_dense_mean_of_what_they_decode_to(n):
    numel = 301  # not a multiple of the chunk
    layout = [torch.Size([7, 30]), torch.Size([91])]
    xs = {i: torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(n)}

    def fresh():
        c = Chain(ChunkTopK(count=5, chunk=64), Quant(2, block=16))
        c.bind_layout(layout)
        return c

    transport = SimTransport(n, NetworkModel(), VirtualClock(n))
    got = Group(transport, tuple(range(n))).start_all_gather(
        xs, codecs={i: fresh() for i in range(n)}).wait()
    decoded = torch.stack([fresh().decode(fresh().encode(xs[i], key="probe")) for i in range(n)])
    expected = mean(decoded)
    for i in range(n):
        assert torch.equal(got[i], expected)
    # the tensors of 210 and 91 values: chunks of 64, 64, 64, 18 and 64, 27
    kept = sum((t // 64) * 5 + min(5, t % 64) for t in (210, 91))
    payload = (math.ceil(kept * 2 / 8) + 8 * math.ceil(kept / 16)  # 2-bit values, (lo, hi)
               + math.ceil(kept * 6 / 8))  # 6-bit offsets in chunks of 64
    for i in range(n):
        assert transport.sent(i) == transport.received(i) == (n - 1) * (
            payload + MESSAGE_HEADER_BYTES)


def test_dct_top_k_keeps_k_coefficients_per_chunk_of_each_tensor():
    codec = DCTTopK(count=3, chunk=8)
    codec.bind_layout([torch.Size([10]), torch.Size([5])])  # chunks: 8 + 2 (padded), 5
    x = torch.randn(15, generator=torch.Generator().manual_seed(0))
    e = codec.encode(x)
    assert e.tensors["values"].numel() == 3 * 3
    assert e.nbytes == codec.wire_bytes(15) == 4 * 9 + math.ceil(9 * 3 / 8)
    from islands.codecs.dct import dct_matrix

    coefficients = torch.zeros(8)
    coefficients[[0, 2, 5]] = torch.tensor([1.0, -0.5, 0.25])
    three = dct_matrix(8).T @ coefficients  # a chunk made of three cosines comes back whole
    one = DCTTopK(count=3, chunk=8)
    torch.testing.assert_close(one.decode(one.encode(three)), three, rtol=0, atol=1e-6)
