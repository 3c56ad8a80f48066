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

What the verifier can prove: in an open job the owner signs, with its aggregate, the Merkle
roots of the inputs it aggregated and the weights it gave the rule (``Message.sources``). When
the verifier's inputs are those (the same roots), the refusal carries a :class:`Mismatch`, and
:mod:`islands.runtime.evidence` shows the coordinator 16 KiB of the aggregate that the rule,
applied to the same 16 KiB of the inputs, does not give: the owner is excluded on its own
signed words, and a verifier that accuses an honest owner shows nothing that proves it (it is
the one excluded). That needs a rule whose every coordinate reads only its own
(:func:`~islands.aggregators.coordinatewise`: the mean, median and trimmed mean, without
clipping or the clone filter); with another rule the refusal stays the verifier's word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from islands.codecs.base import Codec
from islands.collectives.checks import decode_checked, received, refuse_non_finite
from islands.core import signing
from islands.core.errors import PeerRefused
from islands.transports.base import Exchange, Message, Transport


@dataclass(frozen=True)
class Mismatch:
    """What a verifier saw when an owner's aggregate differed from its recomputation: the
    owner's gathered shard (its message to the verifier), the inputs the verifier aggregated,
    in member order (its own phase-1 message among them), and where they differ. Attached to
    the refusal (``PeerRefused.exhibit``) for :func:`islands.runtime.evidence.gather`."""

    output: Message
    inputs: tuple[Message, ...]
    members: tuple[int, ...]
    leaves: tuple[int, ...]  # the 16 KiB leaves of the output that differ (the first 64)


def recompute(rule, stacked: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``rule``'s aggregate of ``stacked`` as a verifier computes it: without recording it or
    touching any state (a rule object's ``recompute``; a plain function has none to touch)."""
    again = getattr(rule, "recompute", None)
    return again(stacked, weights) if again is not None else rule(stacked, weights)


def verifiers_for(members: tuple[int, ...], offset: int) -> dict[int, int]:
    """``{owner: its verifier}``: the member ``offset`` places after each owner (``1 <=
    offset < len(members)``), so each member verifies one shard and none its own."""
    n = len(members)
    assert 1 <= offset < n, (offset, n)
    return {m: members[(k + offset) % n] for k, m in enumerate(members)}


def verify_shards(transport: Transport, members: tuple[int, ...], local: tuple[int, ...],
                  scattered: dict[tuple[int, int], Message],
                  gathered: dict[tuple[int, int], Message], out: dict[int, torch.Tensor],
                  owner: dict[int, tuple[int, int]], codecs: dict[int, Codec], rule_of,
                  weights, verifiers: dict[int, int], tag: str) -> None:
    """Re-sends each local member's phase-1 payloads to the shards' verifiers and checks the
    shards the local members verify.

    Args:
        scattered: ``{(sender, owner): message}`` of phase 1, for every local sender (its own
            shard too).
        gathered: ``{(owner, member): message}`` of the all-gather, for the local members.
        out: ``{local member: its result}``, the gathered shards in place.
        rule_of: ``member -> its rule`` (recomputed without recording or state).
        weights: ``rows -> (n,) weights or None`` for the verifier's messages.
        verifiers: ``{owner: verifier}`` (:func:`verifiers_for`).

    Raises:
        PeerRefused: naming an owner whose shard differs, with a :class:`Mismatch`.
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
        expected = recompute(rule_of(v), stacked, weights(msgs))
        got = out[v][a:b]
        expected = expected.to(got.dtype)
        if not torch.equal(expected, got):
            diff = float((expected - got).abs().max())
            at = (expected != got).nonzero().flatten() // (signing.LEAF_BYTES
                                                         // got.element_size())
            raise PeerRefused(f"{phase}: worker {j}'s aggregate of its shard differs from "
                              f"worker {v}'s recomputation from the same inputs (largest "
                              f"difference {diff:.3g}); refused", j,
                              Mismatch(gathered[(j, v)], tuple(msgs), members,
                                       tuple(torch.unique(at)[:64].tolist())))
