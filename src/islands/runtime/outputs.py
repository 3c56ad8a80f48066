"""A real worker's run directory: claimed before anything runs, written at the end with the
final parameters and summary first, then merged into its job's folder.

A worker writes ``JOB/w<i>/`` (``islands run``, the drop-in loop, ``torchrun``; ``islands
launch``'s ``OUT/w<i>/``). The folder is refused when it holds another run, or this worker's
run finished (unless overwritten); an unfinished one of the same config is this worker's
earlier life (a restart), whose rows stay. It must not lie inside another run's directory
(``islands sim``'s ``runs/diloco`` is not a job folder).
"""

from __future__ import annotations

import logging

from safetensors.torch import save

from islands.core.errors import ConfigError
from islands.core.files import write_atomic
from islands.engine import Engine
from islands.metrics.run_dir import RunDir
from islands.runtime.report import SKETCHES, write_job

log = logging.getLogger("islands.worker")


def claim(out: RunDir, cfg, existing: str = "refuse") -> bool:
    """Checks a worker's folder before anything runs; returns whether to append to it (the
    rows of an earlier life of this worker).

    Raises:
        ConfigError: the folder lies inside another run's directory, or holds another run,
            or this run finished (see :meth:`RunDir.claim`).
    """
    parent = out.path.parent
    if (parent / "metrics.jsonl").is_file():
        raise ConfigError(f"{out.flag} {str(out.path)!r} lies inside {str(parent)!r}, the run "
                          "directory of another run: give the worker a folder of its own "
                          f"(e.g. {str(parent)}-job/{out.path.name})")
    return out.claim(cfg, existing=existing) != "fresh"


def is_worker_dir(path) -> bool:
    return path.name[:1] == "w" and path.name[1:].isdigit()


def finish(out: RunDir, engine: Engine, member, wall_s: float, extra: dict) -> dict:
    """Writes the worker's folder (a gossip worker's consensus sketches, final parameters,
    summary, rows, ``loss.png``), then merges its job's folder; returns the worker's
    summary.

    Raises:
        StorageError: the final parameters or the summary cannot be written.
    """
    summary = {**engine.summary(wall_s), **member.summary_fields(), **extra,
               "run_id": out.run_id}
    if engine.sketches:  # before summary.json: a worker merging the job reads both
        write_atomic(out.path / SKETCHES, save({f"step{s}": v for s, v in
                                                engine.sketches.items()}),
                     what="the consensus sketches")
    out.finish(summary, final=engine.final_bytes(member.worker))
    if is_worker_dir(out.path):
        try:
            write_job(out.path.parent, evaluate_states=(
                engine.evaluate_states if engine.evaluator is not None
                and not engine.algorithm.shares_parameters else None))
        except Exception as e:  # noqa: BLE001 (the job's merge is optional: this worker's
            # own files are written)
            log.warning("the job's summary in %s not written (%s: %s)", out.path.parent,
                        type(e).__name__, e)
    return summary
