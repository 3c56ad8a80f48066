"""Codecs: what crosses the wire. Each codec lives in its own file; ``build_codec`` maps a
``[codec]`` config section to an instance (one per worker, since codecs may hold state)."""

from __future__ import annotations

from typing import Callable

import torch

from islands.codecs.base import Codec, Encoded, check_finite
from islands.codecs.cast import Cast, Identity
from islands.core.errors import ConfigError

# name -> (factory taking the CodecConfig, the config fields it accepts)
CODECS: dict[str, tuple[Callable, frozenset[str]]] = {
    "identity": (lambda c: Identity(), frozenset()),
    "fp16": (lambda c: Cast(torch.float16), frozenset()),
    "bf16": (lambda c: Cast(torch.bfloat16), frozenset()),
}

_OPTIONAL = ("block", "fraction", "count", "rank", "stochastic")


def build_codec(cfg) -> Codec:
    """Returns a fresh codec for one worker from a :class:`~islands.core.config.CodecConfig`.

    Raises:
        ConfigError: a setting that does not apply to the codec was given.
    """
    factory, accepted = CODECS[cfg.name]
    for opt in _OPTIONAL:
        if getattr(cfg, opt) is not None and opt not in accepted:
            allowed = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(f"codec.{opt} ({getattr(cfg, opt)!r}) does not apply to "
                              f"codec.name = {cfg.name!r} (its settings: {allowed})")
    codec = factory(cfg)
    if cfg.entropy:
        raise ConfigError("codec.entropy is not available yet")
    if cfg.error_feedback:
        raise ConfigError("codec.error_feedback is not available yet")
    return codec


__all__ = ["CODECS", "Codec", "Encoded", "Identity", "Cast", "build_codec", "check_finite"]
