"""The compiled CPU paths of the codecs (``islands.codecs.kernels``) against the tensor
operations they replace, bit for bit: bit packing, the 2-bit value stage, the chunked top-k
on full-size chunks, and error feedback's in-place residual update for a sparsifier. The
compiled paths run from :data:`~islands.codecs.packing.COMPILED_FROM` values on, so each test
builds inputs past it and turns the threshold off for the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from islands.codecs import build_codec, codec_config, kernels, packing
from islands.codecs.quant import Quant
from tests.property.test_sparse import _reference_top

NEVER = 10 ** 12  # a threshold no tensor reaches: the tensor operations


def _values(seed: int, n: int, bits: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** min(bits, 62), (n,), generator=g, dtype=torch.int64)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 56), n=st.integers(0, 9000), seed=st.integers(0, 2**31))
def test_compiled_bit_packing_gives_the_tensor_operations_bytes(bits, n, seed):
    v = _values(seed, n, bits)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "COMPILED_FROM", NEVER)
        want = packing.pack_bits(v, bits)
        unpacked = packing.unpack_bits(want, bits, n)
    assert torch.equal(kernels.pack(v, bits), want)
    assert torch.equal(kernels.unpack(want, bits, n), unpacked)
    assert torch.equal(kernels.unpack(want, bits, n), v)


def _floats(seed: int, n: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "wide":  # magnitudes from 1e-30 to 1e30 in one tensor
        x = x * torch.logspace(-30, 30, n)
    elif kind == "ties":  # few distinct values, signed zeros among them
        x = torch.tensor([0.0, -0.0, 1.5, -1.5, 2.0])[torch.randint(0, 5, (n,), generator=g)]
    return x


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), block=st.sampled_from([1, 7, 256, None]),
       n=st.integers(4096, 9000), seed=st.integers(0, 2**31),
       kind=st.sampled_from(["gauss", "wide", "ties"]))
def test_the_compiled_value_stage_gives_the_tensor_operations_codes_and_values(
        bits, block, n, seed, kind):
    x, q = _floats(seed, n, kind), Quant(bits, block=block)
    fast = q.encode(x, key="v")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "COMPILED_FROM", NEVER)
        slow = q.encode(x, key="v")
        want = q.decode(slow)
    assert fast.tensors.keys() == slow.tensors.keys()
    assert all(torch.equal(fast.tensors[k], slow.tensors[k]) for k in fast.tensors)
    assert q.decode(slow).numpy().tobytes() == want.numpy().tobytes()


@pytest.mark.parametrize("chunk, k", [(4096, 64), (4096, 41), (4096, 1), (4096, 200),
                                      (1000, 7), (333, 333), (4096, 4096)])
@pytest.mark.parametrize("kind", ["gauss", "ties"])
def test_the_compiled_selection_on_full_size_chunks_is_a_full_sort_s_first_k(chunk, k, kind):
    """Chunks of thousands of values, with many ties (a chunk's threshold shared by more
    values than it keeps) and a short tail: the bitmap's offset order and tie rule."""
    x = _floats(7, 3 * chunk + chunk // 3 + 5, kind)
    offsets, values = kernels.chunk_top(x, chunk, k)
    want_offsets, want_values = _reference_top(x.numpy(), chunk, k)
    assert offsets.tolist() == want_offsets.tolist()
    assert values.numpy().tobytes() == want_values.tobytes()


@pytest.mark.parametrize("codec", [
    {"name": "chain", "error_feedback": True, "error_feedback_beta": 0.95},
    {"name": "chunk_topk", "chunk": 1000, "error_feedback": True},
])
def test_error_feedback_s_sparse_update_gives_the_dense_residual_bits(codec):
    """A sparsifier's residual is updated in place at the kept positions only: the same
    payloads and residual bits, round after round and shard by shard (a layout bound inside
    the tensor), as decoding densely and subtracting."""
    sparse, dense = build_codec(codec_config(**codec)), build_codec(codec_config(**codec))
    dense.inner.__class__ = type("Dense", (type(dense.inner),), {"subtracts_sparse": False})
    assert sparse.inner.subtracts_sparse and not dense.inner.subtracts_sparse
    for c in (sparse, dense):
        c.bind_layout([torch.Size([3000, 7]), torch.Size([5000])])
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(26000, generator=g)
        for offset in (0, 13000):
            a = sparse.encode(x[offset:offset + 13000], key="s", offset=offset)
            b = dense.encode(x[offset:offset + 13000], key="s", offset=offset)
            assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        ra, rb = sparse.state_dict(), dense.state_dict()
        assert all(np.array_equal(ra[k].numpy().view(np.int32), rb[k].numpy().view(np.int32))
                   for k in ra)
    half = torch.randn(26000, generator=g).bfloat16()  # a bf16 model's pseudo-gradient
    a, b = sparse.encode(half, key="h"), dense.encode(half, key="h")
    assert torch.equal(sparse.decode(a), dense.decode(b)) and a.dtype == torch.bfloat16


def test_a_peer_s_malformed_sparse_payload_is_refused_not_written_out_of_bounds():
    """The compiled decoders read a peer's payload: offsets past their chunk's end (10-bit
    offsets for chunks of 1000 reach 1023), fewer values than offsets, or 2-bit values whose
    scales are shaped for another block count (the same bytes) are refused by name, and
    nothing past the buffer is written. 4808 kept values: past the compiled paths' start."""
    from islands.codecs.chain import Chain
    from islands.codecs.chunk_topk import ChunkTopK
    from islands.collectives.checks import decode_checked
    from islands.core.errors import PeerRefused

    n, kept = 600_500, 4808  # 600 chunks of 1000 keeping 8, then one of 500 keeping 8
    codec = Chain(ChunkTopK(count=8, chunk=1000), Quant(2, block=16))
    good = codec.encode(torch.randn(n, generator=torch.Generator().manual_seed(0)), key="x")
    assert good.meta["kept"] == kept >= packing.COMPILED_FROM
    guard = torch.full((n + 100,), 7.0)  # the payload's values, then 100 that must stay
    decode_checked(codec, good, guard[:n], 0, 3, "gather")
    assert torch.equal(guard[:n], codec.decode(good)) and bool((guard[n:] == 7).all())

    def forged(meta=None, **tensors):
        return type(good)({**good.tensors, **tensors}, numel=good.numel, dtype=good.dtype,
                          meta=meta or good.meta, header_bytes=good.header_bytes)

    offsets = packing.unpack_bits(good.tensors["indices"], 10, kept)
    offsets[-1] = 550  # the last chunk holds 500 values: 50 past it lies in the guard
    scales = good.tensors["values.scales"]
    for bad in (forged(indices=packing.pack_bits(offsets, 10)),
                forged(meta={**good.meta, "kept": kept - 8}),
                forged(**{"values.scales": scales.reshape(-1, 1)})):
        with pytest.raises(PeerRefused, match="worker 3 does not decode"):
            decode_checked(codec, bad, guard[:n], 0, 3, "gather")
        assert bool((guard[n:] == 7).all())
