"""Blockwise-scaled 4-bit floats, E2M1 (the element format of the OCP Microscaling "MXFP4" and
NVFP4 formats; Rouhani et al. 2023, "Microscaling Data Formats for Deep Learning").

Each block of ``block`` values sends a float32 scale ``s = absmax / 6``; each value sends the
4-bit code of the nearest of ±{0, 0.5, 1, 1.5, 2, 3, 4, 6} to ``x / s`` (1 sign bit, 2
exponent bits, 1 mantissa bit), two codes per byte. Unlike int4 the grid is denser near zero,
where most of a pseudo-gradient's values lie.

Wire size: ``ceil(numel / 2) + 4 * ceil(numel / block)`` bytes.
Error bound, per value: ``|x - x̂| <= max(s, |x|) / 4`` (half the grid gap: 0.25 below 2, then
at most a quarter of the magnitude), ``s = max(absmax of the block, 1e-30) / 6``, plus
float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from islands.codecs.base import Codec, Encoded, as_float32, given
from islands.codecs.packing import (
    block_absmax,
    block_scales,
    num_blocks,
    pack_nibbles,
    scale_blocks,
    unpack_nibbles,
)
from islands.core.registry import register
from islands.core.sections import CodecConfig, check

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
MIDPOINTS = (GRID[1:] + GRID[:-1]) / 2
# code -> value: codes 0..7 are +GRID, 8..15 are -GRID (bit 3 is the sign).
VALUES = torch.cat([GRID, -GRID])


class FP4(Codec):
    """E2M1 4-bit floats with one float32 absmax scale per block.

    Args:
        block: values per scale.
    """

    name = "fp4"

    def __init__(self, block: int = 64) -> None:
        if block < 1:
            raise ValueError(f"block ({block}) must be >= 1")
        self.block = block

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        scales = block_scales(block_absmax(x, self.block), float(GRID[-1]))
        y = scale_blocks(x, 1.0 / scales, self.block)
        # Nearest grid point of |y|: ties go to the smaller magnitude.
        codes = torch.bucketize(y.abs(), MIDPOINTS.to(y.device)).to(torch.uint8)
        codes |= (y < 0).to(torch.uint8) << 3
        return Encoded({"values": pack_nibbles(codes), "scales": scales}, numel=x.numel(),
                       dtype=dtype, meta={"block": self.block})

    def decode(self, e: Encoded) -> torch.Tensor:
        codes = unpack_nibbles(e.tensors["values"], e.numel)
        out = scale_blocks(VALUES.to(codes.device)[codes.long()], e.tensors["scales"],
                           e.meta["block"])
        return out if e.dtype == torch.float32 else out.to(e.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return -(-numel // 2) + 4 * num_blocks(numel, self.block)

    def __repr__(self) -> str:
        return f"fp4(block={self.block})"


@register("codec", "fp4")
@dataclass(frozen=True, kw_only=True)
class FP4Config(CodecConfig):
    """``[codec] name = "fp4"``.

    Attributes:
        block: values per scale (None: 64).
    """

    name: str = "fp4"
    block: int | None = None

    def __post_init__(self) -> None:
        check(self.block is None or self.block >= 1, "codec.block", self.block, "must be >= 1")

    def make(self) -> Codec:
        return FP4(**given(block=self.block))
