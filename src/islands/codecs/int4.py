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

from dataclasses import dataclass

import torch

from islands.codecs.base import Codec, given
from islands.codecs.int8 import Int8
from islands.codecs.packing import pack_nibbles, unpack_nibbles
from islands.core.registry import register
from islands.core.sections import CodecConfig, check


class Int4(Int8):
    """4-bit integers (levels -7..7, two per byte) with one float32 absmax scale per block.

    Args:
        block: values per scale.
        stochastic: round stochastically (unbiased) instead of to nearest.
        seed: seeds the stochastic rounding.
    """

    name = "int4"
    levels = 7

    def __init__(self, block: int = 64, *, stochastic: bool = False, seed: int = 0) -> None:
        super().__init__(block, stochastic=stochastic, seed=seed)

    wire_dtype = torch.uint8

    def _pack_into(self, rounded: torch.Tensor, values: torch.Tensor, a: int, b: int) -> None:
        values[a // 2:-(-b // 2)] = pack_nibbles(rounded.add_(self.levels + 1).to(torch.uint8))

    def _unpack(self, values: torch.Tensor, a: int, b: int) -> torch.Tensor:
        codes = unpack_nibbles(values[a // 2:-(-b // 2)], b - a)
        return codes.to(torch.int8).sub_(self.levels + 1)

    def _payload_bytes(self, numel: int) -> int:
        return -(-numel // 2)


@register("codec", "int4")
@dataclass(frozen=True, kw_only=True)
class Int4Config(CodecConfig):
    """``[codec] name = "int4"``.

    Attributes:
        block: values per scale (None: 64).
        stochastic: stochastic rounding, unbiased (None: off, round to nearest).
    """

    name: str = "int4"
    block: int | None = None
    stochastic: bool | None = None

    def __post_init__(self) -> None:
        check(self.block is None or self.block >= 1, "codec.block", self.block, "must be >= 1")

    def make(self) -> Codec:
        return Int4(**given(block=self.block, stochastic=self.stochastic))
