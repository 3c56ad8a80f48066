"""Codec chains: a sparsifier, then a codec for the values it keeps (chunked top-k, then 2-bit
values: SparseLoCo's compressor; DCT top-k, then signs: DeMo's).

The first stage is a sparsifier (``sparse``: ``topk``, ``randomk``, ``chunk_topk``,
``dct_topk``); each later stage encodes the float32 ``values`` of the stage before it, so only
the last stage may be a non-sparse codec (``quant``, ``sign``, ``int8``, ``fp16``...). The
payload is the first stage's tensors (indices, seeds) and the value stage's, named
``values.<name>``; decoding runs the stages backwards, so there is one decode path and one byte
count: ``nbytes`` adds every stage's tensors and headers. ``error_feedback`` and ``entropy``
wrap the whole chain (``[codec] error_feedback = true``, ``entropy = true``).

Wire size: the first stage's, less its ``4 K`` bytes of float32 values, plus the value
stage's for ``K`` values. Error bound: the sparsifier's on the positions, the value codec's on
the kept values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from islands.codecs.base import Codec, Encoded
from islands.codecs.chunk_topk import ChunkTopKConfig
from islands.codecs.quant import QuantConfig
from islands.core.errors import ConfigError
from islands.core.registry import register
from islands.core.sections import CodecConfig

VALUES = "values."  # prefix of the value stage's tensors in the chain's payload


class Chain(Codec):
    """``values`` encodes what ``first`` keeps.

    Args:
        first: a sparsifier (``first.sparse``).
        values: the codec of its kept values.
    """

    sparse = False  # the values are encoded: nothing float is left to re-encode

    def __init__(self, first: Codec, values: Codec) -> None:
        if not first.sparse:
            raise ValueError(f"{first!r} keeps no float values to encode further; a chain's "
                             "stages before the last must be sparsifiers (topk, randomk, "
                             "chunk_topk, dct_topk)")
        self.first, self.values = first, values
        self.name = f"{first.name}+{values.name}"

    @property
    def checks_finite(self) -> bool:  # the first stage sees every value; the values stage
        return self.first.checks_finite  # only those it keeps

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        head = self.first.encode(x, key, offset, finite=True)
        kept = head.tensors.pop("values")
        tail = self.values.encode(kept, f"{key}/values", offset, finite=True)
        head.tensors.update({VALUES + k: t for k, t in tail.tensors.items()})
        head.header_bytes += tail.header_bytes
        head.meta = {"first": head.meta, "values": tail.meta, "kept": kept.numel()}
        return head

    def decode(self, e: Encoded) -> torch.Tensor:
        return self.first.decode(self._head(e))

    def decode_into(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        return self.first.decode_into(self._head(e), out)

    @property
    def subtracts_sparse(self) -> bool:  # the first stage says where the values go
        return self.first.subtracts_sparse

    def subtract_decoded(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        return self.first.subtract_decoded(self._head(e), out)

    def _head(self, e: Encoded) -> Encoded:
        """The first stage's payload, its values decoded by the value stage."""
        tail = Encoded({k[len(VALUES):]: t for k, t in e.tensors.items() if k.startswith(VALUES)},
                       numel=e.meta["kept"], meta=e.meta["values"])
        head = {k: t for k, t in e.tensors.items() if not k.startswith(VALUES)}
        head["values"] = self.values.decode(tail)
        return Encoded(head, numel=e.numel, dtype=e.dtype, meta=e.meta["first"])

    def wire_bytes(self, numel: int, offset: int = 0) -> int | None:
        head = self.first.wire_bytes(numel, offset)
        kept = self.first.kept(numel, offset)
        tail = self.values.wire_bytes(kept, offset)
        return None if head is None or tail is None else head - 4 * kept + tail

    def kept(self, numel: int, offset: int = 0) -> int:
        return self.first.kept(numel, offset)

    def bind_layout(self, shapes: list[torch.Size]) -> None:
        self.first.bind_layout(shapes)  # the value stage sees kept values, not tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"first/{k}": v for k, v in self.first.state_dict().items()}
        state.update({f"values/{k}": v for k, v in self.values.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, codec in (("first/", self.first), ("values/", self.values)):
            codec.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                   if k.startswith(prefix)})

    def __repr__(self) -> str:
        return f"{self.first!r}+{self.values!r}"


@register("codec", "chain")
@dataclass(frozen=True, kw_only=True)
class ChainConfig(CodecConfig):
    """``[codec] name = "chain"``: ``stages``, each a codec's table without
    ``error_feedback``/``entropy`` (those wrap the whole chain)::

        [codec]
        name = "chain"
        stages = [{name = "chunk_topk", density = 0.015625, chunk = 4096},
                  {name = "quant", bits = 2}]
        error_feedback = true

    Attributes:
        stages: two or more codecs; all but the last are sparsifiers (default: SparseLoCo's
            compressor, chunked top-k 64 of 4096, then 2-bit values).
    """

    name: str = "chain"
    stages: tuple[CodecConfig, ...] = field(
        default_factory=lambda: (ChunkTopKConfig(), QuantConfig(bits=2)))

    def __post_init__(self) -> None:
        if len(self.stages) < 2:
            raise ConfigError(f"codec.stages has {len(self.stages)} stage(s); a chain needs "
                              "two or more: a sparsifier, then a codec for its values (e.g. "
                              "[{name = 'chunk_topk'}, {name = 'quant', bits = 2}])")
        for i, stage in enumerate(self.stages):
            if stage.name == "chain" or stage.error_feedback or stage.entropy:
                raise ConfigError(
                    f"codec.stages[{i}] ({stage.name!r}, error_feedback = "
                    f"{stage.error_feedback}, entropy = {stage.entropy}): a stage is one plain "
                    "codec; set error_feedback and entropy on [codec] itself, around the chain")
            if i < len(self.stages) - 1 and not stage.make().sparse:
                raise ConfigError(
                    f"codec.stages[{i}] ({stage.name!r}) keeps no float values for the next "
                    "stage; every stage but the last must be a sparsifier (topk, randomk, "
                    "chunk_topk, dct_topk)")

    def make(self) -> Codec:
        codecs = [s.make() for s in self.stages]
        out = codecs[-1]
        for first in reversed(codecs[:-1]):
            out = Chain(first, out)
        return out
