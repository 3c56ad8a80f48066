"""Blockwise absmax int8 quantization (as in Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", applied to what crosses the wire).

The flat tensor is cut into blocks of ``block`` values (the last may be shorter). Each block
sends one float32 scale ``s = absmax / 127`` and one int8 ``q = round(x / s)`` per value;
decoding is ``q * s``.

Wire size: ``numel + 4 * ceil(numel / block)`` bytes.
Error bound, per value: ``|x - x̂| <= s / 2`` with round-to-nearest, ``< s`` with stochastic
rounding (which is unbiased: ``E[x̂] = x``), where ``s = max(absmax of the block, 1e-30) / 127``
(plus float32 rounding of the product, at most one ulp of ``x``).
"""

from __future__ import annotations

import torch

from islands.codecs.base import Codec, Encoded, as_float32
from islands.codecs.packing import (
    Rounding,
    block_absmax,
    block_scales,
    num_blocks,
    scale_blocks,
)


class Int8(Codec):
    """int8 values with one float32 absmax scale per block.

    Args:
        block: values per scale (smaller: tighter error, more scale bytes).
        stochastic: round stochastically (unbiased) instead of to nearest.
        seed: seeds the stochastic rounding (per worker, stream, slice and call).
    """

    name = "int8"
    levels = 127  # codes -levels..levels

    def __init__(self, block: int = 256, *, stochastic: bool = False, seed: int = 0) -> None:
        if block < 1:
            raise ValueError(f"block ({block}) must be >= 1")
        self.block = block
        self.stochastic = stochastic
        self.round = Rounding(stochastic, seed)

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        scales = block_scales(block_absmax(x, self.block), self.levels)
        y = scale_blocks(x, 1.0 / scales, self.block)
        codes = self._pack(self.round(y, self.levels, key, offset))
        return Encoded({"values": codes, "scales": scales}, numel=x.numel(), dtype=dtype,
                       meta={"block": self.block})

    def decode(self, e: Encoded) -> torch.Tensor:
        q = self._unpack(e.tensors["values"], e.numel)
        out = scale_blocks(q, e.tensors["scales"], e.meta["block"])
        return out if e.dtype == torch.float32 else out.to(e.dtype)

    def _pack(self, rounded: torch.Tensor) -> torch.Tensor:
        """Rounded codes (float, in -levels..levels) to the wire: one int8 each."""
        return rounded.to(torch.int8)

    def _unpack(self, values: torch.Tensor, numel: int) -> torch.Tensor:
        return values

    def _payload_bytes(self, numel: int) -> int:
        return numel

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return self._payload_bytes(numel) + 4 * num_blocks(numel, self.block)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.round.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.round.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{self.name}(block={self.block}{', stochastic' if self.stochastic else ''})"
