"""Scaled sign compression (Bernstein et al. 2018, "signSGD: Compressed Optimisation for
Non-Convex Problems"; the scaled variant with error feedback of Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD and other Gradient Compression Schemes").

Sends one bit per value (set for negative values) and, per block, the float32 scale
``s = mean |x|``; decodes ``s · sign(x)`` (zero decodes as ``+s``). ``s`` minimises
``||x - s · sign(x)||²``. ``block = None`` sends one scale for the whole encoded tensor.

Wire size: ``ceil(numel / 8) + 4 * ceil(numel / block)`` bytes (one scale if no block).
Error bound, per block: ``||x - x̂||² = ||x||² - ||x||₁² / block_len <= ||x||²`` (never worse
than sending zeros), and ``||x̂||₁ = ||x||₁``. Biased: pair it with error feedback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from islands.codecs.base import Codec, Encoded, as_float32, given
from islands.codecs.packing import (
    num_blocks,
    pack_bits,
    scale_blocks,
    split_blocks,
    unpack_bits,
)
from islands.core.registry import register
from islands.core.sections import CodecConfig, check


def block_mean_abs(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block mean |x| of a 1-D tensor: ``(ceil(numel / block),)`` float32."""
    rows, tail = split_blocks(x.abs(), block)
    # Summed in float64: a float32 sum of values near 3e38 would overflow to Inf.
    parts = [rows.mean(1, dtype=torch.float64)] if rows.numel() else []
    if tail.numel():
        parts.append(tail.mean(dtype=torch.float64).reshape(1))
    return torch.cat(parts).float() if parts else torch.empty(0)


class Sign(Codec):
    """1 bit per value plus a float32 mean-magnitude scale per block.

    Args:
        block: values per scale; None: one scale per encoded tensor.
    """

    name = "sign"

    def __init__(self, block: int | None = None) -> None:
        if block is not None and block < 1:
            raise ValueError(f"block ({block}) must be >= 1 or None")
        self.block = block

    def _block(self, numel: int) -> int:
        return self.block if self.block is not None else max(1, numel)

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        block = self._block(x.numel())
        return Encoded({"signs": pack_bits(x < 0, 1), "scales": block_mean_abs(x, block)},
                       numel=x.numel(), dtype=dtype, meta={"block": block})

    def decode(self, e: Encoded) -> torch.Tensor:
        negative = unpack_bits(e.tensors["signs"], 1, e.numel)
        signs = 1.0 - 2.0 * negative.to(torch.float32)
        out = scale_blocks(signs, e.tensors["scales"], e.meta["block"])
        return out if e.dtype == torch.float32 else out.to(e.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return -(-numel // 8) + 4 * num_blocks(numel, self._block(numel))

    def __repr__(self) -> str:
        return f"sign(block={self.block})"


@register("codec", "sign")
@dataclass(frozen=True, kw_only=True)
class SignConfig(CodecConfig):
    """``[codec] name = "sign"``.

    Attributes:
        block: values per scale (None: one scale per encoded tensor).
    """

    name: str = "sign"
    block: int | None = None

    def __post_init__(self) -> None:
        check(self.block is None or self.block >= 1, "codec.block", self.block, "must be >= 1")

    def make(self) -> Codec:
        return Sign(**given(block=self.block))
