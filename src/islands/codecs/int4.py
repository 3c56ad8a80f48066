"""Blockwise absmax int4 quantization, two values per byte (the 4-bit integer format of QLoRA's
and QSGD's family: Alistarh et al. 2017 "QSGD" with absmax block scaling).

Each block of ``block`` values sends a float32 scale ``s = absmax / 7`` and, per value, a
4-bit code ``round(x / s) + 8`` in [1, 15] (the symmetric levels -7..7); two codes share a
byte, the first in the low nibble.

Wire size: ``ceil(numel / 2) + 4 * ceil(numel / block)`` bytes.
Error bound, per value: ``|x - x̂| <= s / 2`` (nearest), ``< s`` (stochastic, unbiased), with
``s = max(absmax of the block, 1e-30) / 7`` (plus float32 rounding, one ulp of ``x``).
"""

from __future__ import annotations

import torch

from islands.codecs.base import Codec, Encoded, as_float32
from islands.codecs.packing import (
    Rounding,
    block_absmax,
    block_scales,
    num_blocks,
    pack_nibbles,
    scale_blocks,
    unpack_nibbles,
)

LEVELS = 7


class Int4(Codec):
    """4-bit integers (levels -7..7) with one float32 absmax scale per block.

    Args:
        block: values per scale.
        stochastic: round stochastically (unbiased) instead of to nearest.
        seed: seeds the stochastic rounding.
    """

    name = "int4"

    def __init__(self, block: int = 64, *, stochastic: bool = False, seed: int = 0) -> None:
        if block < 1:
            raise ValueError(f"block ({block}) must be >= 1")
        self.block = block
        self.stochastic = stochastic
        self.round = Rounding(stochastic, seed)

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        scales = block_scales(block_absmax(x, self.block), LEVELS)
        y = scale_blocks(x, 1.0 / scales, self.block)
        y = self.round(y, LEVELS, key, offset).add_(LEVELS + 1)
        codes = pack_nibbles(y.to(torch.uint8))
        return Encoded({"values": codes, "scales": scales}, numel=x.numel(), dtype=dtype,
                       meta={"block": self.block})

    def decode(self, e: Encoded) -> torch.Tensor:
        q = unpack_nibbles(e.tensors["values"], e.numel).to(torch.int8).sub_(LEVELS + 1)
        out = scale_blocks(q, e.tensors["scales"], e.meta["block"])
        return out if e.dtype == torch.float32 else out.to(e.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return -(-numel // 2) + 4 * num_blocks(numel, self.block)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.round.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.round.load_state_dict(state)

    def __repr__(self) -> str:
        return f"int4(block={self.block}{', stochastic' if self.stochastic else ''})"
