"""The codec interface: ``encode(tensor) -> Encoded`` and ``decode(Encoded) -> tensor``.

A codec turns a flat float tensor into what crosses the wire and back. ``Encoded.nbytes`` is
the exact wire size: every tensor it carries (payload, scales, indices) plus ``header_bytes``
for any fixed metadata the codec needs. The collective adds its own per-message header
(:data:`islands.collectives.butterfly.MESSAGE_HEADER_BYTES`) on top.

Codecs may keep state per stream (error-feedback residuals, PowerSGD's warm-started Q): the
``key`` passed to ``encode`` names the stream (e.g. ``"w2/pseudo-gradient/scatter"``; no round
number, so state carries across rounds) and appears in errors; ``offset`` says where in the
stream's flat vector the encoded slice starts (the butterfly encodes one shard at a time, and
shard bounds change when membership does). One codec instance belongs to one worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from islands.core.errors import CodecError

# The dtypes a payload tensor may have, by the name a header or a frame carries.
PAYLOAD_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16,
                                      torch.float64, torch.uint8, torch.int8, torch.int16,
                                      torch.int32, torch.int64, torch.bool)}


@dataclass
class Encoded:
    """What one encoded tensor puts on the wire.

    Attributes:
        tensors: the payload tensors, by role (``"values"``, ``"scales"``, ``"indices"``...).
        numel: number of elements of the decoded tensor.
        dtype: dtype of the decoded tensor.
        header_bytes: fixed metadata bytes the codec sends besides ``tensors``.
        meta: codec-private facts known to both sides (never counted: derivable from the
            shared config or from ``numel``).
    """

    tensors: dict[str, torch.Tensor]
    numel: int
    dtype: torch.dtype = torch.float32
    header_bytes: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Exact wire size in bytes: payload tensors plus the codec's header."""
        return self.header_bytes + sum(t.numel() * t.element_size() for t in self.tensors.values())


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 (no copy when it already is): the codecs compute in float32."""
    return x if x.dtype == torch.float32 else x.float()


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite."""
    # A finite sum proves every value finite in one read; only a non-finite sum (a NaN/Inf,
    # or finite values whose sum overflows) pays for the exact elementwise check.
    return not x.numel() or bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_finite(x: torch.Tensor, key: str) -> None:
    """Refuses NaN/Inf: such a value must never be encoded into the shared state."""
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise CodecError(f"tensor {key!r} holds {bad} NaN/Inf value(s) of {x.numel()}; "
                         "refusing to encode it (check the learning rate or the data)")


def tensor_name(key: str, offset: int, numel: int) -> str:
    """How errors name a slice of a stream: ``key`` or ``key[offset:offset + numel]``."""
    return key if not offset else f"{key}[{offset}:{offset + numel}]"


class Codec(ABC):
    """Encodes flat float tensors for the wire. Subclasses implement ``_encode``/``decode``."""

    name: str = "codec"
    # True when ``_encode`` itself refuses NaN/Inf (with :func:`check_finite`'s error), from
    # values it reads anyway, sparing ``encode`` a separate pass over the tensor.
    checks_finite: bool = False
    # The payload tensor that *is* the decoded tensor (1-D, the decoded dtype), for lossless
    # codecs that send values as they are (identity: "values"); None when decoding computes.
    # A receiver may then put that tensor straight where the decoded values belong, and read
    # it without decoding (:meth:`decoded_view`).
    raw_tensor: str | None = None
    # A sparsifier: its payload holds the kept values as a float32 "values" tensor (and says
    # how many: ``kept(numel, offset)``), which a value codec may encode further (codecs.chain).
    sparse: bool = False

    def encode(self, x: torch.Tensor, key: str = "tensor", offset: int = 0, *,
               finite: bool = False) -> Encoded:
        """Encodes ``x`` (any shape; flattened) after checking it is finite.

        Args:
            x: float tensor to send.
            key: the stream's name: keys state of stateful codecs, names the tensor in errors.
            offset: position of ``x`` in the stream's flat vector.
            finite: the caller has checked every value of ``x`` finite (the collective checks
                the mean step by step while it is in cache): no second pass.
        """
        if not torch.is_floating_point(x):
            raise CodecError(f"tensor {key!r} has dtype {x.dtype}; codecs take float tensors")
        if not self.checks_finite and not finite:
            check_finite(x, tensor_name(key, offset, x.numel()))
        return self._encode(x.reshape(-1), key, offset)

    @abstractmethod
    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        """Encodes a finite 1-D tensor (the slice at ``offset`` of stream ``key``)."""

    @abstractmethod
    def decode(self, e: Encoded) -> torch.Tensor:
        """Returns the 1-D tensor (``e.numel`` values, dtype ``e.dtype``) that ``e`` encodes."""

    def decode_into(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        """Decodes ``e`` into ``out`` (1-D, ``e.numel`` values) and returns ``out``.

        The collective decodes into buffers it already holds; codecs that can write there
        directly (the blockwise quantizers) override this to skip a fresh allocation.
        """
        return out.copy_(self.decode(e))

    # ``subtract_decoded`` touches only the positions a payload keeps (a sparsifier's, or a
    # chain that starts with one): error feedback then updates its residual in place.
    subtracts_sparse: bool = False

    def subtract_decoded(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        """``out -= decode(e)`` in place (1-D, ``e.numel`` values of ``out``'s float dtype),
        reading and writing only the positions ``e`` keeps, the others left as they are (the
        same bits as subtracting their decoded zeros); for codecs with
        :attr:`subtracts_sparse`."""
        raise NotImplementedError(f"{self!r} decodes every position: decode, then subtract")

    def decoded_view(self, e: Encoded) -> torch.Tensor | None:
        """The decoded tensor without a copy (the payload's :attr:`raw_tensor`), or None when
        the codec must compute it. Read only: it is the payload's own memory.

        Raises:
            ValueError: the raw tensor is missing or not ``e.numel`` values of ``e.dtype``.
        """
        if self.raw_tensor is None:
            return None
        t = e.tensors.get(self.raw_tensor)
        if t is None or t.dtype != e.dtype or t.shape != (e.numel,):
            raise ValueError(f"payload tensor {self.raw_tensor!r} is "
                             f"{None if t is None else (tuple(t.shape), t.dtype)}, expected "
                             f"({e.numel},) {e.dtype}")
        return t

    def wire_bytes(self, numel: int, offset: int = 0) -> int | None:
        """Exact ``encode(x).nbytes`` for a float32 ``x`` of ``numel`` values at ``offset``.

        ``None`` when the size depends on the values (e.g. after an entropy stage).
        """
        return None

    def bind_layout(self, shapes: list[torch.Size]) -> None:
        """Tells the codec the parameter shapes, in flat order, behind the streams it encodes.

        Only layout-aware codecs (PowerSGD) use it; the default ignores it.
        """

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per-worker state that must survive a checkpoint (empty for stateless codecs)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return self.name


def given(**kwargs) -> dict:
    """The settings that were set (None means: the codec's own default)."""
    return {k: v for k, v in kwargs.items() if v is not None}
