"""Properties of every codec: shape and dtype kept, identity exact, error within the stated
bound, wire size equal to the formula, decodable by another worker's instance, NaN/Inf refused
with the tensor's name, error feedback conserving ``Σ decoded + residual``, and round trips of
the awkward tensors (empty, one element, ragged last block, all zeros, huge, non-contiguous)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from islands.codecs import Entropy, ErrorFeedback
from islands.codecs.chunk_topk import layout_bounds, runs
from islands.core.errors import CodecError
from tests.codec_cases import FACTORIES
from tests.codec_cases import make as make_for

LAYOUT = [torch.Size([12, 20]), torch.Size([20]), torch.Size([16, 8, 2]), torch.Size([7])]
LAYOUT_NUMEL = sum(math.prod(s) for s in LAYOUT)


def make(name: str):
    return make_for(name, LAYOUT)


def ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.finfo(torch.float32).eps * x.abs() + 1e-37


def blocks(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    return list(x.split(block))


def per_value_scale(x: torch.Tensor, block: int, levels: float) -> torch.Tensor:
    """Reference (loop) blockwise absmax scale broadcast to every value."""
    parts = [torch.full_like(b, max(float(b.abs().max()), 1e-30) / levels)
             for b in blocks(x, block) if b.numel()]
    return torch.cat(parts) if parts else x.clone()


def check_bound(name: str, x: torch.Tensor, d: torch.Tensor, offset: int = 0) -> None:
    """The documented error bound of each codec (docs/codecs.md); ``x`` sits at ``offset``
    of a vector laid out as ``LAYOUT`` (the chunked codecs' chunks follow its tensors)."""
    err = (x - d).abs()
    if x.numel() == 0:
        return
    if name == "identity":
        assert torch.equal(x, d)
    elif name in ("fp16", "bf16"):
        rel = 2.0 ** -11 if name == "fp16" else 2.0 ** -8
        assert bool((err <= rel * x.abs() + 6.1e-5 * rel).all())
    elif name.startswith(("int8", "int4")):
        block, levels = (32, 127) if name.startswith("int8") else (16, 7)
        s = per_value_scale(x, block, levels)
        factor = 1.0 if "stochastic" in name else 0.5
        assert bool((err <= factor * s * (1 + 1e-5) + ulp(x)).all())
    elif name == "fp4":
        s = per_value_scale(x, 16, 6)
        assert bool((err <= torch.maximum(s, x.abs()) / 4 * (1 + 1e-5) + ulp(x)).all())
    elif name.startswith("topk"):
        k = int((d != 0).sum())
        energy = float(x.square().sum())
        assert float(err.square().sum()) <= (1 - k / x.numel()) * energy * (1 + 1e-5) + 1e-30
        kept = d != 0
        if kept.any() and (~kept).any():  # nothing dropped is larger than what was kept
            assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())
    elif name == "randomk":
        assert bool(((d == x) | (d == 0)).all())
    elif name.startswith("sign"):
        block = 8 if name == "sign-block" else max(1, x.numel())
        for xb, db in zip(blocks(x, block), blocks(d, block)):
            assert float((xb - db).square().sum()) <= float(xb.square().sum()) * (1 + 1e-5) + 1e-30
            torch.testing.assert_close(db.abs().sum(), xb.abs().sum(), rtol=1e-4, atol=1e-30)
    elif name == "powersgd":
        assert float((x - d).norm()) <= float(x.norm()) * (1 + 1e-4) + 1e-6
    elif name.startswith(("chunk_topk", "dct_topk")):  # per chunk of the tensors of LAYOUT
        name = name.split("-")[0]  # (the index coding does not change what is kept)
        chunk, k = (16, 4) if name == "chunk_topk" else (8, 3)  # ceil(0.2 * 16) = 4
        for a, n in runs(layout_bounds(LAYOUT), chunk, offset, x.numel()):
            for xb, db in zip(blocks(x[a:a + n].double(), chunk), blocks(d[a:a + n].double(),
                                                                         chunk)):
                # a short chunk: chunk_topk keeps min(k, len); dct_topk pads it to a chunk
                share = k / (xb.numel() if name == "chunk_topk" else chunk)
                energy = float(xb.square().sum())
                slack = 1e-5 if name == "chunk_topk" else 1e-4  # dct: two float32 transforms
                bound = max(0.0, 1 - share) * energy * (1 + slack) + slack * 1e-2 * energy
                assert float((xb - db).square().sum()) <= bound + 1e-30
                kept = db != 0
                if name == "chunk_topk" and kept.any() and (~kept).any():
                    assert float(xb[~kept].abs().max()) <= float(xb[kept].abs().min())
    elif name.startswith("quant"):
        bits, block = (2, 8) if name == "quant" else (1, max(1, x.numel()))
        for xb, db in zip(blocks(x, block), blocks(d, block)):
            m = xb.abs()
            half_bin = (m.max() - m.min()) / 2 ** bits
            assert bool(((xb - db).abs() <= half_bin * (1 + 1e-5) + ulp(xb) * 4).all())
            nonzero = db != 0
            assert bool((torch.sign(db) == torch.where(xb < 0, -1.0, 1.0))[nonzero].all())


