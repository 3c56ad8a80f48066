"""The run directory: results compared by files, not by scrolling logs.

    DIR/config.json        the resolved config (the sections the run reads)
    DIR/metrics.jsonl      one line per round per member worker (``islands.engine.Engine.row``)
    DIR/final.safetensors  the final global parameters, under the model's ``state_dict`` names
    DIR/summary.json       the run's figures (``islands.engine.Engine.summary``)
    DIR/loss.png           eval loss against inner steps, bytes and time

A folder holds one run. :meth:`RunDir.claim` refuses, before anything runs, a folder that holds
another run (another config: the first differing key is named) or this run finished, unless the
caller resumes (keep what is there) or overwrites (remove the run's files first). A worker of
the real runtime that restarts appends to its own unfinished folder (the same run, a new
process: each row carries the ``run_id`` of the process that wrote it).

Nothing a full disk does leaves a broken file: each row is appended whole or not at all, and
rows that do not fit are kept and retried; while the folder has less room than the run's final
parameters and summary need (:meth:`RunDir.reserve`), rows wait, so those two are always
written; files are replaced atomically. What cannot be written is a
:class:`~islands.core.errors.StorageError` naming the path and the bytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import secrets
import shutil
from pathlib import Path

from islands.core.config import first_difference, normalized
from islands.core.errors import ConfigError, IslandsError, StorageError
from islands.core.files import append_line, free_bytes, remove_temp, storage_error, write_atomic

log = logging.getLogger("islands.run_dir")

# the files of a run in its folder (what --overwrite removes; nothing else is touched)
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "final.safetensors", "loss.png",
             "run.json")
# room kept for the final files until the run says how much they need (RunDir.reserve)
DEFAULT_RESERVE_BYTES = 1 << 16
EXISTING = ("refuse", "resume", "overwrite")


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


def json_line(data) -> str:
    """One JSON object on one line (no newline inside; NaN/Inf as null): the form of every
    machine-readable line islands prints or appends."""
    return json.dumps(_clean(data), default=str, separators=(", ", ": "))


def write_json(path: Path, data) -> None:
    """Writes atomically (temp file, then rename): a reader never sees half a file.

    Raises:
        StorageError: the folder cannot take it (full, read-only).
    """
    text = json.dumps(_clean(data), indent=2, default=str) + "\n"
    write_atomic(path, text.encode(), what=Path(path).name)


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
        with contextlib.suppress(OSError):  # a probe written to a full disk
            probe.unlink(missing_ok=True)
        raise ConfigError(f"{what} {str(path)!r} cannot be written: {e.strerror or e}; "
                          "give a folder you can write to") from None
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` so far ([] before the run writes one). A run
    still going may be writing its last line (a reader polling it, as the integration tests
    do): a last line with no newline that is not yet whole JSON is left out (read again
    later, it is there); any other bad line raises."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    *lines, last = path.read_text().split("\n")
    rows = [json.loads(line) for line in lines if line.strip()]
    if last.strip():
        try:
            rows.append(json.loads(last))
        except json.JSONDecodeError:
            pass  # still being written
    return rows


def read_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise IslandsError(f"{str(run_dir)!r} is not a finished run directory "
                           "(no summary.json); give the --out folder of `islands sim`")
    return json.loads(path.read_text())


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` holds a run's files (a run directory, finished or not)."""
    return any((Path(path) / name).exists() for name in RUN_FILES[:4])


