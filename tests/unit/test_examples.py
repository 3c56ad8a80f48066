"""Every example config loads and builds (they are documentation users copy): each component
it names is built once, exactly as a run would before starting."""

from __future__ import annotations

from pathlib import Path

import pytest

from islands.core.config import load_config
from islands.engine import check_config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_builds(path):
    check_config(load_config(path))


def test_each_example_names_the_command_that_runs_it():
    for path in EXAMPLES:
        assert f"islands sim examples/{path.name}" in path.read_text(), path.name
