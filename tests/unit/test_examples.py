"""Every example config loads and validates (they are documentation users copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from islands.core.config import load_config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.workers >= 1 and cfg.steps >= 1


def test_there_are_examples():
    assert len(EXAMPLES) >= 3
