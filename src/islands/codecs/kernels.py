"""Compiled CPU kernels for what torch has no fast operation for: the chunked top-k of
SparseLoCo's compressor (:mod:`islands.codecs.chunk_topk`), encoding and decoding, its value
stage (:func:`quant_codes`, :func:`dequant`) and the bit packing of every codec's codes
(:func:`pack`, :func:`unpack`): one pass each instead of a dozen tensor operations.

``torch.topk`` over rows of 4096 values does more than the selection needs. :func:`chunk_top`
(compiled by Numba, ``numba.njit``; the chunks split into as many contiguous runs as torch
uses threads, one per iteration of a parallel loop) finds a chunk's ``k`` largest ``|x|``
from the bits of ``|x|`` (a float32's bits without its sign are ordered as ``|x|`` is):

1. one read of the chunk, laid out as rows of ``2k`` columns: the largest ``|x|`` of every
   8 rows of each column (a sub-block) and of each whole column (a block), row after row, so
   that every step is the same operation on ``2k`` neighbouring values (vectorized). The
   ``k``-th largest of the blocks' maxima, ``tau``, is at most the chunk's ``k``-th largest
   ``|x|`` (the maxima are ``k`` distinct values at least as large), so every kept value has
   ``|x| >= tau``;
2. the candidates, ``|x| >= tau``, read again (from cache) only in the sub-blocks that reach
   ``tau``: about ``1.4 k`` values for Gaussian values, from about ``1.3 k`` sub-blocks;
3. the ``k``-th largest candidate, then the candidates above it and the first of those equal
   to it, marked in a bitmap of the chunk and read out in offset order.

Both ``k``-th largest values are found bit by bit from the top (the largest ``t`` with at
least ``k`` values ``>= t``: 31 counting passes over at most ``2k`` values, no branches to
mispredict). The same read gives the kept values. A NaN's or Inf's magnitude bits are larger
than any finite value's, so a chunk holding one keeps it: the caller's finite check needs only
the kept values (:class:`~islands.codecs.chunk_topk.ChunkTopK`). The order is total and the
same on every machine: larger ``|x|`` first, and among equal magnitudes the lower offset, so a
chunk of ties (zeros, say) keeps its first ``k``. :func:`scatter` decodes: each chunk zeroed
and its kept values written, one pass.
Numba compiles on first use (the top-k about 5 s, the others under 1 s each) and caches the
machine code beside this file (or in ``NUMBA_CACHE_DIR``) for later processes.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import torch

_BITS = np.int32(0x7FFFFFFF)  # a float32's bits without its sign: ordered as |x| is
_ROWS = 8  # rows of a sub-block (measured: 4 and 16 are slower)
# the index of a word's lowest set bit: a de Bruijn sequence's table (numba has no ctz)
_DEBRUIJN = np.uint64(0x022FDD63CC95386D)
_LOG2 = np.zeros(64, np.int64)
for _i in range(64):
    _LOG2[((1 << _i) * 0x022FDD63CC95386D % (1 << 64)) >> 58] = _i


@numba.njit(cache=True, nogil=True, inline="always")
def _kth_largest(a, n, kk):  # pragma: no cover - compiled; tested through chunk_top
    """The ``kk``-th largest of ``a[:n]`` (non-negative int32, ``1 <= kk <= n``): the largest
    ``t`` with at least ``kk`` values ``>= t``, built from the top bit down."""
    t = np.int32(0)
    for bit in range(30, -1, -1):
        cand = t | np.int32(1 << bit)
        count = 0
        for i in range(n):
            count += a[i] >= cand
        if count >= kk:
            t = cand
    return t


@numba.njit(cache=True, nogil=True, inline="always")
def _low_bit(word):  # pragma: no cover - compiled
    return word & (~word + np.uint64(1))


@numba.njit(parallel=True, cache=True, nogil=True)
def _chunk_top(bits, floats, chunk, k, out, kept, runs):  # pragma: no cover - compiled
    n = bits.size
    chunks = (n + chunk - 1) // chunk
    per = (chunks + runs - 1) // runs
    width = max(1, min(chunk, 2 * k))
    for g in numba.prange(runs):  # each run of chunks with its own scratch
        sub = np.empty(((chunk + width - 1) // width + _ROWS - 1) // _ROWS * width, np.int32)
        top = np.empty(width, np.int32)
        keys = np.empty(chunk, np.int32)
        where = np.empty(chunk, np.int32)
        above = np.empty((chunk + 63) // 64, np.uint64)
        equal = np.empty((chunk + 63) // 64, np.uint64)
        for c in range(g * per, min(chunks, (g + 1) * per)):
            start = c * chunk
            m = min(chunk, n - start)
            kk = min(k, m)
            # 1. column b holds offsets b, b + cols, b + 2 cols, ...: the maxima of every
            #    _ROWS rows of it (sub) and of all of it (top)
            cols = min(width, m)
            rows = (m + cols - 1) // cols
            groups = (rows + _ROWS - 1) // _ROWS
            top[:cols] = 0
            for q in range(groups):
                s = sub[q * cols:(q + 1) * cols]
                s[:] = 0
                for r in range(q * _ROWS, min(rows, (q + 1) * _ROWS)):
                    base = start + r * cols
                    row = bits[base:min(start + m, base + cols)]
                    for b in range(row.size):
                        v = row[b] & _BITS
                        s[b] = v if v > s[b] else s[b]
                for b in range(cols):
                    top[b] = s[b] if s[b] > top[b] else top[b]
            tau = np.int32(0)
            if cols >= kk:
                tau = _kth_largest(top, cols, kk)
            # 2. the candidates, |x| >= tau (at least kk): only sub-blocks reaching tau
            found = 0
            for q in range(groups):
                for b in range(cols):
                    if sub[q * cols + b] >= tau:
                        for r in range(q * _ROWS, min(rows, (q + 1) * _ROWS)):
                            j = r * cols + b
                            if j < m:
                                v = bits[start + j] & _BITS
                                if v >= tau:
                                    keys[found] = v
                                    where[found] = j
                                    found += 1
            # 3. the kk-th largest candidate: those above it, and of those equal to it the
            #    first (the lower offsets), marked and read out in offset order
            threshold = _kth_largest(keys, found, kk)
            words = (m + 63) // 64
            above[:words] = 0
            equal[:words] = 0
            need = kk
            for i in range(found):
                j = where[i]
                bit = np.uint64(1) << np.uint64(j & 63)
                if keys[i] > threshold:
                    above[j >> 6] |= bit
                    need -= 1
                elif keys[i] == threshold:
                    equal[j >> 6] |= bit
            for w in range(words):
                word = equal[w]
                while word != 0 and need > 0:
                    low = _low_bit(word)
                    above[w] |= low
                    word ^= low
                    need -= 1
            o = c * k
            for w in range(words):
                word = above[w]
                while word != 0:
                    low = _low_bit(word)
                    j = w * 64 + _LOG2[(low * _DEBRUIJN) >> np.uint64(58)]
                    out[o] = j
                    kept[o] = floats[start + j]
                    o += 1
                    word ^= low


@numba.njit(parallel=True, cache=True, nogil=True)
def _scatter(out, offsets, values, chunk, k, subtract):  # pragma: no cover - compiled
    n = out.size
    outside = 0  # offsets past their chunk's end: not touched (a peer's malformed payload)
    for c in numba.prange((n + chunk - 1) // chunk):
        start = c * chunk
        m = min(chunk, n - start)
        if not subtract:
            out[start:start + m] = 0
        for i in range(c * k, min(offsets.size, (c + 1) * k)):
            if not 0 <= offsets[i] < m:
                outside += 1
            elif subtract:
                out[start + offsets[i]] -= values[i]
            else:
                out[start + offsets[i]] = values[i]
    return outside


@numba.njit(cache=True, nogil=True)
def _pack(values, bits, out):  # pragma: no cover - compiled; tested through pack_bits
    acc, filled, o = np.uint64(0), 0, 0
    mask = np.uint64((1 << bits) - 1)
    for i in range(values.size):
        acc |= (np.uint64(values[i]) & mask) << np.uint64(filled)
        filled += bits
        while filled >= 8:
            out[o] = np.uint8(acc & np.uint64(255))
            o += 1
            acc >>= np.uint64(8)
            filled -= 8
    if filled > 0:
        out[o] = np.uint8(acc & np.uint64(255))


@numba.njit(cache=True, nogil=True)
def _unpack(packed, bits, out):  # pragma: no cover - compiled; tested through unpack_bits
    acc, filled, p = np.uint64(0), 0, 0
    mask = np.uint64((1 << bits) - 1)
    for i in range(out.size):
        while filled < bits:
            acc |= np.uint64(packed[p]) << np.uint64(filled)
            p += 1
            filled += 8
        out[i] = np.int64(acc & mask)
        acc >>= np.uint64(bits)
        filled -= bits


@numba.njit(cache=True, nogil=True)
def _quant(x, scales, block, bits, codes):  # pragma: no cover - compiled; tested via Quant
    levels = 1 << (bits - 1)
    top, sign = np.float32(levels - 1), 1 << (bits - 1)
    for start in range(0, x.size, block):
        lo, hi = scales[start // block, 0], scales[start // block, 1]
        width = (hi - lo) / np.float32(levels)
        for i in range(start, min(x.size, start + block)):
            b = (abs(x[i]) - lo) / width if width > 0 else np.float32(0)
            b = min(max(np.floor(b), np.float32(0)), top)
            codes[i] = int(b) | (sign if x[i] < 0 else 0)


@numba.njit(cache=True, nogil=True)
def _dequant(codes, scales, block, bits, out):  # pragma: no cover - compiled
    levels = 1 << (bits - 1)
    for start in range(0, out.size, block):
        lo, hi = scales[start // block, 0], scales[start // block, 1]
        width = (hi - lo) / np.float32(levels)
        for i in range(start, min(out.size, start + block)):
            c = codes[i]
            v = lo + (np.float32(c & (levels - 1)) + np.float32(0.5)) * width
            out[i] = -v if (c >> (bits - 1)) & 1 else v


def quant_codes(x: torch.Tensor, scales: torch.Tensor, block: int, bits: int) -> torch.Tensor:
    """:class:`~islands.codecs.quant.Quant`'s codes of a float32 CPU tensor (its sign and its
    magnitude's bin in its block's ``(lo, hi)``), the same as its tensor operations give."""
    codes = torch.empty(x.numel(), dtype=torch.int64)
    _quant(x.contiguous().numpy(), scales.contiguous().numpy(), block, bits, codes.numpy())
    return codes


def dequant(codes: torch.Tensor, scales: torch.Tensor, block: int, bits: int) -> torch.Tensor:
    """The inverse of :func:`quant_codes`: each code's bin centre with its sign (float32)."""
    out = torch.empty(codes.numel(), dtype=torch.float32)
    _dequant(codes.contiguous().numpy(), scales.contiguous().numpy(), block, bits, out.numpy())
    return out


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`islands.codecs.packing.pack_bits` for a CPU tensor and ``bits <= 56``: one
    pass, value after value into a little-endian bit stream."""
    out = torch.empty(-(-values.numel() * bits // 8), dtype=torch.uint8)
    _pack(values.reshape(-1).to(torch.int64).numpy(), bits, out.numpy())
    return out


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """:func:`islands.codecs.packing.unpack_bits` for a CPU tensor and ``bits <= 56``.

    Raises:
        ValueError: ``packed`` holds fewer than the ``ceil(count * bits / 8)`` bytes it reads.
    """
    if packed.numel() < -(-count * bits // 8):
        raise ValueError(f"{packed.numel()} bytes hold fewer than {count} values of {bits} bits")
    out = torch.empty(count, dtype=torch.int64)
    if count:
        _unpack(packed.reshape(-1).contiguous().numpy(), bits, out.numpy())
    return out


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
                       kept.numpy(), numba.get_num_threads())
    return out, kept


def scatter(out: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, chunk: int,
            k: int, *, subtract: bool = False) -> None:
    """Writes :func:`chunk_top`'s ``values`` at their ``offsets`` into the float32 CPU
    tensor ``out`` (contiguous, its chunks as encoded) and zeros everywhere else: one
    pass over ``out``. With ``subtract``, subtracts them there instead and leaves every other
    value as it is (error feedback's residual: nothing else is read or written).

    Raises:
        ValueError: ``offsets`` or ``values`` are not the chunks' count, or an offset lies
            past its chunk's end (a peer's malformed payload: nothing outside ``out`` is
            written, and the caller refuses it).
    """
    _check_kept(out, offsets, values, chunk, k)
    with _threads():
        outside = _scatter(out.numpy(), offsets.numpy(), values.numpy(), chunk, k, subtract)
    if outside:
        raise ValueError(f"{outside} offsets lie past their chunk's end")


def _check_kept(out: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, chunk: int,
                k: int) -> None:
    full, tail = divmod(out.numel(), chunk)
    want = full * k + min(k, tail)
    if offsets.numel() != want or values.numel() != want:
        raise ValueError(f"{offsets.numel()} offsets and {values.numel()} values for "
                         f"{out.numel()} values in chunks of {chunk} keeping {k}: {want} "
                         "of each expected")

