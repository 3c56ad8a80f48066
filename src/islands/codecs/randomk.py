"""Random-k sparsification with a shared seed (Stich et al. 2018, "Sparsified SGD with
Memory"; Konečný et al. 2016, "Federated Learning: Strategies for Improving Communication
Efficiency", random masks).

Sends ``k`` values at positions drawn without replacement from a seeded generator, and the
8-byte seed instead of the indices: the receiver redraws them. The seed is derived from the
codec's shared ``seed``, the stream's name without the worker prefix and the butterfly phase,
the slice's offset and length, and a per-stream call counter; so with a stable membership every
worker, and the aggregating worker's re-encode, keep the same positions in a round and the
aggregated shard passes the gather phase unchanged. Values are sent unscaled (a contraction, as
top-k): pair it with error feedback; ``E[x̂] = (k / numel) x``.

Wire size: ``8 + 4 k`` bytes (``k`` as in top-k).
Error bound: exact on the kept values, the others decode to 0: ``|x - x̂| <= |x|``.
"""

from __future__ import annotations

import torch

from islands.codecs.base import Codec, Encoded, as_float32
from islands.codecs.packing import (
    counters_from_state,
    counters_state,
    kept_count,
    stream_seed,
)
from islands.codecs.topk import check_sparsity, scatter, shown


def positions(seed: int, numel: int, k: int) -> torch.Tensor:
    """The ``k`` positions (sorted) drawn from ``seed`` among ``numel``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[:k].sort().values


class RandomK(Codec):
    """``k`` values at positions drawn from a seed that travels instead of the indices.

    Args:
        fraction: share of the values kept (per encoded tensor).
        count: number of values kept (instead of ``fraction``).
        seed: the seed every worker shares.
    """

    name = "randomk"
    sparse = True  # sends float32 "values" a value codec may re-encode (codecs.chain)

    def __init__(self, fraction: float | None = None, *, count: int | None = None,
                 seed: int = 0) -> None:
        check_sparsity(fraction, count)
        self.fraction = fraction
        self.count = count
        self.seed = seed
        self._calls: dict[tuple[str, int], int] = {}

    def kept(self, numel: int, offset: int = 0) -> int:
        """Values sent for a tensor of ``numel`` values (at any ``offset``)."""
        return kept_count(numel, self.fraction, self.count)

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        n = x.numel()
        calls = self._calls.get((key, offset), 0)
        self._calls[(key, offset)] = calls + 1
        seed = stream_seed(self.seed, key, offset, n, calls, shared=True)
        k = self.kept(n)
        values = x[positions(seed, n, k)]
        return Encoded({"seed": torch.tensor([seed], dtype=torch.int64), "values": values},
                       numel=n, dtype=dtype, meta={"k": k})

    def decode(self, e: Encoded) -> torch.Tensor:
        idx = positions(int(e.tensors["seed"][0]), e.numel, e.meta["k"])
        return scatter(e.numel, idx, e.tensors["values"], e.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        return 8 + 4 * self.kept(numel)

    def state_dict(self) -> dict[str, torch.Tensor]:
        # The call counters keep a resumed run on the positions an uninterrupted one draws.
        return counters_state(self._calls)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._calls = counters_from_state(state)

    def __repr__(self) -> str:
        return f"randomk({shown(self.fraction, self.count)})"
