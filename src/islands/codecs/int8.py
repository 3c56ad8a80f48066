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

from dataclasses import dataclass

import torch

from islands.codecs.base import Codec, Encoded, as_float32, check_finite, given, tensor_name
from islands.codecs.packing import (
    Rounding,
    block_absmax,
    block_scales,
    num_blocks,
    round_,
    scale_blocks,
)
from islands.core.registry import register
from islands.core.sections import CodecConfig, check

# Values per pass of the encoder and decoder: 4 MiB of float32, so the intermediate of each
# pass (scaled values, rounded codes) stays in cache instead of a tensor the size of the input,
# whose fresh pages would cost more than the arithmetic. 1 << 20 measured fastest on a 2-core
# EPYC (32 MiB L3) among 2**16..2**23 (see benchmarks/codecs_throughput.py).
CHUNK = 1 << 20


class Int8(Codec):
    """int8 values with one float32 absmax scale per block.

    Args:
        block: values per scale (smaller: tighter error, more scale bytes).
        stochastic: round stochastically (unbiased) instead of to nearest.
        seed: seeds the stochastic rounding (per worker, stream, slice and call).
    """

    name = "int8"
    levels = 127  # codes -levels..levels
    checks_finite = True  # a NaN/Inf makes its block's absmax non-finite

    def __init__(self, block: int = 256, *, stochastic: bool = False, seed: int = 0) -> None:
        if block < 1:
            raise ValueError(f"block ({block}) must be >= 1")
        self.block = block
        self.stochastic = stochastic
        self.round = Rounding(stochastic, seed)

    def _step(self) -> int:
        """Values per pass: whole blocks, an even count (a byte of int4 never straddles two
        passes)."""
        step = max(1, CHUNK // self.block) * self.block
        return step * (1 + step % 2)

    def _pieces(self, numel: int):
        """``(start, end)`` of each pass, the last one taking the remainder."""
        step = self._step()
        return ((i, min(numel, i + step)) for i in range(0, numel, step))

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        n, block = x.numel(), self.block
        scales = torch.empty(num_blocks(n, block), device=x.device)
        values = torch.empty(self._payload_bytes(n), dtype=self.wire_dtype, device=x.device)
        scratch = torch.empty(min(n, self._step()), device=x.device)
        gen = self.round.generator(key, offset, n)
        for a, b in self._pieces(n):
            piece = scales[a // block:num_blocks(b, block)]
            piece.copy_(block_scales(block_absmax(x[a:b], block), self.levels))
            if not bool(torch.isfinite(piece).all()):
                check_finite(x, tensor_name(key, offset, n))  # raises, counting the bad values
            y = scale_blocks(x[a:b], 1.0 / piece, block, out=scratch[:b - a])
            self._pack_into(round_(y, gen, self.levels), values, a, b)
        return Encoded({"values": values, "scales": scales}, numel=n, dtype=dtype,
                       meta={"block": block})

    def decode(self, e: Encoded) -> torch.Tensor:
        out = self.decode_into(e, torch.empty(e.numel, device=e.tensors["scales"].device))
        return out if e.dtype == torch.float32 else out.to(e.dtype)

    def decode_into(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        if out.dtype != torch.float32:
            return out.copy_(self.decode(e))
        block, scales = e.meta["block"], e.tensors["scales"]
        for a, b in self._pieces(e.numel):
            scale_blocks(self._unpack(e.tensors["values"], a, b),
                         scales[a // block:num_blocks(b, block)], block, out=out[a:b])
        return out

    # The wire format of the codes; Int4 overrides these three.
    wire_dtype = torch.int8

    def _pack_into(self, rounded: torch.Tensor, values: torch.Tensor, a: int, b: int) -> None:
        """Writes the rounded codes (float, in -levels..levels) of values ``a:b`` to the wire
        buffer: one int8 each."""
        values[a:b].copy_(rounded)

    def _unpack(self, values: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """The integer codes of values ``a:b`` (``a`` even)."""
        return values[a:b]

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


@register("codec", "int8")
@dataclass(frozen=True, kw_only=True)
class Int8Config(CodecConfig):
    """``[codec] name = "int8"``.

    Attributes:
        block: values per scale (None: 256).
        stochastic: stochastic rounding, unbiased (None: off, round to nearest).
    """

    name: str = "int8"
    block: int | None = None
    stochastic: bool | None = None

    def __post_init__(self) -> None:
        check(self.block is None or self.block >= 1, "codec.block", self.block, "must be >= 1")

    def make(self) -> Codec:
        return Int8(**given(block=self.block, stochastic=self.stochastic))
