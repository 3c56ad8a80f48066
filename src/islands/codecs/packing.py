"""Vectorized building blocks shared by the quantizing and sparsifying codecs.

Blockwise scales (a flat tensor cut into blocks of ``block`` values, the last one possibly
shorter), nibble packing (two 4-bit codes per byte) and bit packing (``bits`` bits per
integer, little-endian within a byte). Everything is a torch op over the whole flat buffer:
no Python loop over blocks or elements.

Cost note: on CPU, allocating a large tensor touches fresh pages, which can cost as much as the
arithmetic; the helpers below allocate each output once and work on views.
"""

from __future__ import annotations

import math
import re

import torch

from islands.core.seeding import derive_seed

# Blocks whose absmax is below this floor use it as their absmax: keeps 1/scale finite for
# denormal and all-zero blocks (the error bound then reads max(absmax, SCALE_FLOOR) / levels).
SCALE_FLOOR = 1e-30

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def num_blocks(numel: int, block: int) -> int:
    """Blocks (hence scales) needed for ``numel`` values: ``ceil(numel / block)``."""
    return -(-numel // block)


def split_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views a 1-D tensor as full blocks ``(numel // block, block)`` and a shorter tail."""
    main = (x.numel() // block) * block
    return x[:main].view(-1, block), x[main:]


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block max |x| of a 1-D float32 tensor, floored at :data:`SCALE_FLOOR`.

    Returns:
        ``(num_blocks(numel, block),)`` float32.
    """
    rows, tail = split_blocks(x, block)
    # amax and amin read x without materializing |x| (an extra 4 bytes per value).
    peaks = [torch.maximum(rows.amax(1), rows.amin(1).neg())] if rows.numel() else []
    if tail.numel():
        peaks.append(tail.abs().amax().reshape(1))
    if not peaks:
        return torch.empty(0, device=x.device)
    return torch.cat(peaks).clamp_min_(SCALE_FLOOR)


def block_scales(absmax: torch.Tensor, levels: float) -> torch.Tensor:
    """``absmax / levels``, nudged down where ``levels * scale`` would exceed ``absmax``.

    The nudge guarantees that decoded values never exceed the block's absmax, so values near
    the top of the fp32 range decode finite.
    """
    scales = absmax / levels
    over = scales * levels > absmax
    return torch.where(over, torch.nextafter(scales, torch.zeros_like(scales)), scales)


def scale_blocks(x: torch.Tensor, factors: torch.Tensor, block: int,
                 dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Returns ``x * factors`` with one factor per block of ``x`` (1-D), as ``dtype``, written
    into ``out`` (1-D, ``x.numel()`` values) when given."""
    if not x.is_floating_point():
        # Integer codes: a vectorized convert then an in-place multiply is about twice as fast
        # as one mixed-dtype multiply, with the same result (the codes convert exactly).
        out = x.to(dtype) if out is None else out.copy_(x)
        out_rows, out_tail = split_blocks(out, block)
        if out_rows.numel():
            out_rows.mul_(factors[:out_rows.shape[0], None])
        if out_tail.numel():
            out_tail.mul_(factors[-1])
        return out
    if out is None:
        out = torch.empty(x.numel(), dtype=dtype, device=x.device)
    rows, tail = split_blocks(x, block)
    out_rows, out_tail = split_blocks(out, block)
    if rows.numel():
        torch.mul(rows, factors[:rows.shape[0], None], out=out_rows)
    if tail.numel():
        torch.mul(tail, factors[-1], out=out_tail)
    return out


def round_(y: torch.Tensor, generator: torch.Generator | None, levels: int) -> torch.Tensor:
    """Rounds ``y`` (within ``[-levels, levels]`` up to float error) in place: to nearest, or
    stochastically (``floor(y + u)``, ``u ~ U[0, 1)``, then clamped to ``±levels``)."""
    if generator is None:
        return y.round_()
    y.add_(torch.rand(y.shape, generator=generator).to(y.device)).floor_()
    return y.clamp_(-levels, levels)


def counters_state(calls: dict[tuple[str, int], int]) -> dict[str, torch.Tensor]:
    """Per-(stream, offset) call counters as a state dict (``calls/<key>@<offset>``)."""
    return {f"calls/{k}@{o}": torch.tensor(n) for (k, o), n in sorted(calls.items())}


def counters_from_state(state: dict[str, torch.Tensor]) -> dict[tuple[str, int], int]:
    """Inverse of :func:`counters_state`."""
    calls = {}
    for name, n in state.items():
        key, _, off = name.removeprefix("calls/").rpartition("@")
        calls[(key, int(off))] = int(n)
    return calls


class Rounding:
    """Round-to-nearest, or stochastic rounding with a deterministic stream of random draws.

    Args:
        stochastic: draw ``u ~ U[0, 1)`` per value and round ``floor(y + u)`` (unbiased).
        seed: with the key, offset and a per-(key, offset) call counter, seeds the draws, so
            a simulation reproduces bit for bit.
    """

    def __init__(self, stochastic: bool, seed: int) -> None:
        self.stochastic = stochastic
        self.seed = seed
        self._calls: dict[tuple[str, int], int] = {}

    def __call__(self, y: torch.Tensor, levels: int, key: str, offset: int) -> torch.Tensor:
        """Rounds ``y`` in place to integers in ``[-levels, levels]``."""
        return round_(y, self.generator(key, offset, y.numel()), levels)

    def generator(self, key: str, offset: int, numel: int) -> torch.Generator | None:
        """The draws for one encode of ``numel`` values (None: round to nearest). A caller
        rounding in pieces passes each piece, in order, to :func:`round_` with it."""
        if not self.stochastic:
            return None
        n = self._calls.get((key, offset), 0)
        self._calls[(key, offset)] = n + 1
        return torch.Generator().manual_seed(
            stream_seed(self.seed, key, offset, numel, n, shared=False))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The call counters, so a resumed run draws what an uninterrupted one would."""
        return counters_state(self._calls)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._calls = counters_from_state(state)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Packs 4-bit codes (uint8 in [0, 16)) two per byte, the first in the low nibble.

    Returns:
        ``(ceil(n / 2),)`` uint8.
    """
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``(numel,)`` uint8 codes in [0, 16)."""
    pairs = torch.stack([packed & 15, packed >> 4], dim=1)
    return pairs.view(-1)[:numel]


def _word(bits: int) -> int | None:
    """Values per machine word for ``bits``-bit values: the fewest whose bits fill whole bytes
    (``lcm(bits, 8) / bits``: 2 for 12 bits), when they fit 56 bits; None otherwise."""
    values = 8 // math.gcd(bits, 8)
    return values if values * bits <= 56 else None


# values from which a CPU tensor is coded by the compiled kernels (below: tensor operations,
# which cost no compilation and little time)
COMPILED_FROM = 4096


def compiled(t: torch.Tensor) -> bool:
    """Whether ``t`` is coded by the compiled kernels (:mod:`islands.codecs.kernels`): a CPU
    tensor of at least :data:`COMPILED_FROM` values."""
    return t.device.type == "cpu" and t.numel() >= COMPILED_FROM


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs non-negative integers below ``2**bits`` into ``ceil(n * bits / 8)`` bytes: a
    little-endian bit stream, value after value."""
    if compiled(values) and bits <= 56:
        from islands.codecs import kernels
        return kernels.pack(values, bits)
    group = _word(bits)
    if bits == 1 or group is None:
        return _pack_bitwise(values, bits)
    # Whole words at once (two 12-bit offsets are three bytes): the same bytes as the bit
    # stream, about 8x faster than spreading every bit into a byte first.
    n = values.numel()
    v = values.reshape(-1).to(torch.int64)
    if n % group:
        v = torch.cat([v, v.new_zeros(group - n % group)])
    shifts = torch.arange(group, dtype=torch.int64, device=v.device) * bits
    words = (v.view(-1, group) << shifts).sum(1, keepdim=True)
    width = group * bits // 8
    byte_shifts = torch.arange(width, dtype=torch.int64, device=v.device) * 8
    return ((words >> byte_shifts) & 255).to(torch.uint8).view(-1)[:-(-n * bits // 8)]


def _pack_bitwise(values: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 1:
        flat = values.to(torch.uint8)
    else:
        shifts = torch.arange(bits, dtype=values.dtype, device=values.device)
        flat = ((values.reshape(-1, 1) >> shifts) & 1).to(torch.uint8).view(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(count,)`` int64."""
    # compiled from as many values made as pack_bits is from values given
    if packed.device.type == "cpu" and count >= COMPILED_FROM and bits <= 56:
        from islands.codecs import kernels
        return kernels.unpack(packed, bits, count)
    group = _word(bits)
    if bits == 1 or group is None:
        return _unpack_bitwise(packed, bits, count)
    width = group * bits // 8
    words = -(-count // group)
    raw = packed.reshape(-1)[:words * width].to(torch.int64)
    if raw.numel() < words * width:
        raw = torch.cat([raw, raw.new_zeros(words * width - raw.numel())])
    byte_shifts = torch.arange(width, dtype=torch.int64, device=raw.device) * 8
    w = (raw.view(words, width) << byte_shifts).sum(1, keepdim=True)
    shifts = torch.arange(group, dtype=torch.int64, device=raw.device) * bits
    return ((w >> shifts) & ((1 << bits) - 1)).view(-1)[:count]


def _unpack_bitwise(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    flat = ((packed.reshape(-1, 1) & _BIT_WEIGHTS.to(packed.device)) != 0).view(-1)[:count * bits]
    if bits == 1:
        return flat.to(torch.int64)
    weights = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(
        bits, device=packed.device)
    return (flat.view(count, bits).to(torch.int64) * weights).sum(1)


def index_bits(numel: int) -> int:
    """Bits needed for an index into ``numel`` values (at least 1)."""
    return max(1, (numel - 1).bit_length())


def kept_count(numel: int, fraction: float | None, count: int | None) -> int:
    """Values a sparsifier keeps of ``numel``: ``count``, or ``ceil(fraction * numel)``."""
    if numel == 0:
        return 0
    k = count if count is not None else math.ceil(fraction * numel)
    return max(1, min(numel, k))


_WORKER_PREFIX = re.compile(r"^w\d+/")
_PHASE_SUFFIX = re.compile(r"/(scatter|gather)$")


def stream_seed(seed: int, key: str, offset: int, numel: int, counter: int, *,
                shared: bool) -> int:
    """A deterministic 63-bit seed for one encode of one slice of a stream.

    With ``shared``, the worker prefix (``w3/``) and the butterfly phase (``/scatter``,
    ``/gather``) are dropped from ``key``, so with a stable membership every worker, and the
    aggregating worker's re-encode, draw the same random choices in a round (random-k). Without
    it each worker draws its own (stochastic rounding, whose errors should average out).
    """
    stream = _PHASE_SUFFIX.sub("", _WORKER_PREFIX.sub("", key)) if shared else key
    return derive_seed(seed, stream, offset, numel, counter)


def rice_parameter(mean_gap: float) -> int:
    """The Rice parameter for geometric-like gaps of mean ``mean_gap``: about
    ``log2(ln 2 · mean)`` (Golomb 1966; Gallager & van Voorhis 1975), at least 0."""
    return max(0, round(math.log2(max(1.0, mean_gap * math.log(2)))))


def rice_encode(values: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Golomb-Rice codes of non-negative integers, as two streams: each value's quotient
    ``v >> r`` in unary (that many 1 bits, then a 0), and its ``r`` low bits packed.

    Returns:
        ``(unary, low)`` uint8: ``ceil((Σ q + n) / 8)`` and ``ceil(n r / 8)`` bytes.
    """
    v = values.reshape(-1).to(torch.int64)
    q = v >> r
    ends = torch.cumsum(q + 1, 0) - 1  # where each value's terminating 0 goes
    bits = torch.ones(int(ends[-1]) + 1 if v.numel() else 0, dtype=torch.uint8,
                      device=v.device)
    bits[ends] = 0
    low = pack_bits(v & ((1 << r) - 1), r) if r else torch.empty(0, dtype=torch.uint8)
    return pack_bits(bits, 1), low


def rice_decode(unary: torch.Tensor, low: torch.Tensor, r: int, count: int) -> torch.Tensor:
    """Inverse of :func:`rice_encode`: ``(count,)`` int64."""
    if not count:
        return torch.empty(0, dtype=torch.int64)
    bits = unpack_bits(unary, 1, unary.numel() * 8)
    ends = (bits == 0).nonzero().reshape(-1)[:count]  # the padding's 0s come after the last
    if ends.numel() != count:
        raise ValueError(f"a Rice stream of {unary.numel()} bytes holds {ends.numel()} "
                         f"values, expected {count}")
    q = torch.diff(ends, prepend=ends.new_full((1,), -1)) - 1
    return (q << r) | (unpack_bits(low, r, count) if r else 0)
