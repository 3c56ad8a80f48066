"""Top-k sparsification (Aji & Heafield 2017, "Sparse Communication for Distributed Gradient
Descent"; with error feedback, Stich et al. 2018, "Sparsified SGD with Memory").

Sends the ``k`` values of largest magnitude of each encoded tensor and their indices. ``k`` is
``count``, or ``ceil(fraction * numel)`` (at least 1, at most ``numel``); in the butterfly both
apply per shard. Indices are sorted and bit-packed at ``b = max(1, ceil(log2 numel))`` bits
each, values stay float32.

Wire size: ``4 k + ceil(k b / 8)`` bytes.
Error bound: exact on the kept values, the others decode to 0, each at most the k-th largest
magnitude; ``||x - x̂||² <= (1 - k / numel) ||x||²``. Biased: pair it with error feedback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from islands.codecs.base import Codec, Encoded, as_float32
from islands.codecs.packing import index_bits, kept_count, pack_bits, unpack_bits
from islands.core.errors import ConfigError
from islands.core.registry import register
from islands.core.sections import CodecConfig, check

# the share topk and randomk keep when neither fraction nor count is set
DEFAULT_FRACTION = 0.01


def check_sparsity(fraction: float | None, count: int | None, *,
                   share: str = "fraction") -> None:
    """Exactly one of ``fraction`` (in (0, 1]; named ``share`` in errors) and ``count`` (>= 1)
    must be given."""
    if (fraction is None) == (count is None):
        raise ValueError(f"give exactly one of {share} ({fraction}) and count ({count})")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"{share} ({fraction}) must be in (0, 1]")
    if count is not None and count < 1:
        raise ValueError(f"count ({count}) must be >= 1")


def share(value: float | None, count: int | None, default: float) -> tuple[float | None,
                                                                         int | None]:
    """A sparsifier's ``(share, count)`` from a config: ``count`` if set, else the share, else
    ``default``."""
    if count is not None:
        return None, count
    return (value if value is not None else default), None


def sparse_bytes(kept: int, bits: int) -> int:
    """Wire bytes of ``kept`` float32 values and their ``bits``-bit packed indices."""
    return 4 * kept + -(-kept * bits // 8)


def shown(value: float | None, count: int | None) -> str:
    """How a sparsifier's repr names what it keeps: ``0.01`` or ``count=5``."""
    return f"count={count}" if count is not None else str(value)


def scatter(numel: int, indices: torch.Tensor, values: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """A dense ``(numel,)`` tensor of zeros holding ``values`` at ``indices``."""
    out = torch.zeros(numel, dtype=torch.float32)
    out[indices] = values
    return out if dtype == torch.float32 else out.to(dtype)


class TopK(Codec):
    """The ``k`` largest-magnitude values, with bit-packed indices.

    Args:
        fraction: share of the values kept (per encoded tensor).
        count: number of values kept (instead of ``fraction``).
    """

    name = "topk"
    sparse = True  # sends float32 "values" a value codec may re-encode (codecs.chain)

    def __init__(self, fraction: float | None = None, *, count: int | None = None) -> None:
        check_sparsity(fraction, count)
        self.fraction = fraction
        self.count = count

    def kept(self, numel: int, offset: int = 0) -> int:
        """Values sent for a tensor of ``numel`` values (at any ``offset``)."""
        return kept_count(numel, self.fraction, self.count)

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        n = x.numel()
        k = self.kept(n)
        idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
        return Encoded({"values": x[idx], "indices": pack_bits(idx, index_bits(n))},
                       numel=n, dtype=dtype, meta={"k": k})

    def decode(self, e: Encoded) -> torch.Tensor:
        k = e.meta["k"]
        idx = unpack_bits(e.tensors["indices"], index_bits(e.numel), k)
        return scatter(e.numel, idx, e.tensors["values"], e.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return sparse_bytes(self.kept(numel), index_bits(numel))

    def __repr__(self) -> str:
        return f"topk({shown(self.fraction, self.count)})"


@register("codec", "randomk")
@register("codec", "topk")
@dataclass(frozen=True, kw_only=True)
class SparseConfig(CodecConfig):
    """``[codec] name = "topk"`` or ``"randomk"`` (:mod:`islands.codecs.randomk`):
    ``fraction`` or ``count``, not both.

    Attributes:
        fraction: share of the values kept (None: 0.01, unless ``count`` is given).
        count: number of values kept, instead of ``fraction``.
    """

    name: str = "topk"
    fraction: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        check_sparsity_config(self.fraction, self.count)

    def make(self) -> Codec:
        from islands.codecs.randomk import RandomK  # (randomk builds on this module)

        cls = TopK if self.name == "topk" else RandomK
        fraction, count = share(self.fraction, self.count, DEFAULT_FRACTION)
        return cls(fraction, count=count)


def check_sparsity_config(fraction: float | None, count: int | None, *,
                          share: str = "fraction") -> None:
    """``[codec]`` ``fraction`` (named ``share``) and ``count``: each in range, not both."""
    check(fraction is None or 0 < fraction <= 1, f"codec.{share}", fraction, "must be in (0, 1]")
    check(count is None or count >= 1, "codec.count", count, "must be >= 1")
    if fraction is not None and count is not None:
        raise ConfigError(f"codec.{share} ({fraction}) and codec.count ({count}) are "
                          "exclusive; set one of them")
