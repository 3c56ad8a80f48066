"""``[codec]`` settings build the right composed codec, reject settings that do not apply, and
every codec trains a tiny DiLoCo and DDP run end to end (layout bound by the runner)."""

from __future__ import annotations

import math

import pytest

from islands import simulate
from islands.codecs import (
    Entropy,
    ErrorFeedback,
    PowerSGD,
    TopK,
    build_codec,
    codec_config,
    codec_names,
)
from islands.core.errors import ConfigError


def test_composition_order_is_entropy_of_error_feedback():
    c = build_codec(codec_config(name="topk", fraction=0.01, error_feedback=True, entropy=True))
    assert isinstance(c, Entropy) and isinstance(c.inner, ErrorFeedback)
    assert isinstance(c.inner.inner, TopK) and c.inner.inner.fraction == 0.01
    assert repr(c) == "entropy(error_feedback(topk(0.01)))"


@pytest.mark.parametrize("cfg, match", [
    ({"name": "int8", "rank": 4}, "codec.rank"),
    ({"name": "fp16", "block": 64}, "codec.block"),
    ({"name": "powersgd", "stochastic": True}, "codec.stochastic"),
    ({"name": "topk", "fraction": 0.1, "count": 5}, "exclusive"),
])
def test_settings_that_do_not_apply_are_rejected(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_codec(codec_config(**cfg))


def test_each_codec_builds_with_its_settings():
    assert build_codec(codec_config(name="int8", block=128, stochastic=True)).block == 128
    assert build_codec(codec_config(name="topk", count=7)).count == 7
    assert isinstance(build_codec(codec_config(name="powersgd", rank=2)), PowerSGD)


@pytest.mark.parametrize("name", codec_names())
def test_every_registered_codec_builds_from_its_name_and_sends_what_it_says(name):
    import torch

    codec = build_codec(codec_config(name=name))
    x = torch.randn(1000)
    e = codec.encode(x, key="w0/test")
    assert codec.decode(e).shape == x.shape
    assert codec.wire_bytes(1000) in (None, e.nbytes)


def test_an_unknown_codec_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"codec.name \('zip'\) must be one of \['bf16'"):
        build_codec(codec_config(name="zip"))


_FP32_BYTES: dict[str, float] = {}


@pytest.mark.parametrize("algorithm", ["diloco", "ddp", "local_sgd"])
@pytest.mark.parametrize("codec", ["int8", "fp4", "powersgd"])
def test_every_algorithm_trains_with_a_codec(tiny, algorithm, codec):
    cfg = tiny(f"algorithm.name='{algorithm}'", f"codec.name='{codec}'",
               "codec.error_feedback=true", "steps=4", "algorithm.sync_every=2", "eval_every=4")
    if algorithm not in _FP32_BYTES:
        fp32 = tiny(f"algorithm.name='{algorithm}'", "steps=4", "algorithm.sync_every=2",
                    "eval_every=4")
        _FP32_BYTES[algorithm] = simulate(fp32, out_dir=None)["bytes_sent_per_worker"]
    s = simulate(cfg, out_dir=None)
    assert math.isfinite(s["final_eval_loss"])
    assert s["bytes_sent_per_worker"] < _FP32_BYTES[algorithm] / 3