class RunDir:
    """Writes one run's directory: the one writer of ``metrics.jsonl``, ``summary.json`` and
    ``final.safetensors`` for the simulator and the real runtime alike.

    Args:
        path: the folder (created by :meth:`start`).
        flag: how the user named it, for messages (``--out``, ``join(out=...)``).
        fix: what a message about another run in the folder tells the user to do.
    """

    def __init__(self, path: str | Path, *, flag: str = "--out",
                 fix: str = "give another folder, or --overwrite to replace it") -> None:
        self.path, self.flag, self.fix = Path(path), flag, fix
        self.run_id = secrets.token_hex(6)  # this process's run (or life of a worker)
        self._fd: int | None = None
        self._size = 0
        self._pending: list[bytes] = []
        self._reserve = DEFAULT_RESERVE_BYTES
        self._warned = False

    # --- one run per folder ----------------------------------------------------------------

    def claim(self, cfg, *, existing: str = "refuse") -> str:
        """Checks the folder before anything runs.

        Args:
            cfg: this run's config.
            existing: what to do with run files already there: ``"refuse"`` (the folder must
                not hold another run, nor this one finished),
                ``"resume"`` (this run's files are kept: a finished run is not run again,
                an unfinished one goes on or restarts) or ``"overwrite"`` (the run's files
                are removed first, whatever run they were).

        Returns:
            ``"fresh"`` (nothing there), ``"unfinished"`` (this config, no summary yet: a
            restarted worker appends, a simulation starts over) or ``"finished"`` (this
            config, finished; only with ``resume``).

        Raises:
            ConfigError: another run is there, or this one finished (without resume or
                overwrite), naming the folder, the first differing key and the fix.
        """
        if existing not in EXISTING:
            raise ValueError(f"existing ({existing!r}) must be one of {EXISTING}")
        if not holds_run(self.path):
            return "fresh"
        if existing == "overwrite":
            self.clear()
            return "fresh"
        where = f"{self.flag} {str(self.path)!r}"
        stored = self._stored_config()
        if stored is None:
            raise ConfigError(f"{where} holds run files but no readable config.json: {self.fix}")
        mine = plain(cfg.to_dict())
        diff = first_difference(stored, mine)
        if diff is not None:
            key, theirs, ours = diff
            raise ConfigError(f"{where} holds another run: its {key} is {theirs!r}, this run's "
                              f"is {ours!r}: {self.fix}")
        if (self.path / "summary.json").is_file():
            if existing == "resume":
                return "finished"
            raise ConfigError(f"{where} holds this run, finished (summary.json): --resume keeps "
                              "it (nothing runs again), --overwrite runs it again, or give "
                              "another folder")
        return "unfinished"

    def _stored_config(self) -> dict | None:
        try:
            stored = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return normalized(stored) if isinstance(stored, dict) else None

    def clear(self) -> None:
        """Removes this folder's run files (nothing else) and any temp file a writer left."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        remove_temp(self.path)

    def reserve(self, nbytes: int) -> None:
        """Keeps room for the run's final files: while the folder has less than ``nbytes``
        (the final parameters and summary, ``Engine.final_nbytes``) free, rows wait in
        memory.

        Raises:
            StorageError: the folder does not have that room now (before anything runs).
        """
        self._reserve = nbytes
        free = free_bytes(self.path)
        if free is not None and free < self._reserve:
            raise StorageError(
                f"{self.flag} {str(self.path)!r} has {free:,} bytes free; this run's final "
                f"parameters and summary need {self._reserve:,}: free some space there or "
                "give another folder", path=str(self.path), needed=self._reserve, free=free)

    # --- writing ---------------------------------------------------------------------------

    def start(self, cfg, *, append: bool = False) -> None:
        """Creates the folder, writes ``config.json`` and opens ``metrics.jsonl``
        (``append``: keep the rows of an earlier life of this worker)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", cfg.to_dict())
        metrics = self.path / "metrics.jsonl"
        flags = os.O_WRONLY | os.O_CREAT | (0 if append else os.O_TRUNC)
        self._fd = os.open(metrics, flags, 0o644)
        self._size = os.fstat(self._fd).st_size
        if append and self._size:
            self._size = _complete_lines(self._fd, self._size)

    def log(self, row: dict) -> None:
        """Appends one row (readable at once, ``tail -f``), whole or not at all. A row that
        does not fit, or would eat into the room kept for the final files, waits and is
        retried with the next one; the first time, a warning says so."""
        self._pending.append((json_line({**row, "run_id": self.run_id}) + "\n").encode())
        self._flush_rows()

    def _flush_rows(self) -> None:
        """Writes the waiting rows in order while each leaves the room kept; stops (the rest
        waits) at the first that does not fit."""
        metrics = self.path / "metrics.jsonl"
        while self._pending:
            line = self._pending[0]
            free = free_bytes(self.path)
            if free is not None and free - len(line) < self._reserve:
                self._warn(metrics, len(line), free, "kept for the final parameters")
                return
            try:
                self._size = append_line(self._fd, line, self._size)
            except OSError:
                self._warn(metrics, len(line), free_bytes(self.path), "no space")
                return
            self._pending.pop(0)

    def _warn(self, path: Path, needed: int, free: int | None, why: str) -> None:
        if self._warned:
            return
        self._warned = True
        log.warning("%s: a row of %d bytes does not fit (%s free, %s); rows wait in memory and "
                    "are written when there is room, and at the end", path, needed,
                    "?" if free is None else f"{free:,} bytes",
                    "the rest is " + why if why.startswith("kept") else why)

    def finish(self, summary: dict, *, final: bytes | None = None, plot: bool = True) -> None:
        """Ends the run's files, the ones that matter first: ``final.safetensors`` (the
        serialized final parameters, when given), the rows still waiting that fit beside the
        summary, ``summary.json`` (``metrics_rows_unwritten`` counts the rows that do not),
        then ``loss.png`` (optional: a failure to draw is a warning).

        Raises:
            StorageError: the parameters or the summary cannot be written, or rows are left
                unwritten; whatever came before is written.
        """
        if final is not None:
            write_atomic(self.path / "final.safetensors", final, what="the final parameters")
        # the rows may now take all but the summary's room (its size, and a count it may add)
        self._reserve = len(json.dumps(_clean(summary), indent=2, default=str)) + 4096
        try:
            self._flush_rows()
        finally:
            os.close(self._fd)
            self._fd = None
        waiting = len(self._pending)
        write_json(self.path / "summary.json",
                   {**summary, "run_id": self.run_id,
                    **({"metrics_rows_unwritten": waiting} if waiting else {})})
        if waiting:
            metrics = self.path / "metrics.jsonl"
            raise storage_error(metrics, sum(map(len, self._pending)),
                                OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                f"{waiting} rows of") from None
        if plot:
            self.plot(summary)

    def plot(self, summary: dict) -> None:
        """``loss.png`` of this run; a failure (a full disk, a plotting error) is a warning:
        the results are in the files already written."""
        try:
            from islands.metrics.plots import plot_runs

            plot_runs([summary], self.path / "loss.png", title=summary["name"])
        except Exception as e:  # noqa: BLE001 (optional output: never fail the run for it)
            if isinstance(e, OSError):  # a full disk may leave a partial image
                (self.path / "loss.png").unlink(missing_ok=True)
            log.warning("%s: loss.png not drawn (%s: %s)", self.path, type(e).__name__, e)


def _complete_lines(fd: int, size: int) -> int:
    """The length of the file's whole lines: a line an older writer left cut off is dropped."""
    if size == 0:
        return 0
    tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
    if tail.endswith(b"\n"):
        return size
    cut = tail.rfind(b"\n")
    keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if len(tail) == size else size)
    os.ftruncate(fd, keep)
    return keep


def clear_job(path: Path) -> None:
    """Removes a job folder's own run files and those of its workers' folders (``w<i>``)."""
    RunDir(path).clear()
    for sub in sorted(path.glob("w*")):
        if sub.is_dir() and sub.name[1:].isdigit():
            RunDir(sub).clear()
            if not any(sub.iterdir()):
                shutil.rmtree(sub, ignore_errors=True)
