"""Compiled CPU kernels for what torch has no fast operation for: the chunked top-k of
SparseLoCo's compressor (:mod:`islands.codecs.chunk_topk`), encoding and decoding.

``torch.topk`` over rows of 4096 values does more than the selection needs. :func:`chunk_top`
(compiled by Numba, ``numba.njit``, one chunk per iteration of a parallel loop over as many
threads as torch uses) finds a chunk's ``k`` largest ``|x|`` in three steps:

1. one read of the chunk: the largest ``|x|`` of each of ``2k`` blocks; the ``k``-th largest
   of these maxima, ``tau``, is at most the chunk's ``k``-th largest ``|x|`` (the maxima are
   ``k`` distinct values at least as large), so every kept value has ``|x| >= tau``;
2. the candidates, ``|x| >= tau``, read again (from cache) only in the blocks that reach
   ``tau``: about ``1.4 k`` for Gaussian values;
3. the ``k``-th largest candidate (Hoare's quickselect), then the candidates above it and
   the first of those equal to it.

The same read gives the kept values. A NaN's or Inf's magnitude bits are larger than any
finite value's, so a chunk holding one keeps it: the caller's finite check needs only the
kept values (:class:`~islands.codecs.chunk_topk.ChunkTopK`). The order is total and the same
on every machine: larger ``|x|`` first, and among equal magnitudes the lower offset, so a
chunk of ties (zeros, say) keeps its first ``k``. :func:`scatter` decodes: each chunk zeroed
and its kept values written, one pass.
Numba compiles on first use (about 3 s) and caches the machine code beside this file (or in
``NUMBA_CACHE_DIR``) for later processes.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import torch

_BITS = np.int32(0x7FFFFFFF)  # a float32's bits without its sign: ordered as |x| is


@numba.njit(cache=True, nogil=True)
def _select(a, n, kth):  # pragma: no cover - compiled; tested through chunk_top
    """The ``kth`` smallest of ``a[:n]`` (0-based), reordering ``a`` (Hoare's quickselect,
    the middle value as pivot)."""
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            return a[kth]
    return a[kth]


@numba.njit(parallel=True, cache=True, nogil=True)
def _chunk_top(bits, floats, chunk, k, out, kept):  # pragma: no cover - compiled
    n = bits.size
    chunks = (n + chunk - 1) // chunk
    size = max(1, chunk // (2 * k))  # values per block: 2k blocks in a full chunk
    for c in numba.prange(chunks):
        start = c * chunk
        m = min(chunk, n - start)
        kk = min(k, m)
        # 1. the blocks' largest |x| (as int32 bits); the kk-th largest of them is a lower
        #    bound of the chunk's kk-th largest (kk distinct values at least as large)
        blocks = (m + size - 1) // size
        maxima = np.empty(blocks, np.int32)
        for b in range(blocks):
            top = np.int32(0)
            for j in range(start + b * size, start + min(m, (b + 1) * size)):
                top = max(top, bits[j] & _BITS)
            maxima[b] = top
        tau = np.int32(0)
        if blocks >= kk:
            tau = _select(maxima.copy(), blocks, blocks - kk)
        # 2. the candidates, |x| >= tau (at least kk), in offset order: only blocks that
        #    reach tau hold any
        keys = np.empty(m, np.int32)
        where = np.empty(m, np.int32)
        found = 0
        for b in range(blocks):
            if maxima[b] >= tau:
                for j in range(b * size, min(m, (b + 1) * size)):
                    v = bits[start + j] & _BITS
                    if v >= tau:
                        keys[found] = v
                        where[found] = j
                        found += 1
        # 3. the kk-th largest candidate; keep those above it, and of those equal to it
        #    the first ones (the lower offsets), in offset order
        threshold = _select(keys[:found].copy(), found, found - kk)
        ties = kk
        for i in range(found):
            ties -= keys[i] > threshold
        o = c * k
        for i in range(found):
            v = keys[i]
            if v > threshold or (v == threshold and ties > 0):
                ties -= v == threshold
                out[o] = where[i]
                kept[o] = floats[start + where[i]]
                o += 1


@numba.njit(parallel=True, cache=True, nogil=True)
def _scatter(out, offsets, values, chunk, k):  # pragma: no cover - compiled
    n = out.size
    for c in numba.prange((n + chunk - 1) // chunk):
        start = c * chunk
        out[start:min(n, start + chunk)] = 0
        for i in range(c * k, min(offsets.size, (c + 1) * k)):
            out[start + offsets[i]] = values[i]


@contextlib.contextmanager
def _threads():
    """Runs a kernel on as many threads as torch uses (one per simulated worker's process,
    say). Numba's OpenMP threading layer may share torch's OpenMP runtime, where setting
    Numba's count sets torch's: torch's count is put back afterwards."""
    torch_threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def chunk_top(x: torch.Tensor, chunk: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``|x|`` of each chunk of a float32 CPU tensor, chunk after chunk,
    then the ``min(k, tail)`` largest of a shorter last chunk (ties: the lower offset):
    their offsets inside their chunk (int64, ascending) and their values."""
    x = x.contiguous()
    n = x.numel()
    full, tail = divmod(n, chunk)
    out = torch.empty(full * k + min(k, tail), dtype=torch.int64)
    kept = torch.empty(out.numel(), dtype=torch.float32)
    if n:
        with _threads():
            _chunk_top(x.view(torch.int32).numpy(), x.numpy(), chunk, k, out.numpy(),
                       kept.numpy())
    return out, kept


def scatter(out: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, chunk: int,
            k: int) -> None:
    """Writes :func:`chunk_top`'s ``values`` at their ``offsets`` into the float32 CPU
    tensor ``out`` (contiguous, its chunks as encoded) and zeros everywhere else: one
    pass over ``out``."""
    with _threads():
        _scatter(out.numpy(), offsets.numpy(), values.numpy(), chunk, k)
