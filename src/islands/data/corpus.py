"""Byte-level corpora that need no download.

The default corpus is the ``.py`` files of the running Python's standard library: real text,
on every machine. ``"python-docs"`` is a second one, English prose: the Python documentation's
reference topics that ``pydoc`` shows (``pydoc_data.topics``, shipped with CPython: 79 topics,
about 465 kB), cut at paragraph breaks into documents of about 2 kB so that the hashed
validation split holds a few percent of the bytes, not one or two short topics. Any text file
or folder of text files works too (``data.corpus = "path"``).
Files are split into train and validation by a hash of their relative path, so the split is
the same on every machine and every run. Users with internet access can load any Hugging Face
``datasets`` text column with :func:`from_hf_dataset` and pass the resulting folder.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from islands.core.errors import DataError, IslandsWarning
from islands.core.sections import DataConfig, check


@dataclass(frozen=True, kw_only=True)
class TextDataConfig(DataConfig):
    """``[data]`` of the ``byte_gpt`` task: the partition every task reads, and where its bytes
    come from.

    Attributes:
        corpus: ``"python-stdlib"`` (the ``.py`` files of the running Python's standard
            library, no download), ``"python-docs"`` (English prose: the Python reference
            topics pydoc shows, shipped with CPython, about 465 kB) or a path to a text file
            or a folder of text files.
        val_fraction: share of files held out for validation (chosen by a hash of the path).
        max_bytes: cap on corpus bytes read (None: all). Keeps start-up fast.
        eval_batches: validation batches per evaluation.
        chunk_bytes: granularity of partitioning; sampled windows never cross a chunk.
    """

    corpus: str = "python-stdlib"
    val_fraction: float = 0.05
    max_bytes: int | None = 8_000_000
    eval_batches: int = 8
    chunk_bytes: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction,
              "must be in (0, 1)")
        check(self.max_bytes is None or self.max_bytes >= 10_000, "data.max_bytes",
              self.max_bytes, "must be >= 10000 or omitted for the whole corpus")
        check(self.eval_batches >= 1, "data.eval_batches", self.eval_batches, "must be >= 1")
        check(self.chunk_bytes >= 64, "data.chunk_bytes", self.chunk_bytes, "must be >= 64")


TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini",
                 ".html", ".css", ".js", ".csv", ".tex", ".yaml", ".yml", ""}


@dataclass(frozen=True)
class Document:
    """One source file: its relative path, its source group (top folder) and its bytes."""

    path: str
    source: str
    data: bytes


def _hash01(text: str) -> float:
    """A stable number in [0, 1) from a string (sha1; not Python's salted hash)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_files(corpus: str) -> tuple[Path, list[Path]]:
    if corpus == "python-stdlib":
        root = stdlib_root()
        return root, _walk(root, (".py",), skip={"site-packages", "dist-packages"})[0]
    path = Path(corpus).expanduser()
    if not path.exists():
        raise DataError(f"data.corpus path {str(path)!r} does not exist "
                        "(give a text file, a folder of text files, or 'python-stdlib')")
    if path.is_file():
        return path.parent, [path]
    found, others = _walk(path, tuple(TEXT_SUFFIXES), skip=set())
    if not found and others:
        shown = ", ".join(f"{s or '(none)'} ({n})" for s, n in others.most_common(5))
        raise DataError(f"data.corpus folder {str(path)!r} holds no file that is read: its "
                        f"files have the extensions {shown}; the ones read are "
                        f"{', '.join(sorted(s for s in TEXT_SUFFIXES if s))} and none (give "
                        "one file's path to read it whatever its extension)")
    return path, found


def _walk(root: Path, suffixes: tuple[str, ...], skip: set[str]
          ) -> tuple[list[Path], Counter]:
    """Files under ``root`` with one of ``suffixes`` (and a count of the other extensions),
    never entering hidden folders, caches or ``skip`` (pruned, not filtered: the stdlib's
    site-packages can hold gigabytes)."""
    found, others = [], Counter()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and d != "__pycache__"
                   and not d.startswith(".")]
        for n in names:
            if n.startswith("."):
                continue
            suffix = Path(n).suffix.lower()
            if suffix in suffixes:
                found.append(Path(folder, n))
            else:
                others[suffix] += 1
    return found, others


def is_binary(data: bytes) -> bool:
    """Whether bytes look like a binary file rather than text: a NUL byte in the first 8 KB
    (git's test; no text encoding in use puts NUL in text)."""
    return b"\0" in data[:8192]


def load_documents(corpus: str, max_bytes: int | None = None) -> list[Document]:
    """Reads the corpus; with ``max_bytes``, a deterministic hashed sample of files up to it.

    Returns the documents sorted by path (a fresh list; the bytes are read once per process
    for the standard-library corpus, which does not change while Python runs).

    Raises:
        DataError: the path is missing or holds no readable text.
    """
    if corpus == "python-stdlib":
        return list(_stdlib_documents(max_bytes))
    if corpus == "python-docs":
        return list(_pydoc_documents(max_bytes))
    return _read_documents(corpus, max_bytes)