finite32 = st.floats(-6e4, 6e4, width=32, allow_nan=False, allow_infinity=False)
vectors = hnp.arrays(np.float32, st.integers(0, 300), elements=finite32)
STATELESS = [n for n in FACTORIES if not n.startswith(("ef-", "entropy-ef"))]


@pytest.mark.parametrize("name", list(FACTORIES))
@given(data=vectors, offset=st.integers(0, 200))
def test_shape_dtype_wire_size(name, data, offset):
    x = torch.from_numpy(data)
    codec = make(name)
    e = codec.encode(x, key="w0/t/scatter", offset=offset)
    d = make(name).decode(e)  # another worker's instance decodes it
    assert d.shape == x.shape and d.dtype == x.dtype
    expected = codec.wire_bytes(x.numel(), offset)
    if expected is not None:
        assert e.nbytes == expected


@pytest.mark.parametrize("name", STATELESS)
@given(data=vectors, offset=st.integers(0, LAYOUT_NUMEL))
def test_error_within_bound(name, data, offset):
    x = torch.from_numpy(data)
    if name == "fp16":
        x = x.clamp(-6e4, 6e4)
    check_bound(name, x, make(name).decode(make(name).encode(x, offset=offset)), offset)


@pytest.mark.parametrize("inner", ["int8", "int4", "fp4", "topk", "sign", "powersgd",
                                   "chain-chunk_topk-quant"])
@given(data=vectors)
def test_entropy_stage_is_lossless(inner, data):
    x = torch.from_numpy(data)
    plain, coded = make(inner), Entropy(make(inner))
    coded.bind_layout(LAYOUT)
    want = plain.decode(plain.encode(x, key="k"))
    got = coded.decode(coded.encode(x, key="k"))
    assert torch.equal(want, got)


@pytest.mark.parametrize("inner", ["topk", "sign", "int4", "fp4", "powersgd", "randomk",
                                   "chunk_topk", "dct_topk", "chain-chunk_topk-quant"])
@given(rounds=st.lists(hnp.arrays(np.float32, 64, elements=finite32), min_size=1, max_size=6),
       offset=st.integers(0, 100))
def test_error_feedback_conserves_the_sum(inner, rounds, offset):
    codec = ErrorFeedback(make(inner))
    codec.bind_layout(LAYOUT)
    sent = torch.zeros(64, dtype=torch.float64)
    total = torch.zeros(64, dtype=torch.float64)
    for data in rounds:
        x = torch.from_numpy(data)
        sent += codec.decode(codec.encode(x, key="w1/g/scatter", offset=offset)).double()
        total += x.double()
    residual = codec.state_dict()["residual/w1/g/scatter"][offset:offset + 64].double()
    scale = max(1.0, float(total.abs().max()))
    torch.testing.assert_close(sent + residual, total, rtol=0, atol=1e-5 * scale * len(rounds))


