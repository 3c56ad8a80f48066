"""The run directory: results compared by files, not by scrolling logs.

    DIR/config.json     the resolved config
    DIR/metrics.jsonl   one line per round per member worker (``islands.engine.Engine.row``)
    DIR/summary.json    the run's figures (``islands.engine.Engine.summary``)
    DIR/loss.png        eval loss against inner steps and against bytes sent
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from islands.core.errors import ConfigError, IslandsError


def _clean(value):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def plain(data):
    """``data`` as :func:`write_json` stores it and ``json.load`` reads it back (tuples as
    lists, NaN/Inf as None, anything else JSON lacks as its ``str``)."""
    return json.loads(json.dumps(_clean(data), default=str))


def write_json(path: Path, data) -> None:
    """Writes atomically (temp file, then rename): a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


def check_writable(path: str | Path, what: str) -> Path:
    """Creates the folder ``path`` and proves it takes a file, before any work is done.

    Raises:
        ConfigError: naming ``what`` (the flag) and the path, when it cannot be written.
    """
    path = Path(path)
    probe = path / f".islands-write-test.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} cannot be written: {e.strerror or e}; "
                          "give a folder you can write to") from None
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` so far ([] before the run writes one)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise IslandsError(f"{str(run_dir)!r} is not a finished run directory "
                           "(no summary.json); give the --out folder of `islands sim`")
    return json.loads(path.read_text())


class RunDir:
    """Writes one run's directory: the one writer of ``metrics.jsonl`` and ``summary.json``
    for the simulator and the real runtime alike.

    Args:
        path: the folder (created by :meth:`start`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._metrics = None

    def start(self, cfg, *, append: bool = False) -> None:
        """Creates the folder, writes ``config.json`` and opens ``metrics.jsonl``
        (``append``: keep the rows of an earlier life of this worker)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", cfg.to_dict())
        self._metrics = open(self.path / "metrics.jsonl", "a" if append else "w")

    def log(self, row: dict) -> None:
        """Appends one row (flushed: readable while the run goes on, ``tail -f``)."""
        self._metrics.write(json.dumps(_clean(row)) + "\n")
        self._metrics.flush()

    def finish(self, summary: dict, *, plot: bool = True) -> None:
        """Writes ``summary.json`` and (``plot``) ``loss.png``."""
        self._metrics.close()
        write_json(self.path / "summary.json", summary)
        if plot:
            from islands.metrics.plots import plot_runs

            plot_runs([summary], self.path / "loss.png", title=summary["name"])