@functools.lru_cache(maxsize=4)
def _pydoc_documents(max_bytes: int | None) -> tuple[Document, ...]:
    """The pydoc topics (``"assert"``, ``"atom-literals"``, ...) cut into documents of about
    2 kB at paragraph breaks (``assert/0.txt``, ...); the source group is the topic name's
    first word (``atom``), for the by-source partitions."""
    try:
        from pydoc_data.topics import topics  # noqa: PLC0415 - only this corpus needs it
    except ImportError as e:  # a Python built without its docs
        raise DataError("data.corpus 'python-docs' needs the standard library's pydoc_data "
                        "(missing from this Python); use 'python-stdlib' or a path") from e
    pieces = [Document(f"{name}/{i}.txt", name.split("-")[0], data)
              for name in topics for i, data in enumerate(_paragraph_chunks(topics[name]))]
    docs, total = [], 0
    for d in sorted(pieces, key=lambda d: _hash01(d.path)):
        if max_bytes is not None and total >= max_bytes:
            break
        docs.append(d)
        total += len(d.data)
    return tuple(sorted(docs, key=lambda d: d.path))


def _paragraph_chunks(text: str, size: int = 2048) -> list[bytes]:
    """``text`` cut at blank lines into pieces of at least ``size`` bytes (the last may be
    shorter); joined again they give ``text`` back."""
    chunks, current = [], ""
    for para in text.split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current.encode()) >= size:
            chunks.append(current.encode())
            current = ""
    if current:
        chunks.append(current.encode())
    return chunks


@functools.lru_cache(maxsize=4)
def _stdlib_documents(max_bytes: int | None) -> tuple[Document, ...]:
    return tuple(_read_documents("python-stdlib", max_bytes))


def _read_documents(corpus: str, max_bytes: int | None) -> list[Document]:
    root, files = _list_files(corpus)
    files = sorted(files, key=lambda p: _hash01(p.relative_to(root).as_posix()))
    docs, total, binary = [], 0, []
    for p in files:
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            data = p.read_bytes()
        except OSError:
            continue  # unreadable file (permissions, broken link): skip, as a user would
        if not data:
            continue
        if is_binary(data):
            binary.append(p)
            continue
        rel = p.relative_to(root).as_posix()
        source = rel.split("/")[0] if "/" in rel else "<top>"
        docs.append(Document(rel, source, data))
        total += len(data)
    if binary and not docs:
        raise DataError(f"data.corpus {corpus!r}: {str(binary[0])!r} is a binary file, not "
                        "text (a NUL byte in its first 8 KB); give text files")
    if binary:
        warnings.warn(IslandsWarning(
            f"data.corpus {corpus!r}: skipped {len(binary)} binary file(s) (a NUL byte in the "
            f"first 8 KB), e.g. {str(binary[0])!r}"), stacklevel=2)
    if not docs:
        raise DataError(f"data.corpus {corpus!r} ({str(root)!r}) holds no non-empty text files")
    return sorted(docs, key=lambda d: d.path)


def split_train_val(docs: list[Document], val_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
    """Splits by a hash of the path. A single-file corpus is split inside the file (tail)."""
    if len(docs) == 1:
        d = docs[0]
        cut = int(len(d.data) * (1 - val_fraction))
        return ([Document(d.path, d.source, d.data[:cut])],
                [Document(d.path + "#val", d.source, d.data[cut:])])
    val = [d for d in docs if _hash01("val:" + d.path) < val_fraction]
    train = [d for d in docs if _hash01("val:" + d.path) >= val_fraction]
    if not val:
        val, train = train[-1:], train[:-1]
    if not train:
        raise DataError("the corpus is too small to hold out validation files; add files "
                        "or lower data.val_fraction")
    return train, val


def concat(docs: list[Document]) -> tuple[torch.Tensor, list[tuple[int, int, str]]]:
    """Joins documents into one uint8 stream; returns it and (start, end, source) per doc."""
    spans, pieces, pos = [], [], 0
    for d in docs:
        pieces.append(d.data)
        spans.append((pos, pos + len(d.data), d.source))
        pos += len(d.data)
    stream = torch.frombuffer(bytearray(b"".join(pieces)), dtype=torch.uint8)
    return stream, spans


def from_hf_dataset(name: str, out_dir: str | Path, *, split: str = "train",
                    column: str = "text", max_docs: int | None = None) -> Path:
    """Writes a Hugging Face ``datasets`` text column to a folder usable as ``data.corpus``.

    Needs the ``datasets`` package and network access (not available in every environment).
    """
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as e:  # pragma: no cover - optional
        raise DataError("from_hf_dataset needs `pip install datasets`") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = datasets.load_dataset(name, split=split)
    for i, row in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        (out / f"{i:08d}.txt").write_text(row[column])
    return out
