"""Shared fixtures: tiny configs so unit tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest

from islands.core.config import load_config

TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "data.batch_size=4", "data.max_bytes=300000", "data.eval_batches=2", "device='cpu'"]


def tiny_config(*overrides: str):
    """The defaults shrunk to a 1-layer, 32-wide model on 300 kB of text."""
    return load_config(None, [*TINY, *overrides])


@pytest.fixture
def tiny():
    return tiny_config
