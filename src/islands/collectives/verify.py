"""Verification of the butterfly's aggregators, after BTARD (Gorbunov et al. 2022, "Secure
Distributed Training at Scale"): in the butterfly each member aggregates one shard alone and
every other member uses its result, so a lying owner could move the global parameters at will.

In a verified sync every member also checks one shard it does not own: the member ``offset``
places after the owner in member order (``offset`` drawn from the run's seed, the round and
the stream, so every member draws the same; each member verifies exactly one shard). Every
other member sends the verifier its phase-1 payload for that shard again (the same bytes it
sent the owner: about one more reduce-scatter's upload, counted as the ``verify`` phase), the
verifier aggregates them with its own rule and compares with the shard the owner sent in the
gather phase, bit for bit. A difference is refused as a
:class:`~islands.core.errors.PeerRefused` naming the owner. The recomputation is exact only
for a lossless codec and a rule without state, which the config check asks for
(``aggregator.verify``).

What it does not cover yet: a verifier that accuses falsely is believed (the real runtime's
blame with evidence would have a second member recompute before anyone is excluded).
"""

from __future__ import annotations

import torch

from islands.codecs.base import Codec
from islands.collectives.checks import decode_checked, received, refuse_non_finite
from islands.core.errors import PeerRefused
from islands.transports.base import Exchange, Message, Transport


def verifiers_for(members: tuple[int, ...], offset: int) -> dict[int, int]:
    """``{owner: its verifier}``: the member ``offset`` places after each owner (``1 <=
    offset < len(members)``), so each member verifies one shard and none its own."""
    n = len(members)
    assert 1 <= offset < n, (offset, n)
    return {m: members[(k + offset) % n] for k, m in enumerate(members)}


def verify_shards(transport: Transport, members: tuple[int, ...], local: tuple[int, ...],
                  scattered: dict[tuple[int, int], Message], out: dict[int, torch.Tensor],
                  owner: dict[int, tuple[int, int]], codecs: dict[int, Codec], recompute,
                  weights, verifiers: dict[int, int], tag: str) -> None:
    """Re-sends each local member's phase-1 payloads to the shards' verifiers and checks the
    shards the local members verify.

    Args:
        scattered: ``{(sender, owner): message}`` of phase 1, for every local sender (its own
            shard too).
        out: ``{local member: its result}``, the gathered shards in place.
        recompute: ``recompute(member, stacked, weights) -> (numel,)``: the member's rule,
            without recording or state.
        weights: ``rows -> (n,) weights or None`` for the verifier's messages.
        verifiers: ``{owner: verifier}`` (:func:`verifiers_for`).
    """
    phase = f"{tag}/verify"
    outgoing = {(i, v): scattered[(i, j)] for i in local for j, v in verifiers.items()
                if i != v}
    pending = Exchange(transport.exchange(outgoing, members, phase))
    checked = {v: j for j, v in verifiers.items()}
    for v in local:
        j = checked[v]
        a, b = owner[j]
        msgs = [scattered[(v, j)] if i == v else received(pending, (i, v), phase)
                for i in members]
        stacked = torch.empty(len(members), b - a, dtype=out[v].dtype, device=out[v].device)
        for i, m, row in zip(members, msgs, stacked):
            decode_checked(codecs[v], m.payload, row, a, i, phase)
        refuse_non_finite(list(stacked), members, phase)
        expected = recompute(v, stacked, weights(msgs))
        got = out[v][a:b]
        if not torch.equal(expected.to(got.dtype), got):
            diff = float((expected.to(got.dtype) - got).abs().max())
            raise PeerRefused(f"{phase}: worker {j}'s aggregate of its shard differs from "
                              f"worker {v}'s recomputation from the same inputs (largest "
                              f"difference {diff:.3g}); refused", j)
