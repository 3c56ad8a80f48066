"""Lossless fp32 and the 16-bit float casts.

``identity`` sends fp32 as is (exact). ``fp16`` and ``bf16`` round to nearest: relative error
at most 2^-11 (fp16, for |x| in fp16's normal range, 6.1e-5..65504; values beyond 65504 are
refused rather than turned into Inf) and 2^-8 (bf16, whole fp32 range). OpenDiLoCo all-reduces
pseudo-gradients in fp16 with no loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from islands.codecs.base import Codec, Encoded, check_finite, tensor_name
from islands.core.errors import CodecError
from islands.core.registry import register
from islands.core.sections import CodecConfig


class Identity(Codec):
    """Sends values unchanged (4 bytes per fp32 value). Exact.

    Zero-copy: the payload is a view of the encoded tensor, not a copy (it must stay unchanged
    until the payload is sent, as it does within a collective), and a receiver may read it as
    the decoded tensor (:attr:`raw_tensor`). :meth:`decode` returns a copy the caller owns.
    """

    name = "identity"
    raw_tensor = "values"

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        return Encoded({"values": x}, numel=x.numel(), dtype=x.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return 4 * numel

    def decode(self, e: Encoded) -> torch.Tensor:
        return e.tensors["values"].clone()

    def decode_into(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        values = e.tensors["values"]
        if (values.data_ptr() == out.data_ptr() and values.shape == out.shape
                and values.dtype == out.dtype):
            return out  # received in place: nothing to do
        return out.copy_(values)


class Cast(Codec):
    """Casts to a narrower float dtype (2 bytes per value) and back.

    Args:
        wire_dtype: ``torch.float16`` or ``torch.bfloat16``.
    """

    def __init__(self, wire_dtype: torch.dtype) -> None:
        if wire_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"wire_dtype ({wire_dtype}) must be torch.float16 or torch.bfloat16")
        self.wire_dtype = wire_dtype
        self.name = "fp16" if wire_dtype == torch.float16 else "bf16"

    @property
    def checks_finite(self) -> bool:  # fp16's range check reads min and max, which a NaN/Inf
        return self.wire_dtype == torch.float16  # makes non-finite: no separate pass

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        if self.wire_dtype == torch.float16 and x.numel():
            lo, hi = torch.aminmax(x)  # one read, nothing the size of x allocated
            peak = max(-float(lo), float(hi))
            if not math.isfinite(peak):
                check_finite(x, tensor_name(key, offset, x.numel()))  # raises, counting them
            if peak > 65504.0:
                raise CodecError(f"tensor {key!r} has |x| = {peak:.3g} > 65504, beyond fp16; "
                                 "use codec.name = 'bf16' or a scaled codec such as int8")
        return Encoded({"values": x.to(self.wire_dtype)}, numel=x.numel(), dtype=x.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return 2 * numel

    def decode(self, e: Encoded) -> torch.Tensor:
        return e.tensors["values"].to(e.dtype)

    def decode_into(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(e.tensors["values"])  # converts in the copy: one pass, no temporary


@register("codec", "identity", default=True)
@dataclass(frozen=True, kw_only=True)
class IdentityConfig(CodecConfig):
    """``[codec] name = "identity"``: fp32 as is (no settings of its own)."""

    name: str = "identity"

    def make(self) -> Codec:
        return Identity()


@register("codec", "bf16")
@register("codec", "fp16")
@dataclass(frozen=True, kw_only=True)
class CastConfig(CodecConfig):
    """``[codec] name = "fp16"`` (IEEE half precision) or ``"bf16"`` (bfloat16); no settings
    of their own."""

    name: str = "fp16"

    def make(self) -> Codec:
        return Cast(torch.float16 if self.name == "fp16" else torch.bfloat16)