EDGE = {
    "empty": torch.empty(0),
    "one": torch.tensor([3.5]),
    "ragged": torch.randn(101, generator=torch.Generator().manual_seed(1)),
    "zeros": torch.zeros(77),
    "huge": torch.randn(50, generator=torch.Generator().manual_seed(2)) * 1e37,
    "tiny": torch.randn(50, generator=torch.Generator().manual_seed(3)) * 1e-40,
    "non_contiguous": torch.randn(20, 9, generator=torch.Generator().manual_seed(4)).T,
    "strided": torch.randn(200, generator=torch.Generator().manual_seed(5))[::3],
}


@pytest.mark.parametrize("case", list(EDGE))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_edge_cases_round_trip(name, case):
    x = EDGE[case]
    if name == "fp16" and case == "huge":
        with pytest.raises(CodecError, match="beyond fp16"):
            make(name).encode(x, key="w0/edge")
        return
    codec = make(name)
    e = codec.encode(x, key="w0/edge")
    d = make(name).decode(e).reshape(x.shape)
    assert d.shape == x.shape and d.dtype == x.dtype and bool(torch.isfinite(d).all())
    if codec.wire_bytes(x.numel()) is not None:
        assert e.nbytes == codec.wire_bytes(x.numel())
    if name in STATELESS and not (name in ("fp16", "bf16") and case == "tiny"):
        check_bound(name, x.reshape(-1), d.reshape(-1))
    if case == "zeros":
        assert not d.any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_other_float_dtypes_come_back_as_given(name, dtype):
    x = torch.randn(70).to(dtype)
    assert make(name).decode(make(name).encode(x, key="k")).dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_nan_inf_is_refused_naming_the_tensor(name, bad):
    x = torch.randn(40)
    x[7] = bad
    with pytest.raises(CodecError, match=r"w3/pseudo-gradient/scatter.*NaN/Inf"):
        make(name).encode(x, key="w3/pseudo-gradient/scatter", offset=10)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_integer_tensors_are_refused(name):
    with pytest.raises(CodecError, match="float tensors"):
        make(name).encode(torch.arange(5), key="k")


@pytest.mark.parametrize("name", list(FACTORIES))
@given(data=vectors, offset=st.integers(0, 200))
def test_decode_into_writes_what_decode_returns(name, data, offset):
    x = torch.from_numpy(data)
    e = make(name).encode(x, key="w0/t/scatter", offset=offset)
    rows = torch.full((3, x.numel()), 7.0)  # the collective decodes into rows of a buffer
    got = make(name).decode_into(e, rows[1])
    assert got.data_ptr() == rows[1].data_ptr()
    assert torch.equal(rows[1], make(name).decode(e))
    assert bool((rows[0] == 7).all() and (rows[2] == 7).all())  # nothing written elsewhere


@pytest.mark.parametrize("name", ["int8", "int4"])
@given(data=hnp.arrays(np.float32, st.integers(0, 700), elements=finite32))
def test_encoding_in_pieces_equals_encoding_at_once(name, data):
    """The quantizers work in cache-sized pieces; the pieces' seams change nothing."""
    import islands.codecs.int8 as int8_module

    x = torch.from_numpy(data)
    saved = int8_module.CHUNK
    try:
        int8_module.CHUNK = 1 << 20
        whole = make(name).encode(x, key="k")
        int8_module.CHUNK = 40  # pieces of one (int8) or two (int4) blocks
        pieces = make(name).encode(x, key="k")
        assert all(torch.equal(whole.tensors[k], pieces.tensors[k]) for k in whole.tensors)
        assert torch.equal(make(name).decode(pieces), make(name).decode(whole))
    finally:
        int8_module.CHUNK = saved


@pytest.mark.parametrize("name", ["int8", "int4", "int8-stochastic"])
def test_nan_in_a_later_piece_is_refused(name, monkeypatch):
    import islands.codecs.int8 as int8_module

    monkeypatch.setattr(int8_module, "CHUNK", 64)
    x = torch.randn(1000)
    x[900] = float("nan")
    with pytest.raises(CodecError, match=r"w1/delta\[5:1005\].*1 NaN/Inf"):
        make(name).encode(x, key="w1/delta", offset=5)
