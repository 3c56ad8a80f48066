"""Writing islands' files so that a full disk never leaves a broken one.

:func:`write_atomic` writes a whole file through a temp file in the same folder, fsynced and
renamed over the target (then the folder is fsynced): a reader, a killed process or a full disk
leaves either the previous file or the new one, never a truncated one, and never a temp file.
:func:`append_line` adds one line to a log (``metrics.jsonl``) or none of it. Both raise
:class:`~islands.core.errors.StorageError` naming the path, the bytes needed and the bytes
free, instead of a bare ``OSError`` traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from islands.core.errors import StorageError

# errors that mean "no room": ENOSPC, a quota, a file-size limit
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def free_bytes(folder: str | Path) -> int | None:
    """Bytes free for an unprivileged writer in ``folder`` (or its nearest existing parent)."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def storage_error(path: str | Path, needed: int, e: OSError, what: str = "") -> StorageError:
    """A :class:`StorageError` for a failed write of ``needed`` bytes to ``path``."""
    free = free_bytes(Path(path).parent)
    why = "no space left on device" if e.errno in _NO_ROOM else (e.strerror or str(e))
    room = f"{needed:,} bytes needed, {free:,} free" if free is not None else \
        f"{needed:,} bytes needed"
    return StorageError(f"cannot write {what + ' ' if what else ''}{str(path)!r}: {why} "
                        f"({room}); free some space there or write elsewhere",
                        path=str(path), needed=needed, free=free)


def write_atomic(path: str | Path, data: bytes, *, what: str = "") -> None:
    """Writes ``data`` to ``path`` whole or not at all (temp file, fsync, rename, fsync of the
    folder); the temp file is removed when the write fails.

    Raises:
        StorageError: the folder cannot take the file (full, read-only, ...).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, len(data), e, what) from None
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened (some network file systems): renamed anyway
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_line(fd: int, line: bytes, size: int) -> int:
    """Appends ``line`` to the file open as ``fd`` (at byte ``size``, its current length);
    returns the new length. On a failure the file is cut back to ``size``: no partial line.

    Raises:
        OSError: the line could not be written (the caller says where).
    """
    try:
        written = os.pwrite(fd, line, size)
        while written < len(line):
            n = os.pwrite(fd, line[written:], size + written)
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written += n
    except OSError:
        os.ftruncate(fd, size)
        raise
    return size + len(line)


def remove_temp(folder: Path) -> int:
    """Removes the temp files (``.NAME.tmp.PID``) a killed writer left; returns how many."""
    if not folder.is_dir():
        return 0
    stale = [f for f in folder.iterdir() if f.name.startswith(".") and ".tmp." in f.name]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)
