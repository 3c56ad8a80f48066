"""DCT top-k (after DeMo, Peng et al. 2024, "DeMo: Decoupled Momentum Optimization"): each
parameter tensor is cut into chunks of ``chunk`` values (a tensor's last one padded with zeros;
tensors and slices as in :mod:`islands.codecs.chunk_topk`), each chunk goes through the
orthonormal DCT-II, and each chunk keeps its ``k`` coefficients of largest magnitude. Smooth or
oscillating chunks concentrate their energy in few coefficients, so the same ``k`` carries more
of the tensor than top-k of the values themselves.

DeMo sends the top coefficients of the momentum and keeps the rest locally; in islands that is
``error_feedback`` around this codec (the residual of an orthonormal transform's top-k is the
transform of the coefficients left behind), with the kept values signed or quantized by a value
codec after it (``[codec] name = "chain"``). ``k`` per chunk is ``count`` or
``ceil(density * chunk)``; offsets are bit-packed at ``ceil(log2 chunk)`` bits.

Wire size: ``4 K + ceil(K b / 8)`` bytes, ``K = k Σ_tensors ceil(n_t / chunk)`` (one tensor:
``ceil(n / chunk) k``), ``b = ceil(log2 chunk)``.
Error bound: orthonormal, so per chunk ``||x - x̂||² = ||dropped coefficients||² <=
(1 - k / chunk) ||x||²`` (plus float32 rounding of the two transforms). Biased: use error
feedback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from islands.codecs.base import Codec, Encoded, as_float32
from islands.codecs.chunk_topk import layout_bounds, magnitude_order, runs
from islands.codecs.packing import index_bits, kept_count, pack_bits, unpack_bits
from islands.codecs.topk import (
    check_sparsity,
    check_sparsity_config,
    share,
    shown,
    sparse_bytes,
)
from islands.core.registry import register
from islands.core.sections import CodecConfig, check

DEFAULT_DCT_DENSITY = 1 / 8  # dct_topk keeps 8 of 64 when neither density nor count is set


@lru_cache(maxsize=8)
def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``(n, n)``, float32: ``coefficients = D @ x``,
    ``x = D.T @ coefficients``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


class DCTTopK(Codec):
    """The ``k`` largest DCT coefficients of every chunk.

    Args:
        density: share of each chunk's coefficients kept.
        count: coefficients kept per chunk (instead of ``density``).
        chunk: values per chunk (DeMo uses 64).
    """

    name = "dct_topk"
    sparse = True  # sends float32 "values" a value codec may re-encode (codecs.chain)

    def __init__(self, density: float | None = None, *, count: int | None = None,
                 chunk: int = 64) -> None:
        check_sparsity(density, count, share="density")
        if chunk < 1:
            raise ValueError(f"chunk ({chunk}) must be >= 1")
        self.density, self.count, self.chunk = density, count, chunk
        self.k = kept_count(chunk, density, count)
        self.bounds: list[int] | None = None  # where each tensor starts (bind_layout)

    def bind_layout(self, shapes: list[torch.Size]) -> None:
        self.bounds = layout_bounds(shapes)

    def _rows(self, numel: int, offset: int) -> tuple[list[tuple[int, int, int]], int]:
        """``(start in the slice, length, first row)`` of each run (every run pads to whole
        rows of ``chunk`` coefficients), and the rows in all."""
        pieces, rows = [], 0
        for a, n in runs(self.bounds, self.chunk, offset, numel):
            pieces.append((a, n, rows))
            rows += -(-n // self.chunk)
        return pieces, rows

    def kept(self, numel: int, offset: int = 0) -> int:
        """Coefficients sent for ``numel`` values at ``offset``."""
        return self._rows(numel, offset)[1] * self.k

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        pieces, rows = self._rows(x.numel(), offset)
        padded = torch.zeros(rows, self.chunk, device=x.device)
        for a, n, row in pieces:
            padded.view(-1)[row * self.chunk:row * self.chunk + n] = x[a:a + n]
        coefficients = padded @ dct_matrix(self.chunk).T  # (rows, chunk)
        offsets = torch.topk(magnitude_order(coefficients), self.k, dim=1,
                             sorted=False).indices.sort(dim=1).values  # canonical bytes
        values = coefficients.gather(1, offsets).reshape(-1)
        return Encoded({"values": values,
                        "indices": pack_bits(offsets.reshape(-1), index_bits(self.chunk))},
                       numel=x.numel(), dtype=dtype, meta={"offset": offset})

    def decode(self, e: Encoded) -> torch.Tensor:
        pieces, rows = self._rows(e.numel, e.meta["offset"])
        offsets = unpack_bits(e.tensors["indices"], index_bits(self.chunk), rows * self.k)
        coefficients = torch.zeros(rows, self.chunk)
        coefficients.scatter_(1, offsets.view(rows, self.k),
                              e.tensors["values"].float().view(rows, self.k))
        flat = (coefficients @ dct_matrix(self.chunk)).view(-1)
        out = torch.empty(e.numel)
        for a, n, row in pieces:
            out[a:a + n] = flat[row * self.chunk:row * self.chunk + n]
        return out if e.dtype == torch.float32 else out.to(e.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return sparse_bytes(self.kept(numel, offset), index_bits(self.chunk))

    def __repr__(self) -> str:
        return f"dct_topk({shown(self.density, self.count)}, chunk={self.chunk})"


@register("codec", "dct_topk")
@dataclass(frozen=True, kw_only=True)
class DCTTopKConfig(CodecConfig):
    """``[codec] name = "dct_topk"``: ``density`` or ``count`` (per chunk), not both.

    Attributes:
        density: share of each chunk's coefficients kept (None: 1/8, unless ``count``).
        count: coefficients kept per chunk, instead of ``density``.
        chunk: values per chunk.
    """

    name: str = "dct_topk"
    density: float | None = None
    count: int | None = None
    chunk: int = 64

    def __post_init__(self) -> None:
        check_sparsity_config(self.density, self.count, share="density")
        check(self.chunk >= 1, "codec.chunk", self.chunk, "must be >= 1")

    def make(self) -> Codec:
        density, count = share(self.density, self.count, DEFAULT_DCT_DENSITY)
        return DCTTopK(density, count=count, chunk=self.chunk)
