"""SparseLoCo (Sarfi et al. 2025, "Communication Efficient LLM Pre-training with SparseLoCo",
arXiv 2508.15706): DiLoCo whose pseudo-gradients cross the wire as 1-3% of their values at 2
bits each.

Per worker and round, with ``Δ`` the pseudo-gradient:

    e ← β·e + Δ                         (the error-feedback accumulator, per worker)
    c = Q(TopK_chunk(e))                (chunked top-k, then ``bits``-bit values)
    e ← e − c
    θ ← θ − lr · mean_i(c_i)            (plain outer SGD, lr 1 by default)

The accumulator replaces the outer momentum (``[outer]`` defaults to SGD, lr 1, no momentum);
the ``c_i`` are all-gathered, not all-reduced, so each is compressed once, by its sender, and
every worker decodes and averages the same rows. In islands this is DiLoCo with
``collective = "all_gather"`` and the codec ``error_feedback(chunk_topk + quant, beta)``: the
accumulator is the codec's residual, so it is per-worker state, saved in the worker's
checkpoint (``codec/``), outside the shared state and its hash; a worker that joins mid-run
starts with a zero accumulator (what it never trained it never owed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from islands.algorithms.diloco import DiLoCo
from islands.algorithms.outer import OuterConfig, outer_factory
from islands.algorithms.schedule import largest, outer_schedule, sync_every_setting
from islands.codecs.chain import ChainConfig
from islands.codecs.chunk_topk import INDEX_CODINGS, ChunkTopKConfig
from islands.codecs.quant import QuantConfig
from islands.core.errors import ConfigError, IslandsWarning
from islands.core.registry import register
from islands.core.sections import AlgorithmConfig, CodecConfig, check


@dataclass(frozen=True, kw_only=True)
class SparseLoCoOuterConfig(OuterConfig):
    """``[outer]`` for SparseLoCo: plain SGD, lr 1 (the paper's), no momentum (the
    accumulator does that work). Every key of :class:`OuterConfig` may be set."""

    lr: float | tuple[tuple[int, float], ...] = 1.0
    momentum: float | tuple[tuple[int, float], ...] = 0.0
    nesterov: bool = False


@register("algorithm", "sparseloco", sections={"outer": SparseLoCoOuterConfig})
@dataclass(frozen=True, kw_only=True)
class SparseLoCoConfig(AlgorithmConfig):
    """``[algorithm] name = "sparseloco"``.

    Attributes:
        sync_every: inner steps per round (H), or an H schedule (as DiLoCo's).
        density: share of each chunk sent (``k = ceil(density · chunk)``; 1/64: 64 of 4096).
        chunk: values per chunk of the top-k.
        bits: bits per kept value (a sign and ``bits - 1`` bits of magnitude between the
            block's smallest and largest kept magnitude: :mod:`islands.codecs.quant`).
        beta: the accumulator's decay (``e ← β·e + Δ``), in [0, 1].
        block: kept values per float32 ``(lo, hi)`` pair of the value quantizer.
        index: how the kept values' offsets are sent: ``"rice"`` (the gaps between a chunk's
            ascending offsets, Golomb-Rice coded: about 7 bits an offset at 3% of 4096) or
            ``"packed"`` (``ceil(log2 chunk)`` bits each, a size known in advance).
    """

    name: str = "sparseloco"
    sync_every: int | tuple[tuple[int, int], ...] = 50
    density: float = 1 / 64
    chunk: int = 4096
    bits: int = 2
    beta: float = 0.95
    block: int = 256
    index: str = "rice"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sync_every", sync_every_setting(self.sync_every))
        check(0 < self.density <= 1, "algorithm.density", self.density, "must be in (0, 1]")
        check(self.chunk >= 1, "algorithm.chunk", self.chunk, "must be >= 1 (e.g. 4096)")
        check(1 <= self.bits <= 8, "algorithm.bits", self.bits, "must be in [1, 8]")
        check(0 <= self.beta <= 1, "algorithm.beta", self.beta, "must be in [0, 1]")
        check(self.block >= 1, "algorithm.block", self.block, "must be >= 1")
        check(self.index in INDEX_CODINGS, "algorithm.index", self.index,
              f"must be one of {', '.join(repr(i) for i in INDEX_CODINGS)}")

    def wire_codec(self, codec: CodecConfig) -> CodecConfig:
        if codec.name != "identity" or codec.error_feedback:
            raise ConfigError(
                f"codec.name ({codec.name!r}, error_feedback = {codec.error_feedback}) is not "
                "read by algorithm.name = 'sparseloco', which encodes with its own chunked "
                "top-k, quantized values and accumulator (algorithm.density, chunk, bits, "
                "beta): remove them from [codec] (codec.entropy = true is kept), or use "
                "algorithm.name = 'diloco' with [codec] name = 'chain'")
        stages = (ChunkTopKConfig(density=self.density, chunk=self.chunk, index=self.index),
                  QuantConfig(bits=self.bits, block=self.block))
        return ChainConfig(stages=stages, error_feedback=True, error_feedback_beta=self.beta,
                           entropy=codec.entropy)

    def build(self, run, aggregator) -> DiLoCo:
        # (the codec it would refuse is refused by wire_codec, which builds every worker's)
        if largest(run.outer.momentum) > 0:
            warnings.warn(IslandsWarning(
                f"outer.momentum ({run.outer.momentum}) under algorithm.name = 'sparseloco': "
                "its accumulator replaces the outer momentum, and with both the main job "
                "ended 21% higher (docs/codecs.md); set outer.momentum = 0 and "
                "outer.nesterov = false unless you mean to compare"), stacklevel=3)
        return DiLoCo(self.sync_every, outer=outer_factory(run.outer), aggregator=aggregator,
                      outer_schedule=outer_schedule(lr=run.outer.lr,
                                                    momentum=run.outer.momentum),
                      collective="all_gather")
