"""Chunked top-k (SparseLoCo, Sarfi et al. 2025, "Communication Efficient LLM Pre-training
with SparseLoCo"): each parameter tensor is cut into chunks of ``chunk`` values and each chunk
keeps its ``k`` values of largest magnitude, so every part of every tensor is represented (a
global top-k lets a few large tensors take the whole budget, and a layer norm's gains, small
beside a matrix's entries, would never be sent).

The tensors are those of :meth:`Codec.bind_layout` (the simulator and the runtime bind every
worker's codec to its model's parameter shapes); chunks start at each tensor's first value, so
a tensor smaller than ``chunk``, or the end of one, is a shorter chunk. Without a layout the
encoded tensor is one tensor. A slice that starts inside a tensor (a butterfly shard) begins with
the rest of the chunk it starts in. ``k`` per chunk is ``count``, or ``ceil(density * chunk)``
(at least 1); a chunk of ``t < chunk`` values keeps ``min(k, t)``. Offsets inside each chunk are
bit-packed at ``b = ceil(log2 chunk)`` bits (12 for 4096), chunk after chunk, or (``index =
"rice"``) coded as the gaps between a chunk's ascending offsets, Golomb-Rice with the parameter
``r`` that suits the mean gap ``(chunk - k) / k``: each gap's quotient in unary, its ``r`` low
bits packed (about 7 bits an offset for 3% of 4096). Values stay float32, for a value codec to
re-encode (``[codec] name = "chain"``: :mod:`islands.codecs.chain`).

Wire size: ``4 K + ceil(K b / 8)`` bytes, ``K = Σ_chunks min(k, len(chunk))`` (for one tensor of
``n`` values: ``(n // chunk) k + min(k, n % chunk)``); with Rice gaps ``4 K + ceil((K + Σ_i
(g_i >> r)) / 8) + ceil(K r / 8)``, which depends on the gaps ``g_i``.
Error bound: kept values exact, the others decode to 0; per chunk
``||x - x̂||² <= (1 - k / len(chunk)) ||x||²``. Biased: pair it with error feedback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from islands.codecs.base import (
    Codec,
    Encoded,
    all_finite,
    as_float32,
    check_finite,
    tensor_name,
)
from islands.codecs.packing import (
    index_bits,
    kept_count,
    pack_bits,
    rice_decode,
    rice_encode,
    rice_parameter,
    unpack_bits,
)
from islands.codecs.topk import (
    check_sparsity,
    check_sparsity_config,
    scatter,
    share,
    shown,
    sparse_bytes,
)
from islands.core.registry import register
from islands.core.sections import CodecConfig, check

INDEX_CODINGS = ("packed", "rice")  # how chunk_topk sends its offsets
DEFAULT_DENSITY = 1 / 64  # chunk_topk keeps 64 of 4096 when neither density nor count is set
_MAGNITUDE = 0x7FFFFFFF  # a float32's bits without its sign: ordered as |x| is


def magnitude_order(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``|x|`` of a float32 tensor as int32 bit patterns (the same order as ``|x|``; torch's
    top-k over int32 takes about 0.7x the time it takes over float32), written into ``out``
    (int32, ``x``'s shape) when given."""
    bits = x.contiguous().view(torch.int32)
    return torch.bitwise_and(bits, _MAGNITUDE, out=out) if out is not None else bits & _MAGNITUDE


def chunk_top(keys: torch.Tensor, chunk: int, k: int) -> torch.Tensor:
    """Offsets (int64, inside their chunk, ascending) of the ``k`` largest ``keys`` of each
    chunk, chunk after chunk, then the ``min(k, tail)`` largest of a shorter last chunk.
    Ascending offsets make the payload one canonical byte string, whatever order a device's
    top-k returns (CPU and CUDA differ)."""
    full = keys.numel() // chunk
    parts = []
    if full:
        top = torch.topk(keys[:full * chunk].view(full, chunk), k, dim=1, sorted=False)
        parts.append(top.indices.sort(dim=1).values.reshape(-1))
    tail = keys[full * chunk:]
    if tail.numel():
        parts.append(torch.topk(tail, min(k, tail.numel()), sorted=False).indices.sort().values)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def layout_bounds(shapes: list[torch.Size]) -> list[int]:
    """Where each tensor of a layout starts in the flat vector, then the total."""
    bounds = [0]
    for shape in shapes:
        bounds.append(bounds[-1] + math.prod(shape))
    return bounds


