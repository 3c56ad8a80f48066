"""Codecs: what crosses the wire. Each codec lives in its own file; ``build_codec`` maps a
``[codec]`` config section to an instance (one per worker, since codecs may hold state).

Composition: ``error_feedback`` wraps the lossy codec, ``entropy`` wraps the result, so
``codec.name = "topk"``, ``error_feedback = true``, ``entropy = true`` builds
``entropy(error_feedback(topk(0.01)))``; ``codec.name = "chain"`` puts a value codec after a
sparsifier (``chunk_topk`` then 2-bit ``quant``). See ``docs/codecs.md`` for wire sizes and
error bounds.
"""

from __future__ import annotations

from islands.codecs.base import Codec, Encoded, check_finite
from islands.codecs.cast import Cast, CastConfig, Identity, IdentityConfig
from islands.codecs.chain import Chain, ChainConfig
from islands.codecs.chunk_topk import ChunkTopK, ChunkTopKConfig
from islands.codecs.dct import DCTTopK, DCTTopKConfig
from islands.codecs.entropy import Entropy
from islands.codecs.error_feedback import ErrorFeedback
from islands.codecs.fp4 import FP4, FP4Config
from islands.codecs.int4 import Int4, Int4Config
from islands.codecs.int8 import Int8, Int8Config
from islands.codecs.powersgd import PowerSGD, PowerSGDConfig
from islands.codecs.quant import Quant, QuantConfig
from islands.codecs.randomk import RandomK
from islands.codecs.sign import Sign, SignConfig
from islands.codecs.topk import SparseConfig, TopK
from islands.core import registry
from islands.core.config import build_component
from islands.core.sections import CodecConfig, check


def codec_names() -> list[str]:
    """Every registered ``codec.name``."""
    return registry.names("codec")


def codec_config(**settings) -> CodecConfig:
    """The ``[codec]`` section for ``settings`` (``codec_config(name="int8", block=128)``),
    validated as a config file's would be."""
    return build_component("codec", settings)


def build_codec(cfg: CodecConfig) -> Codec:
    """Returns a fresh codec for one worker from its ``[codec]`` section (one per worker, since
    codecs may hold state): the named codec, wrapped in error feedback, then entropy coding,
    as asked."""
    check(0 <= cfg.error_feedback_beta <= 1, "codec.error_feedback_beta",
          cfg.error_feedback_beta, "must be in [0, 1] (1: plain error feedback)")
    check(cfg.error_feedback or cfg.error_feedback_beta == 1, "codec.error_feedback_beta",
          cfg.error_feedback_beta, "needs codec.error_feedback = true")
    codec = cfg.make()
    if cfg.error_feedback:
        codec = ErrorFeedback(codec, beta=cfg.error_feedback_beta)
    if cfg.entropy:
        codec = Entropy(codec)
    return codec


__all__ = [
    "FP4",
    "Cast",
    "CastConfig",
    "Chain",
    "ChainConfig",
    "ChunkTopK",
    "ChunkTopKConfig",
    "DCTTopK",
    "DCTTopKConfig",
    "Codec",
    "CodecConfig",
    "Encoded",
    "Entropy",
    "ErrorFeedback",
    "Identity",
    "Int4",
    "Int8",
    "PowerSGD",
    "Quant",
    "QuantConfig",
    "RandomK",
    "Sign",
    "TopK",
    "FP4Config",
    "IdentityConfig",
    "Int4Config",
    "Int8Config",
    "PowerSGDConfig",
    "SignConfig",
    "SparseConfig",
    "build_codec",
    "check_finite",
    "codec_config",
    "codec_names",
]
