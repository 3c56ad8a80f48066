"""Partitioning a byte stream across workers, and deterministic batches.

The training stream is cut into chunks of ``chunk_bytes`` (each tagged with the source group
of the file it starts in). Partitioners deal chunks to workers:

- ``iid``: chunks shuffled by the seed and dealt round-robin;
- ``dirichlet``: label skew as in Hsu et al. 2019: for each source group, worker shares are
  drawn from Dirichlet(alpha); small ``alpha`` gives each worker few groups;
- ``by_source``: chunks kept in path order and cut into contiguous, byte-balanced runs, so each
  worker reads different files.

The batch a worker sees at an inner step depends only on (seed, worker, step): algorithms are
compared on identical data.
"""

from __future__ import annotations

import numpy as np
import torch

from islands.core.errors import DataError
from islands.core.seeding import derive_seed
from islands.data.corpus import TextDataConfig, concat, load_documents, split_train_val


def make_chunks(spans: list[tuple[int, int, str]], total: int, chunk_bytes: int, min_len: int
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cuts [0, total) into chunks; returns starts, lengths and each chunk's source."""
    starts = np.arange(0, total, chunk_bytes, dtype=np.int64)
    lengths = np.minimum(chunk_bytes, total - starts)
    doc_starts = np.array([s for s, _, _ in spans], dtype=np.int64)
    owner = np.searchsorted(doc_starts, starts, side="right") - 1
    sources = [spans[i][2] for i in owner]
    keep = lengths >= min_len
    return starts[keep], lengths[keep], [s for s, k in zip(sources, keep) if k]


def partition(n_chunks: int, sources: list[str], lengths: np.ndarray, workers: int,
              kind: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Returns, per worker, the indices of its chunks (sorted)."""
    rng = np.random.default_rng(derive_seed(seed, "partition", kind))
    if n_chunks < workers:
        raise DataError(f"the training data yields {n_chunks} chunks for {workers} workers; "
                        "use more data (a larger corpus, or a smaller data.chunk_bytes) or "
                        "fewer workers")
    if kind == "iid":
        order = rng.permutation(n_chunks)
        parts = [order[w::workers] for w in range(workers)]
    elif kind == "by_source":
        cum = np.cumsum(lengths)
        cuts = np.searchsorted(cum, cum[-1] * np.arange(1, workers) / workers)
        parts = np.split(np.arange(n_chunks), np.clip(cuts, 1, n_chunks - 1))
        parts = [p for p in parts]
    elif kind == "dirichlet":
        parts = _dirichlet(sources, workers, alpha, rng)
    else:
        raise DataError(f"data.partition ({kind!r}) must be 'iid', 'dirichlet' or 'by_source'")
    if any(len(p) == 0 for p in parts):
        parts = _fill_empty([list(p) for p in parts])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(sources: list[str], workers: int, alpha: float, rng: np.random.Generator
               ) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(workers)]
    labels = np.array(sources)
    for group in sorted(set(sources)):
        idx = rng.permutation(np.flatnonzero(labels == group))
        shares = rng.dirichlet(np.full(workers, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for w, piece in enumerate(np.split(idx, cuts)):
            parts[w].extend(piece.tolist())
    return parts


def _fill_empty(parts: list[list[int]]) -> list[list[int]]:
    """Gives every empty worker one chunk from the largest partition (a worker must train)."""
    for w, p in enumerate(parts):
        if not p:
            donor = max(range(len(parts)), key=lambda i: len(parts[i]))
            p.append(parts[donor].pop())
    return parts


class ByteData:
    """Train/validation bytes, partitioned across workers, with deterministic batches.

    Args:
        cfg: the ``[data]`` section.
        workers: number of workers to partition for.
        block_size: model context; each sample is ``block_size + 1`` bytes.
        seed: the run's seed.
    """

    def __init__(self, cfg: TextDataConfig, *, workers: int, block_size: int,
                 seed: int) -> None:
        self.cfg, self.block_size, self.seed = cfg, block_size, seed
        docs = load_documents(cfg.corpus, cfg.max_bytes)
        train_docs, val_docs = split_train_val(docs, cfg.val_fraction)
        self.train, spans = concat(train_docs)
        self.val, _ = concat(val_docs)
        if len(self.val) < block_size + 2:
            raise DataError(f"validation text ({len(self.val)} bytes) is shorter than "
                            f"model.block_size + 2; raise data.val_fraction or add text")
        self.starts, self.lengths, sources = make_chunks(
            spans, len(self.train), cfg.chunk_bytes, block_size + 1)
        self.parts = partition(len(self.starts), sources, self.lengths, workers,
                               cfg.partition, cfg.alpha, seed)
        self.train_bytes = len(self.train)
        self.val_bytes = len(self.val)

    def size(self, worker: int) -> int:
        """Bytes in a worker's partition (FedAvg's n_k)."""
        return int(self.lengths[self.parts[worker]].sum())

    @property
    def samples_per_step(self) -> int:
        """Samples in every batch: ``data.batch_size`` windows."""
        return self.cfg.batch_size

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        idx = starts[:, None] + torch.arange(self.block_size + 1)[None, :]
        batch = data[idx].long()  # (B, T+1)
        return batch[:, :-1], batch[:, 1:]

    def batch(self, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``worker`` at inner ``step``: (x, y), each (batch_size, block_size)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "batch", worker, step))
        mine = self.parts[worker]
        pick = torch.from_numpy(mine)[torch.randint(len(mine), (self.cfg.batch_size,),
                                                     generator=g)]
        room = torch.from_numpy(self.lengths)[pick] - self.block_size  # valid offsets
        offset = (torch.rand(self.cfg.batch_size, generator=g) * room).long()
        return self._windows(self.train, torch.from_numpy(self.starts)[pick] + offset)

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed validation batches (same for every algorithm and run with this seed)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "val"))
        n = self.cfg.eval_batches * self.cfg.batch_size
        starts = torch.randint(len(self.val) - self.block_size - 1, (n,), generator=g)
        x, y = self._windows(self.val, starts)
        return list(zip(x.split(self.cfg.batch_size), y.split(self.cfg.batch_size)))