def runs(bounds: list[int] | None, chunk: int, offset: int, numel: int
         ) -> list[tuple[int, int]]:
    """The slice ``[offset, offset + numel)`` as ``(start in the slice, length)`` runs, each
    beginning where a chunk does: every tensor's part of the slice (``bounds``: where the
    tensors start; None, or a layout shorter than the slice (not the tensor it was bound
    for): the slice is one tensor), its first run the rest of the chunk the slice starts in
    when that is inside a tensor."""
    if bounds is None or bounds[-1] < offset + numel:
        return [(0, numel)] if numel else []
    out, end = [], offset + numel
    for ts, te in zip(bounds, bounds[1:]):
        a, b = max(ts, offset), min(te, end)
        if a >= b:
            continue
        aligned = ts + -(-(a - ts) // chunk) * chunk  # the first chunk start at or after a
        if aligned > a:
            out.append((a - offset, min(aligned, b) - a))
        if aligned < b:
            out.append((aligned - offset, b - aligned))
    return out


def kept_in(pieces: list[tuple[int, int]], chunk: int, k: int) -> int:
    """Values a chunked top-k keeps of ``pieces`` (see :func:`runs`)."""
    return sum((n // chunk) * k + min(k, n % chunk) for _, n in pieces)


def chunk_starts(numel: int, chunk: int, k: int) -> torch.Tensor:
    """Where the chunk of each kept value starts, in :func:`chunk_top`'s order."""
    full, tail = divmod(numel, chunk)
    starts = torch.arange(full, dtype=torch.int64).mul_(chunk).repeat_interleave(k)
    if tail:
        starts = torch.cat([starts, torch.full((min(k, tail),), full * chunk)])
    return starts


class ChunkTopK(Codec):
    """The ``k`` largest-magnitude values of every chunk, with per-chunk bit-packed offsets.

    Args:
        density: share of each chunk kept (``k = ceil(density * chunk)``).
        count: values kept per chunk (instead of ``density``).
        chunk: values per chunk.
        index: ``"packed"``: each offset in ``ceil(log2 chunk)`` bits; ``"rice"``: the gaps
            between a chunk's ascending offsets, Golomb-Rice coded (about 7 bits an offset
            for 3% of 4096 instead of 12; the size then depends on the positions).
    """

    name = "chunk_topk"
    checks_finite = True  # a NaN/Inf is always among the kept values (see _encode)
    sparse = True  # sends float32 "values" a value codec may re-encode (codecs.chain)

    def __init__(self, density: float | None = None, *, count: int | None = None,
                 chunk: int = 4096, index: str = "packed") -> None:
        check_sparsity(density, count, share="density")
        if chunk < 1:
            raise ValueError(f"chunk ({chunk}) must be >= 1")
        if index not in INDEX_CODINGS:
            raise ValueError(f"index ({index!r}) must be one of {INDEX_CODINGS}")
        self.density, self.count, self.chunk, self.index = density, count, chunk, index
        self.k = kept_count(chunk, density, count)
        # the Rice parameter suits the mean gap between k positions in a chunk
        self.rice = rice_parameter((chunk - self.k) / self.k)
        self._keys = torch.empty(0, dtype=torch.int32)  # kept between encodes: fresh pages cost
        self.bounds: list[int] | None = None  # where each tensor starts (bind_layout)

    def bind_layout(self, shapes: list[torch.Size]) -> None:
        self.bounds = layout_bounds(shapes)

    def kept(self, numel: int, offset: int = 0) -> int:
        """Values sent for ``numel`` values at ``offset`` (``K`` in the module's formula)."""
        return kept_in(runs(self.bounds, self.chunk, offset, numel), self.chunk, self.k)

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x).contiguous()
        pieces = runs(self.bounds, self.chunk, offset, x.numel())
        cpu = x.device.type == "cpu"
        # where each kept value's chunk starts: for the GPU's gather and Rice's gaps only
        starts = None if cpu and self.index == "packed" else self._starts(pieces)
        if cpu:  # compiled: one read of x (islands.codecs.kernels)
            from islands.codecs import kernels
            found = [kernels.chunk_top(x[a:a + n], self.chunk, self.k) for a, n in pieces]
            flat = _cat([f[0] for f in found], torch.int64)
            values = _cat([f[1] for f in found], torch.float32)
        else:
            if self._keys.numel() != x.numel() or self._keys.device != x.device:
                self._keys = torch.empty(x.numel(), dtype=torch.int32, device=x.device)
            keys = magnitude_order(x, self._keys)
            flat = _cat([chunk_top(keys[a:a + n], self.chunk, self.k) for a, n in pieces],
                        torch.int64, x.device)
            values = x[flat + starts]
        # a NaN/Inf outranks every finite magnitude, so its chunk keeps it: checking the
        # kept values checks x
        if not all_finite(values):
            check_finite(x, tensor_name(key, offset, x.numel()))
        return Encoded({"values": values, **self._code(flat, starts)}, numel=x.numel(),
                       dtype=dtype, meta={"offset": offset})

    def _code(self, offsets: torch.Tensor, starts: torch.Tensor | None
              ) -> dict[str, torch.Tensor]:
        """The offsets' wire tensors: packed, or Rice-coded gaps (a chunk's first offset is
        its gap from -1; ascending offsets make every gap >= 0)."""
        if self.index == "packed":
            return {"indices": pack_bits(offsets, index_bits(self.chunk))}
        previous = torch.cat([offsets.new_full((1,), -1), offsets[:-1]])[:offsets.numel()]
        previous[_firsts(starts)] = -1
        unary, low = rice_encode(offsets - previous - 1, self.rice)
        return {"indices": unary, "indices_low": low}

    def _offsets(self, e: Encoded, starts: torch.Tensor | None,
                 pieces: list[tuple[int, int]]) -> torch.Tensor:
        """The kept values' offsets inside their chunks (``starts``: :meth:`_starts` of
        ``pieces``, which packed offsets do not need)."""
        if self.index == "packed":
            return unpack_bits(e.tensors["indices"], index_bits(self.chunk),
                               kept_in(pieces, self.chunk, self.k))
        starts = self._starts(pieces) if starts is None else starts
        steps = rice_decode(e.tensors["indices"], e.tensors["indices_low"], self.rice,
                            starts.numel()) + 1
        reached = torch.cumsum(steps, 0)  # offset + 1 within the chunk, plus earlier chunks'
        firsts = _firsts(starts)
        before = (reached - steps)[firsts]
        return reached - before[torch.cumsum(firsts.long(), 0) - 1] - 1

    def _starts(self, pieces: list[tuple[int, int]]) -> torch.Tensor:
        """Where the chunk of each kept value starts in the slice, in encoding order."""
        parts = [chunk_starts(n, self.chunk, self.k) + a for a, n in pieces]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def decode(self, e: Encoded) -> torch.Tensor:
        return scatter(e.numel, self._where(e), e.tensors["values"], e.dtype)

    def decode_into(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        # zeros and the kept values straight into out: no fresh tensor of e.numel values
        if not self._scatter_into(e, out, subtract=False):
            out.zero_()
            out[self._where(e)] = e.tensors["values"].to(out.dtype)
        return out

    subtracts_sparse = True

    def subtract_decoded(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        if not self._scatter_into(e, out, subtract=True):
            where = self._where(e)
            out[where] = out[where] - e.tensors["values"].to(out.dtype)
        return out

    def _scatter_into(self, e: Encoded, out: torch.Tensor, *, subtract: bool) -> bool:
        """Writes (or subtracts) the kept values into ``out`` with the compiled kernel, piece
        by piece (each piece's chunks start at its first value); False where ``out`` is not a
        contiguous float32 CPU tensor (the caller's tensor operations do it)."""
        if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
            return False
        from islands.codecs import kernels
        values = e.tensors["values"]
        pieces = runs(self.bounds, self.chunk, e.meta["offset"], e.numel)
        offsets, first = self._offsets(e, None, pieces), 0
        for a, n in pieces:
            kept = kept_in([(a, n)], self.chunk, self.k)
            kernels.scatter(out[a:a + n], offsets[first:first + kept],
                            values[first:first + kept].float(), self.chunk, self.k,
                            subtract=subtract)
            first += kept
        return True

    def _where(self, e: Encoded) -> torch.Tensor:
        """The positions of the kept values in the slice."""
        pieces = runs(self.bounds, self.chunk, e.meta["offset"], e.numel)
        starts = self._starts(pieces)
        return self._offsets(e, starts, pieces) + starts

    def wire_bytes(self, numel: int, offset: int = 0) -> int | None:
        if self.index == "rice":
            return None  # the gaps' codes depend on where the kept values are
        return sparse_bytes(self.kept(numel, offset), index_bits(self.chunk))

    def __repr__(self) -> str:
        index = "" if self.index == "packed" else f", index={self.index!r}"
        return f"chunk_topk({shown(self.density, self.count)}, chunk={self.chunk}{index})"


def _cat(parts: list[torch.Tensor], dtype: torch.dtype, device=None) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)


def _firsts(starts: torch.Tensor) -> torch.Tensor:
    """Which kept values open a chunk (their chunk start differs from the one before)."""
    firsts = torch.ones_like(starts, dtype=torch.bool)
    firsts[1:] = starts[1:] != starts[:-1]
    return firsts


@register("codec", "chunk_topk")
@dataclass(frozen=True, kw_only=True)
class ChunkTopKConfig(CodecConfig):
    """``[codec] name = "chunk_topk"``: ``density`` or ``count`` (per chunk), not both.

    Attributes:
        density: share of each chunk kept (None: 1/64, so 64 of 4096, unless ``count``).
        count: values kept per chunk, instead of ``density``.
        chunk: values per chunk.
        index: ``"packed"`` (fixed-width offsets) or ``"rice"`` (Rice-coded gaps).
    """

    name: str = "chunk_topk"
    density: float | None = None
    count: int | None = None
    chunk: int = 4096
    index: str = "packed"

    def __post_init__(self) -> None:
        check_sparsity_config(self.density, self.count, share="density")
        check(self.chunk >= 1, "codec.chunk", self.chunk, "must be >= 1")
        check(self.index in INDEX_CODINGS, "codec.index", self.index,
              f"must be one of {', '.join(repr(i) for i in INDEX_CODINGS)}")

    def make(self) -> Codec:
        density, count = share(self.density, self.count, DEFAULT_DENSITY)
        return ChunkTopK(density, count=count, chunk=self.chunk, index=self.index)
