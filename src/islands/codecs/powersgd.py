"""PowerSGD low-rank compression (Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization"), per worker.

Each 2-D parameter (a tensor of more than two dimensions is seen as ``shape[0] × rest``) that
the encoded slice covers is sent as a rank-``r`` product ``P Qᵀ``: one power-iteration step
warm-started from the previous round's ``Q`` of the same stream and rows (``P = M Q``,
orthonormalize ``P``, ``Q = Mᵀ P``). Rows cut by the slice's ends, 1-D tensors, and matrices too
small to gain (``r (rows + cols) >= rows · cols``) are sent as float32. The layout comes from
:meth:`Codec.bind_layout` (the parameter shapes in flat order); without it every value is sent
as is.

Difference from the paper: the original all-reduces ``P`` and then ``Q`` across workers (two
linear all-reduces of the low-rank factors, so the average is exactly rank ``r``). Here each
worker sends its own ``P_i, Q_i`` through the butterfly, the aggregating worker averages the
decoded ``P_i Q_iᵀ`` and re-encodes the average at rank ``r`` for the gather phase. That fits
the one collective every codec uses, works with any aggregator, and leaves the error to error
feedback (``codec.error_feedback = true``, as the paper does).

Wire size: ``4 (raw + Σ r (rows + cols))`` bytes over the slice's segments.
Error bound: ``P Qᵀ = P Pᵀ M`` is the projection of ``M`` onto ``P``'s columns, so
``||M - M̂||_F <= ||M||_F``; raw segments are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from islands.codecs.base import Codec, Encoded, as_float32, given
from islands.core.registry import register
from islands.core.sections import CodecConfig, check

# A plan segment: ("raw", start, end) or ("low", start, rows, cols, rank, state_name), with
# offsets relative to the encoded slice.
Segment = tuple


class PowerSGD(Codec):
    """Rank-``r`` approximation of each 2-D parameter, with a warm-started ``Q`` per stream.

    Args:
        rank: rank of the approximation.
        seed: seeds the first ``Q`` of each matrix.
    """

    name = "powersgd"

    def __init__(self, rank: int = 4, *, seed: int = 0) -> None:
        if rank < 1:
            raise ValueError(f"rank ({rank}) must be >= 1")
        self.rank = rank
        self.seed = seed
        self.matrices: list[tuple[int, int, int]] = []  # (flat start, rows, cols)
        self.q: dict[str, torch.Tensor] = {}

    def bind_layout(self, shapes: list[torch.Size]) -> None:
        self.matrices, start = [], 0
        for shape in shapes:
            numel = math.prod(shape)
            if len(shape) >= 2:
                self.matrices.append((start, shape[0], numel // shape[0]))
            start += numel

    def plan(self, offset: int, numel: int) -> list[Segment]:
        """Splits the slice ``[offset, offset + numel)`` into raw and low-rank segments."""
        segments, pos, end = [], offset, offset + numel
        for m, (start, rows, cols) in enumerate(self.matrices):
            r0 = max(0, -(-(pos - start) // cols))
            r1 = min(rows, (end - start) // cols)
            rank = min(self.rank, r1 - r0, cols)
            if r1 <= r0 or rank * (r1 - r0 + cols) >= (r1 - r0) * cols:
                continue
            a = start + r0 * cols
            if a > pos:
                segments.append(("raw", pos - offset, a - offset))
            segments.append(("low", a - offset, r1 - r0, cols, rank, f"{m}:{r0}:{r1}"))
            pos = a + (r1 - r0) * cols
        if end > pos:
            segments.append(("raw", pos - offset, end - offset))
        return segments

    def _initial_q(self, name: str, cols: int, rank: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + sum(map(ord, name)))
        return torch.randn(cols, rank, generator=g)

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        dtype, x = x.dtype, as_float32(x)
        plan = self.plan(offset, x.numel())
        raw, ps, qs = [], [], []
        for seg in plan:
            if seg[0] == "raw":
                raw.append(x[seg[1]:seg[2]])
                continue
            _, a, rows, cols, rank, name = seg
            m = x[a:a + rows * cols].view(rows, cols)
            state = f"{key}@{name}"
            q = self.q.get(state)
            if q is None:
                q = self._initial_q(name, cols, rank).to(x.device)
            p = torch.linalg.qr(m @ q).Q  # (rows, rank), orthonormal columns
            q = m.T @ p  # (cols, rank)
            if bool(q.abs().sum() > 0):  # an all-zero M would freeze the warm start at 0
                self.q[state] = q
            ps.append(p.reshape(-1))
            qs.append(q.reshape(-1))
        none = torch.empty(0, device=x.device)
        tensors = {"raw": torch.cat(raw) if raw else none,
                   "p": torch.cat(ps) if ps else none,
                   "q": torch.cat(qs) if qs else none}
        return Encoded(tensors, numel=x.numel(), dtype=dtype, meta={"plan": plan})

    def decode(self, e: Encoded) -> torch.Tensor:
        out = torch.empty(e.numel)
        raw, p, q = e.tensors["raw"], e.tensors["p"], e.tensors["q"]
        at_raw = at_p = at_q = 0
        for seg in e.meta["plan"]:
            if seg[0] == "raw":
                n = seg[2] - seg[1]
                out[seg[1]:seg[2]] = raw[at_raw:at_raw + n]
                at_raw += n
                continue
            _, a, rows, cols, rank, _ = seg
            pm = p[at_p:at_p + rows * rank].view(rows, rank)
            qm = q[at_q:at_q + cols * rank].view(cols, rank)
            torch.mm(pm, qm.T, out=out[a:a + rows * cols].view(rows, cols))
            at_p, at_q = at_p + rows * rank, at_q + cols * rank
        return out if e.dtype == torch.float32 else out.to(e.dtype)

    def wire_bytes(self, numel: int, offset: int = 0) -> int:
        values = 0
        for seg in self.plan(offset, numel):
            values += seg[2] - seg[1] if seg[0] == "raw" else seg[4] * (seg[2] + seg[3])
        return 4 * values

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"q/{name}": q for name, q in sorted(self.q.items())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.q = {name.removeprefix("q/"): q.clone() for name, q in state.items()}

    def __repr__(self) -> str:
        return f"powersgd(rank={self.rank})"


@register("codec", "powersgd")
@dataclass(frozen=True, kw_only=True)
class PowerSGDConfig(CodecConfig):
    """``[codec] name = "powersgd"``.

    Attributes:
        rank: rank of the approximation (None: 4).
    """

    name: str = "powersgd"
    rank: int | None = None

    def __post_init__(self) -> None:
        check(self.rank is None or self.rank >= 1, "codec.rank", self.rank, "must be >= 1")

    def make(self) -> Codec:
        return PowerSGD(**given(rank=self.rank))
