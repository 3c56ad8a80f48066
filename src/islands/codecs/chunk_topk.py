"""Chunked top-k (SparseLoCo, Sarfi et al. 2025, "Communication-Efficient Language Model
Training Scales Reliably and Robustly"): the flat tensor is cut into chunks of ``chunk`` values
and each chunk keeps its ``k`` values of largest magnitude, so every part of every tensor is
represented (a global top-k lets a few large tensors take the whole budget).

``k`` per chunk is ``count``, or ``ceil(density * chunk)`` (at least 1); a last, shorter chunk of
``t`` values keeps ``min(k, t)``. Offsets inside each chunk are bit-packed at
``b = ceil(log2 chunk)`` bits (12 for 4096), chunk after chunk; values stay float32, for a value
codec to re-encode (``[codec] name = "chain"``: :mod:`islands.codecs.chain`).

Wire size: ``4 K + ceil(K b / 8)`` bytes, ``K = (n // chunk) k + min(k, n % chunk)``.
Error bound: kept values exact, the others decode to 0; per chunk
``||x - x̂||² <= (1 - k / chunk) ||x||²``. Biased: pair it with error feedback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from islands.codecs.base import Codec, Encoded, as_float32, given
from islands.codecs.packing import index_bits, kept_count, pack_bits, unpack_bits
from islands.codecs.topk import check_sparsity, check_sparsity_config, scatter
from islands.core.registry import register
from islands.core.sections import CodecConfig, check

DEFAULT_DENSITY = 1 / 64  # chunk_topk keeps 64 of 4096 when neither density nor count is set
_MAGNITUDE = 0x7FFFFFFF  # a float32's bits without its sign: ordered as |x| is


def magnitude_order(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``|x|`` of a float32 tensor as int32 bit patterns (the same order as ``|x|``; torch's
    top-k over int32 takes about 0.7x the time it takes over float32), written into ``out``
    (int32, ``x``'s shape) when given."""
    bits = x.contiguous().view(torch.int32)
    return torch.bitwise_and(bits, _MAGNITUDE, out=out) if out is not None else bits & _MAGNITUDE


def chunk_top(keys: torch.Tensor, chunk: int, k: int) -> torch.Tensor:
    """Offsets (int64, inside their chunk) of the ``k`` largest ``keys`` of each chunk, chunk
    after chunk, then the ``min(k, tail)`` largest of a shorter last chunk."""
    full = keys.numel() // chunk
    parts = []
    if full:
        parts.append(torch.topk(keys[:full * chunk].view(full, chunk), k, dim=1,
                                sorted=False).indices.reshape(-1))
    tail = keys[full * chunk:]
    if tail.numel():
        parts.append(torch.topk(tail, min(k, tail.numel()), sorted=False).indices)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


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
    """

    name = "chunk_topk"
    sparse = True  # sends float32 "values" a value codec may re-encode (codecs.chain)

    def __init__(self, density: float | None = None, *, count: int | None = None,
                 chunk: int = 4096) -> None:
        check_sparsity(density, count, share="density")
        if chunk < 1:
            raise ValueError(f"chunk ({chunk}) must be >= 1")
        self.density, self.count, self.chunk = density, count, chunk
        self.k = kept_count(chunk, density, count)
        self._keys = torch.empty(0, dtype=torch.int32)  # kept between encodes: fresh pages cost

    def kept(self, numel: int) -> int:
        """Values sent for a tensor of ``numel`` values (``K`` in the module's formula)."""
        full, tail = divmod(numel, self.chunk)
        return full * self.k + min(self.k, tail)

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        if self._keys.numel() != x.numel() or self._keys.device != x.device:
            self._keys = torch.empty(x.numel(), dtype=torch.int32, device=x.device)
        offsets = chunk_top(magnitude_order(x, self._keys), self.chunk, self.k)
        values = x[offsets + chunk_starts(x.numel(), self.chunk, self.k)]
        return Encoded({"values": values, "indices": pack_bits(offsets, index_bits(self.chunk))},
                       numel=x.numel(), dtype=dtype)

    def decode(self, e: Encoded) -> torch.Tensor:
        kept = self.kept(e.numel)
        offsets = unpack_bits(e.tensors["indices"], index_bits(self.chunk), kept)
        where = offsets + chunk_starts(e.numel, self.chunk, self.k)
        return scatter(e.numel, where, e.tensors["values"], e.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        kept = self.kept(numel)
        return 4 * kept + -(-kept * index_bits(self.chunk) // 8)

    def __repr__(self) -> str:
        share = f"count={self.count}" if self.count is not None else self.density
        return f"chunk_topk({share}, chunk={self.chunk})"


@register("codec", "chunk_topk")
@dataclass(frozen=True, kw_only=True)
class ChunkTopKConfig(CodecConfig):
    """``[codec] name = "chunk_topk"``: ``density`` or ``count`` (per chunk), not both.

    Attributes:
        density: share of each chunk kept (None: 1/64, so 64 of 4096, unless ``count``).
        count: values kept per chunk, instead of ``density``.
        chunk: values per chunk.
    """

    name: str = "chunk_topk"
    density: float | None = None
    count: int | None = None
    chunk: int = 4096

    def __post_init__(self) -> None:
        check_sparsity_config(self.density, self.count, share="density")
        check(self.chunk >= 1, "codec.chunk", self.chunk, "must be >= 1")

    def make(self) -> Codec:
        if self.density is None and self.count is None:
            return ChunkTopK(DEFAULT_DENSITY, chunk=self.chunk)
        return ChunkTopK(**given(density=self.density, count=self.count), chunk=self.chunk)
