"""Sign and magnitude levels: a value codec for the values a sparsifier keeps (SparseLoCo's
2-bit values; Sarfi et al. 2025).

The values a top-k keeps are all far from zero: their magnitudes lie between the block's
smallest and largest kept magnitude, ``[lo, hi]``. So each value sends its sign (1 bit) and, in
``bits - 1`` more bits, which of ``L = 2**(bits - 1)`` equal bins of ``[lo, hi]`` its magnitude
falls in; it decodes to the bin's centre with its sign. No code is spent on zero. With
``bits = 1`` every value decodes to ``±(lo + hi) / 2``; with 2 bits to ``±(lo + w/2)`` or
``±(hi - w/2)``, ``w = (hi - lo) / 2``. ``lo`` and ``hi`` are float32, per block of ``block``
values (None: one pair for the encoded tensor).

Wire size: ``ceil(n · bits / 8) + 8 ⌈n / block⌉`` bytes.
Error bound: ``|x - x̂| <= (hi - lo) / 2**bits`` per value (half a bin), signs exact (plus
float32 rounding); biased toward the bins' centres: pair it with error feedback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from islands.codecs.base import Codec, Encoded, as_float32
from islands.codecs.packing import compiled, num_blocks, pack_bits, split_blocks, unpack_bits
from islands.core.registry import register
from islands.core.sections import CodecConfig, check


def block_range(m: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block ``(lo, hi)`` of a 1-D tensor of magnitudes: ``(blocks, 2)`` float32."""
    rows, tail = split_blocks(m, block)
    parts = [torch.stack([rows.amin(1), rows.amax(1)], 1)] if rows.numel() else []
    if tail.numel():
        parts.append(torch.stack([tail.amin(), tail.amax()]).view(1, 2))
    return torch.cat(parts) if parts else torch.empty(0, 2)


def _parts(block: int, *tensors: torch.Tensor):
    """The tensors (1-D, alike) as their full blocks ``(rows, block)``, then their tail
    ``(1, tail)``: tuples of views, one per part."""
    pieces = [split_blocks(t, block) for t in tensors]
    out = []
    if pieces and pieces[0][0].numel():
        out.append(tuple(rows for rows, _ in pieces))
    if pieces and pieces[0][1].numel():
        out.append(tuple(tail.view(1, -1) for _, tail in pieces))
    return out


def _ranges(scales: torch.Tensor, block: int, numel: int):
    """Each part's ``(lo, hi)`` as columns ``(rows, 1)`` (see :func:`_parts`)."""
    full = numel // block
    out = []
    if full:
        out.append((scales[:full, 0:1], scales[:full, 1:2]))
    if numel % block:
        out.append((scales[full:, 0:1], scales[full:, 1:2]))
    return out


class Quant(Codec):
    """``bits`` bits per value: its sign, and its magnitude's bin between the block's smallest
    and largest magnitude.

    Args:
        bits: bits per value, 1 to 8.
        block: values per ``(lo, hi)`` pair; None: one pair per encoded tensor.
    """

    name = "quant"

    def __init__(self, bits: int = 2, *, block: int | None = 256) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"bits ({bits}) must be in [1, 8]")
        if block is not None and block < 1:
            raise ValueError(f"block ({block}) must be >= 1 or None")
        self.bits, self.block = bits, block
        self.levels = 2 ** (bits - 1)

    def _block(self, numel: int) -> int:
        return self.block if self.block is not None else max(1, numel)

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        block, m = self._block(x.numel()), x.abs()
        scales = block_range(m, block)
        if compiled(x):  # one pass, the same codes (islands.codecs.kernels)
            from islands.codecs import kernels
            codes = kernels.quant_codes(x, scales, block, self.bits)
        else:
            codes = torch.empty(x.numel(), dtype=torch.int64, device=x.device)
            # block by block through views (a (lo, hi) beside every value: 8 bytes each)
            for (xs, ms, cs), (lo, hi) in zip(_parts(block, x, m, codes),
                                              _ranges(scales, block, x.numel())):
                width = (hi - lo) / self.levels
                bins = torch.where(width > 0, (ms - lo) / width, torch.zeros_like(ms))
                cs.copy_(bins.floor_().clamp_(0, self.levels - 1))
                cs |= (xs < 0).to(torch.int64) << (self.bits - 1)
        return Encoded({"codes": pack_bits(codes, self.bits), "scales": scales},
                       numel=x.numel(), dtype=dtype, meta={"block": block})

    def decode(self, e: Encoded) -> torch.Tensor:
        codes = unpack_bits(e.tensors["codes"], self.bits, e.numel)
        block, scales = e.meta["block"], e.tensors["scales"]
        if compiled(codes):
            from islands.codecs import kernels
            # a peer's scales: their shape is checked before the kernel reads them
            want = ((num_blocks(e.numel, block), 2)
                    if isinstance(block, int) and block >= 1 else None)
            if tuple(scales.shape) != want or scales.dtype != torch.float32:
                raise ValueError(f"scales {tuple(scales.shape)} {scales.dtype} for "
                                 f"{e.numel} values in blocks of {block}: {want} float32 "
                                 "expected")
            out = kernels.dequant(codes, scales, block, self.bits)
        else:
            out = torch.empty(e.numel)
            for (cs, os), (lo, hi) in zip(_parts(block, codes, out),
                                          _ranges(scales, block, e.numel)):
                bins = (cs & (self.levels - 1)).to(torch.float32)
                torch.add(lo, (bins + 0.5) * ((hi - lo) / self.levels), out=os)
                os.copy_(torch.where((cs >> (self.bits - 1)).bool(), -os, os))
        return out if e.dtype == torch.float32 else out.to(e.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return -(-numel * self.bits // 8) + 8 * num_blocks(numel, self._block(numel))

    def __repr__(self) -> str:
        return f"quant(bits={self.bits}, block={self.block})"


@register("codec", "quant")
@dataclass(frozen=True, kw_only=True)
class QuantConfig(CodecConfig):
    """``[codec] name = "quant"`` (mostly as a value stage of ``name = "chain"``).

    Attributes:
        bits: bits per value (1-8): a sign and ``bits - 1`` bits of magnitude.
        block: values per float32 ``(lo, hi)`` pair (None: one pair per encoded tensor).
    """

    name: str = "quant"
    bits: int = 2
    block: int | None = 256

    def __post_init__(self) -> None:
        check(1 <= self.bits <= 8, "codec.bits", self.bits, "must be in [1, 8]")
        check(self.block is None or self.block >= 1, "codec.block", self.block,
              "must be >= 1 (or omitted: one pair per tensor)")

    def make(self) -> Codec:
        return Quant(self.bits, block=self.block)
