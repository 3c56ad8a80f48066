"""Error feedback (Seide et al. 2014, "1-Bit Stochastic Gradient Descent"; Karimireddy et al.
2019, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes"): a wrapper that
makes biased codecs (top-k, sign, low precision, PowerSGD) converge.

Per stream (the ``key``), the worker keeps the residual ``r`` over the stream's whole flat
vector, indexed by ``offset`` (it grows as needed; shard bounds may move when the membership
does). Encoding ``x`` at ``offset`` sends ``C(x + r)`` and keeps ``r = (x + r) - D(C(x + r))``,
so what was lost is sent later: after ``T`` rounds ``Σ decoded + r_T = Σ x`` (up to float32
rounding). The residuals are part of the worker's state (:meth:`state_dict`).

With a decay ``beta < 1`` (SparseLoCo's accumulator, Sarfi et al. 2025: ``e ← β·e + Δ``,
``c = C(e)``, ``e ← e − c``) the residual is multiplied by ``beta`` before ``x`` is added, so old
errors fade: ``Σ_t β^(T−t) (x_t − decoded_t) = r_T``. The accumulator then does the work of the
outer momentum, which SparseLoCo drops.

Wire size and error bound per message: the inner codec's. Decoding never uses the residual, so
any worker decodes any other's payload.
"""

from __future__ import annotations

import torch

from islands.codecs.base import Codec, Encoded, as_float32


class ErrorFeedback(Codec):
    """Keeps the inner codec's error per stream and adds it to the next tensor sent.

    Args:
        inner: the (usually biased) codec whose error is fed back.
        beta: the residual's decay per encode, in [0, 1] (1: plain error feedback).
    """

    def __init__(self, inner: Codec, *, beta: float = 1.0) -> None:
        if not 0 <= beta <= 1:
            raise ValueError(f"beta ({beta}) must be in [0, 1]")
        self.inner = inner
        self.beta = beta
        self.name = f"error_feedback({inner.name})"
        self.residuals: dict[str, torch.Tensor] = {}

    def _residual(self, key: str, end: int, device: torch.device) -> torch.Tensor:
        r = self.residuals.get(key)
        if r is None or r.numel() < end:
            grown = torch.zeros(end, device=device)
            if r is not None:
                grown[:r.numel()] = r
            r = self.residuals[key] = grown
        return r

    def _encode(self, x: torch.Tensor, key: str, offset: int) -> Encoded:
        n = x.numel()
        r = self._residual(key, offset + n, x.device)[offset:offset + n]
        if self.beta != 1:
            r.mul_(self.beta)
        sparse = self.inner.subtracts_sparse
        # sparse: r = x + r in its own memory (the payload keeps copies of the kept values),
        # then r -= decoded at the kept positions only, the same bits as the dense way in 2
        # passes over r instead of 4 and no fresh tensor of n values
        corrected = torch.add(as_float32(x), r, out=r if sparse else None)
        # The inner codec checks corrected for NaN/Inf too (a residual could overflow).
        e = self.inner.encode(corrected, key, offset)
        if sparse:
            self.inner.subtract_decoded(e, r)
        else:  # r = corrected - decoded, computed in r's own memory (no temporaries)
            torch.sub(corrected, self.inner.decode_into(e, r), out=r)
        e.dtype = x.dtype  # decode in the caller's dtype
        return e

    def decode(self, e: Encoded) -> torch.Tensor:
        return self.inner.decode(e)

    def decode_into(self, e: Encoded, out: torch.Tensor) -> torch.Tensor:
        return self.inner.decode_into(e, out)

    def wire_bytes(self, numel: int, offset: int = 0) -> int | None:
        return self.inner.wire_bytes(numel, offset)

    def bind_layout(self, shapes: list[torch.Size]) -> None:
        self.inner.bind_layout(shapes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"residual/{k}": r for k, r in sorted(self.residuals.items())}
        state.update({f"inner/{k}": v for k, v in self.inner.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residuals = {k.removeprefix("residual/"): v.clone() for k, v in state.items()
                          if k.startswith("residual/")}
        self.inner.load_state_dict({k.removeprefix("inner/"): v for k, v in state.items()
                                    if k.startswith("inner/")})

    def __repr__(self) -> str:
        beta = "" if self.beta == 1 else f", beta={self.beta}"
        return f"error_feedback({self.inner!r}{beta})"
