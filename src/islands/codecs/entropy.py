"""A lossless entropy stage after any codec: zstd over the codec's payload bytes (the final
encoding step of FedZip, Malekijoo et al. 2021, "FEDZIP: A Compression Framework for
Communication-Efficient Federated Learning").

The inner codec's tensors are concatenated as raw bytes and compressed as one zstd frame.
Their names, dtypes and shapes are not sent: both sides derive them from the config and
``numel``. Quantized payloads (int8, int4 codes, sign bits) and sparse indices compress; float32
values barely do.

Wire size: the zstd frame's length (frame header and checksum included) plus the inner codec's
``header_bytes``; it depends on the values, so ``wire_bytes`` is None.
Error bound: exactly the inner codec's (the stage is lossless).
"""

from __future__ import annotations

import torch
import zstandard

from islands.codecs.base import PAYLOAD_DTYPES, Codec, Encoded
from islands.core.errors import CodecError


class Entropy(Codec):
    """zstd after ``inner``.

    Args:
        inner: the codec whose payload is compressed.
        level: zstd compression level (1 fast .. 19 small).
    """

    def __init__(self, inner: Codec, *, level: int = 3) -> None:
        if not 1 <= level <= 22:
            raise ValueError(f"level ({level}) must be in [1, 22]")
        self.inner = inner
        self.level = level
        self.name = f"entropy({inner.name})"

    def encode(self, x: torch.Tensor, key: str = "tensor", offset: int = 0, *,
               finite: bool = False) -> Encoded:
        # The inner codec checks dtype and finiteness; checking here too would read x twice.
        return self._encode(x, key, offset, finite=finite)

    def _encode(self, x: torch.Tensor, key: str, offset: int, finite: bool = False) -> Encoded:
        inner = self.inner.encode(x, key, offset, finite=finite)
        # dtype names, not dtypes: the meta travels as JSON over the real transport
        schema = [(name, str(t.dtype), list(t.shape)) for name, t in inner.tensors.items()]
        parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in inner.tensors.values()]
        raw = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        frame = zstandard.ZstdCompressor(level=self.level).compress(raw.numpy())
        packed = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
        return Encoded({"zstd": packed}, numel=inner.numel, dtype=inner.dtype,
                       header_bytes=inner.header_bytes,
                       meta={"schema": schema, "inner": inner.meta, "raw_bytes": raw.numel()})

    def decode(self, e: Encoded) -> torch.Tensor:
        size = e.meta["raw_bytes"]
        try:
            raw = zstandard.ZstdDecompressor().decompress(e.tensors["zstd"].numpy().tobytes(),
                                                          max_output_size=size)
        except zstandard.ZstdError as err:
            raise CodecError(f"corrupt entropy-coded payload: {err}") from err
        if len(raw) != size:
            raise CodecError(f"entropy-coded payload holds {len(raw)} bytes, expected {size}")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if size else \
            torch.empty(0, dtype=torch.uint8)
        tensors, at = {}, 0
        for name, dtype_name, shape in e.meta["schema"]:
            dtype = PAYLOAD_DTYPES.get(dtype_name)
            if dtype is None:
                raise CodecError(f"entropy-coded payload names dtype {dtype_name!r}")
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            tensors[name] = flat[at:at + nbytes].clone().view(dtype).reshape(shape)  # aligned
            at += nbytes
        return self.inner.decode(Encoded(tensors, numel=e.numel, dtype=e.dtype,
                                         header_bytes=e.header_bytes, meta=e.meta["inner"]))

    def bind_layout(self, shapes: list[torch.Size]) -> None:
        self.inner.bind_layout(shapes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)

    def __repr__(self) -> str:
        return f"entropy({self.inner!r})"
