"""Codecs: what crosses the wire. Each codec lives in its own file; ``build_codec`` maps a
``[codec]`` config section to an instance (one per worker, since codecs may hold state).

Composition: ``error_feedback`` wraps the lossy codec, ``entropy`` wraps the result, so
``codec.name = "topk"``, ``error_feedback = true``, ``entropy = true`` builds
``entropy(error_feedback(topk(0.01)))``. See ``docs/codecs.md`` for wire sizes and error bounds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from islands.codecs.base import Codec, Encoded, check_finite
from islands.codecs.cast import Cast, Identity
from islands.codecs.entropy import Entropy
from islands.codecs.error_feedback import ErrorFeedback
from islands.codecs.fp4 import FP4
from islands.codecs.int4 import Int4
from islands.codecs.int8 import Int8
from islands.codecs.powersgd import PowerSGD
from islands.codecs.randomk import RandomK
from islands.codecs.sign import Sign
from islands.codecs.topk import TopK
from islands.core.errors import ConfigError

DEFAULT_FRACTION = 0.01


def _given(**kwargs) -> dict:
    """The settings that were set (None means: the codec's default)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _sparsity(c) -> dict:
    if c.fraction is not None and c.count is not None:
        raise ConfigError(f"codec.fraction ({c.fraction}) and codec.count ({c.count}) are "
                          "exclusive; set one of them")
    if c.count is not None:
        return {"count": c.count}
    return {"fraction": c.fraction if c.fraction is not None else DEFAULT_FRACTION}


# name -> (factory taking the CodecConfig, the config fields it accepts)
CODECS: dict[str, tuple[Callable, frozenset[str]]] = {
    "identity": (lambda c: Identity(), frozenset()),
    "fp16": (lambda c: Cast(torch.float16), frozenset()),
    "bf16": (lambda c: Cast(torch.bfloat16), frozenset()),
    "int8": (lambda c: Int8(**_given(block=c.block, stochastic=c.stochastic)),
             frozenset({"block", "stochastic"})),
    "int4": (lambda c: Int4(**_given(block=c.block, stochastic=c.stochastic)),
             frozenset({"block", "stochastic"})),
    "fp4": (lambda c: FP4(**_given(block=c.block)), frozenset({"block"})),
    "topk": (lambda c: TopK(**_sparsity(c)), frozenset({"fraction", "count"})),
    "randomk": (lambda c: RandomK(**_sparsity(c)), frozenset({"fraction", "count"})),
    "powersgd": (lambda c: PowerSGD(**_given(rank=c.rank)), frozenset({"rank"})),
    "sign": (lambda c: Sign(**_given(block=c.block)), frozenset({"block"})),
}

_OPTIONAL = ("block", "fraction", "count", "rank", "stochastic")


def build_codec(cfg) -> Codec:
    """Returns a fresh codec for one worker from a :class:`~islands.core.config.CodecConfig`.

    Raises:
        ConfigError: an unknown name, or a setting that does not apply to the codec.
    """
    if cfg.name not in CODECS:
        raise ConfigError(f"codec.name ({cfg.name!r}) must be one of {sorted(CODECS)}")
    factory, accepted = CODECS[cfg.name]
    for opt in _OPTIONAL:
        if getattr(cfg, opt) is not None and opt not in accepted:
            allowed = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(f"codec.{opt} ({getattr(cfg, opt)!r}) does not apply to "
                              f"codec.name = {cfg.name!r} (its settings: {allowed})")
    codec = factory(cfg)
    if cfg.error_feedback:
        codec = ErrorFeedback(codec)
    if cfg.entropy:
        codec = Entropy(codec)
    return codec


__all__ = [
    "CODECS",
    "FP4",
    "Cast",
    "Codec",
    "Encoded",
    "Entropy",
    "ErrorFeedback",
    "Identity",
    "Int4",
    "Int8",
    "PowerSGD",
    "RandomK",
    "Sign",
    "TopK",
    "build_codec",
    "check_finite",
]
