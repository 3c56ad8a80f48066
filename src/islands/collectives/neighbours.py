"""Neighbour exchange: gossip over a topology, no global collective.

Each member ``i`` sends its tensor, encoded once by its own codec, to the members that put
weight on it, receives the tensors of the members it puts weight on, and ends with its row of
the mixing matrix applied: ``x_i ← Σ_j W_ij x_j`` (decentralized SGD's averaging step, Lian et
al. 2017). ``steps`` > 1 repeats the exchange on the mixed values (several gossip steps per
round, DFedSAM-MGS): the result is row ``i`` of ``W^steps`` applied, at ``steps`` times the
bytes.

Bytes, per member and step: its encoded payload (plus a header of
:data:`~islands.collectives.butterfly.MESSAGE_HEADER_BYTES`) once per receiver; nothing to or
from anyone else. A member's own term uses its exact tensor (never decoded from its payload:
only what crosses the wire loses precision). Sums run in ascending member order, so a member's
result is the same in the simulator and over real processes. Every received payload is checked
as the butterfly's are (:mod:`.checks`): a malformed or non-finite one is refused naming its
sender. A neighbour a row names that is not in the group (it left after the round's graph
was drawn) or that the transport cannot reach (a cut link) is left out, its weight kept by
the member (``W_ii += W_ij``).

**Variance-corrected averaging** (``segments``; Tian et al. 2024, "Vanishing Variance Problem
in Fully Decentralized Neural-Network Systems"): averaging models that do not agree shrinks
each weight tensor's spread below what the models had. With ``segments`` (the lengths of the
tensors the flat vector joins), each tensor of the mixed result is rescaled about its mean so
that its standard deviation is the row's weighted mean of the mixed tensors' standard
deviations (a tensor whose result has none is left as it is).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from islands.codecs.base import Codec
from islands.collectives.butterfly import MESSAGE_HEADER_BYTES, Group, Work
from islands.collectives.checks import decode_checked, received, refuse_non_finite
from islands.transports.base import Exchange, Message


def start_neighbours(group: Group, contributions: dict[int, torch.Tensor], *,
                     codecs: dict[int, Codec], rows: dict[int, dict[int, float]],
                     send_to: dict[int, tuple[int, ...]], steps: int = 1,
                     tag: str = "neighbours", segments: tuple[int, ...] = ()) -> Work:
    """Mixes each local member's tensor with its neighbours' (``steps`` gossip steps).

    Args:
        group: the members (the local ones contribute; the others are peers of the wire).
        contributions: {local member: 1-D tensor}, all of the same length.
        codecs: {local member: its codec} (encodes what it sends, decodes what it receives).
        rows: {local member i: {member j: W_ij}} (``j = i`` included; the row sums to 1).
        send_to: {local member i: the members whose rows name i} (its receivers).
        steps: gossip steps (each one exchange on the values the last one mixed).
        tag: names the stream (keys codec state such as error-feedback residuals).
        segments: correct each tensor's variance after every step (see the module).

    Returns:
        A handle whose :meth:`~Work.wait` gives {local member: mixed tensor (fp32)}.
    """
    assert set(contributions) == set(group.local), (sorted(contributions), group.local)
    assert steps >= 1, steps
    here = group.members
    reach = group.transport.reachable
    rows = {i: _within(i, row, lambda j: j in here and reach(i, j)) for i, row in rows.items()}
    send_to = {i: tuple(j for j in to if j in here and reach(i, j))
               for i, to in send_to.items()}
    values = {i: x.float() for i, x in contributions.items()}
    for s in range(steps):
        values = _step(group, values, codecs, rows, send_to, f"{tag}/{s}" if s else tag,
                       segments)
    return Work(values)


def _within(i: int, row: dict[int, float], present: Callable[[int], bool]
            ) -> dict[int, float]:
    """Row ``i`` without the neighbours that are not ``present``: gone since the round's
    graph was drawn (a crash before the sync, a straggler left out, a banned sender) or
    behind a cut link (a partition). Their weight stays with ``i``, so a symmetric matrix
    stays doubly stochastic."""
    if all(present(j) for j in row if j != i):
        return row
    kept = {j: w for j, w in row.items() if j == i or present(j)}
    kept[i] = kept.get(i, 0.0) + sum(w for j, w in row.items() if j not in kept)
    return kept


def _step(group: Group, values: dict[int, torch.Tensor], codecs: dict[int, Codec],
          rows: dict[int, dict[int, float]], send_to: dict[int, tuple[int, ...]],
          tag: str, segments: tuple[int, ...]) -> dict[int, torch.Tensor]:
    outgoing: dict[tuple[int, int], Message] = {}
    for i, x in values.items():
        to = [j for j in send_to[i] if j != i]
        if to:
            msg = Message(codecs[i].encode(x, key=f"w{i}/{tag}"), MESSAGE_HEADER_BYTES)
            outgoing.update({(i, j): msg for j in to})
    peers = set(group.local)
    for i in group.local:
        peers.update(rows[i], send_to[i])
    members = tuple(m for m in group.members if m in peers)
    with group.transport.pairwise():  # each waits for its own neighbours only
        pending = Exchange(group.transport.exchange(outgoing, members, phase=tag))
    index = Segments(segments) if segments else None
    return {i: _mixed(pending, values, codecs[i], rows[i], i, tag, index)
            for i in group.local}


def _mixed(pending: Exchange, values: dict[int, torch.Tensor], codec: Codec,
           row: dict[int, float], me: int, tag: str, segments: Segments | None
           ) -> torch.Tensor:
    """``Σ_j row[j] x_j`` in ascending ``j``; ``x_me`` exact, the others decoded and checked;
    with ``segments``, each tensor's spread restored (see the module)."""
    own = values[me]
    out = torch.zeros_like(own)
    spread = None if segments is None else torch.zeros_like(segments.counts)
    for j in sorted(row):
        if j == me:
            x = own
        else:
            x = torch.empty_like(own)
            decode_checked(codec, received(pending, (j, me), tag).payload, x, 0, j, tag)
            refuse_non_finite([x], (j,), tag)
        out.add_(x, alpha=float(row[j]))
        if segments is not None:
            spread.add_(segments.stats(x)[1], alpha=float(row[j]))
    if segments is not None:
        mean, sd = segments.stats(out)
        scale = torch.where((sd > 0) & (spread > 0), spread / sd, torch.ones_like(sd))
        at = segments.ids
        out.copy_((out.double() - mean[at]) * scale[at] + mean[at])
    return out


class Segments:
    """The tensors a flat vector joins (their lengths), for per-tensor statistics computed in
    one pass over the vector (no loop over tensors)."""

    def __init__(self, lengths: tuple[int, ...]) -> None:
        self.counts = torch.tensor(lengths, dtype=torch.float64)
        self.ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each tensor's mean and (population) standard deviation, fp64."""
        x = x.double()
        mean = torch.zeros_like(self.counts).index_add_(0, self.ids, x) / self.counts
        var = torch.zeros_like(self.counts).index_add_(0, self.ids, (x - mean[self.ids]) ** 2)
        return mean, (var / self.counts).sqrt()
