"""Butterfly all-reduce: one collective for every codec and aggregator.

With ``n`` members the flat vector is cut into ``n`` shards (:func:`shard_bounds`; the first
``numel % n`` shards are one element longer). Phase 1 (reduce-scatter): member ``i`` sends
shard ``j``, encoded, to member ``j``. Member ``j`` decodes the ``n`` contributions to its
shard, aggregates them in member order, and re-encodes the result. Phase 2 (all-gather): every
member receives every aggregated shard. Each member sends and receives
``2 (n-1)/n · S_encoded`` bytes (as a ring all-reduce) in two latency steps instead of
``2 (n-1)``.

Every message carries a fixed header of :data:`MESSAGE_HEADER_BYTES` bytes, counted on the
wire: round tag (u64), shard index (u32), aggregation weight (f32). So, per member and
all-reduce, ``bytes_sent = Σ_{j≠i} enc(shard_j) + (n-1) · enc(agg_i) + 2 (n-1) · 16``.

Quantization error enters twice (once per phase); the aggregating member uses the decoded
re-encoded shard too, so every member ends with bit-identical results.

Every received payload is checked before it is aggregated or used: its length must be the
shard's, its dtype a float, its wire size the codec's (when the codec knows it) and it must
decode; otherwise :class:`~islands.core.errors.PeerRefused` (a ``CommError``) names the
sender, in either transport, and the round aborts instead of crashing an honest worker.
"""

from __future__ import annotations

from typing import Callable

import torch

from islands.aggregators import mean
from islands.codecs.base import Codec, Encoded
from islands.core.errors import PeerRefused
from islands.core.timing import timed
from islands.transports.base import Message, Transport

MESSAGE_HEADER_BYTES = 16

Aggregator = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def shard_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """Deterministic plan: ``n`` contiguous ``[start, end)`` shards covering ``numel``."""
    q, r = divmod(numel, n)
    bounds, start = [], 0
    for j in range(n):
        end = start + q + (1 if j < r else 0)
        bounds.append((start, end))
        start = end
    return bounds


class Work:
    """A collective in flight: :meth:`wait` returns ``{local worker: result}``.

    Collectives complete when issued for now; the handle is where overlapped algorithms will
    wait later.
    """

    def __init__(self, result: dict[int, torch.Tensor]) -> None:
        self._result = result

    def wait(self) -> dict[int, torch.Tensor]:
        return self._result


def _decode_checked(codec: Codec, payload: Encoded, out: torch.Tensor, offset: int,
                    sender: int, what: str) -> None:
    """Decodes ``payload`` into ``out`` after checking it fits; refusals name ``sender``."""
    n = out.numel()
    if payload.numel != n or not payload.dtype.is_floating_point:
        raise PeerRefused(f"{what}: payload from worker {sender} holds {payload.numel} values "
                          f"of {payload.dtype}, expected {n} floats; refused", sender)
    want = codec.wire_bytes(n, offset)
    if want is not None and payload.nbytes != want:
        raise PeerRefused(f"{what}: payload from worker {sender} is {payload.nbytes} bytes, "
                          f"its codec sends {want} for {n} values; refused", sender)
    try:
        codec.decode_into(payload, out)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        raise PeerRefused(f"{what}: payload from worker {sender} does not decode "
                          f"({type(e).__name__}: {str(e).splitlines()[0]}); refused",
                          sender) from None


class Group:
    """The workers in a collective, over a transport.

    Args:
        transport: moves the messages.
        members: worker ids taking part, in the order that fixes shards and reductions.
    """

    def __init__(self, transport: Transport, members: tuple[int, ...] | list[int]) -> None:
        members = tuple(sorted(members))
        if not members or len(set(members)) != len(members):
            raise ValueError(f"members ({members}) must be distinct worker ids, at least one")
        self.transport = transport
        self.members = members
        self.local = tuple(m for m in members if m in transport.local)

    def all_reduce(self, contributions: dict[int, torch.Tensor], *, codecs: dict[int, Codec],
                   aggregator: Aggregator = mean, weights: dict[int, float] | None = None,
                   tag: str = "all-reduce") -> dict[int, torch.Tensor]:
        """:meth:`start_all_reduce`, waited on."""
        return self.start_all_reduce(contributions, codecs=codecs, aggregator=aggregator,
                                     weights=weights, tag=tag).wait()

    def start_all_reduce(self, contributions: dict[int, torch.Tensor], *,
                         codecs: dict[int, Codec], aggregator: Aggregator = mean,
                         weights: dict[int, float] | None = None, tag: str = "all-reduce"
                         ) -> Work:
        """Reduces one flat tensor per member; the handle gives each local member's result.

        Args:
            contributions: {local worker: 1-D tensor}, all of the same length.
            codecs: {local worker: its codec}.
            aggregator: applied to each shard's stacked decoded contributions.
            weights: {worker: weight} for weighted aggregation (sent in the header).
            tag: names the stream (no round number: codec state carries across rounds).
        """
        assert set(contributions) == set(self.local), (sorted(contributions), self.local)
        numel = next(iter(contributions.values())).numel()
        device = next(iter(contributions.values())).device
        bounds = shard_bounds(numel, len(self.members))
        owner = dict(zip(self.members, bounds))

        sw = self.transport.stopwatch
        # Phase 1: member i sends shard j to member j.
        outgoing = {}
        for i, x in contributions.items():
            w = 1.0 if weights is None else float(weights[i])
            for j, (a, b) in owner.items():
                with timed(sw, "encode"):
                    payload = codecs[i].encode(x[a:b], key=f"w{i}/{tag}/scatter", offset=a)
                outgoing[(i, j)] = Message(payload, MESSAGE_HEADER_BYTES, weight=w)
        incoming = self.transport.exchange(outgoing, self.members, phase=f"{tag}/reduce-scatter")

        # Aggregate each local shard in member order; re-encode for the gather.
        outgoing = {}
        for j in self.local:
            a = owner[j][0]
            msgs = [incoming[(i, j)] for i in self.members]
            stacked = torch.empty((len(msgs), owner[j][1] - a), dtype=contributions[j].dtype,
                                  device=device)
            for i, row, m in zip(self.members, stacked, msgs):  # decode straight into rows
                with timed(sw, "decode"):
                    _decode_checked(codecs[j], m.payload, row, a, i, f"{tag}/reduce-scatter")
            wts = None if weights is None else torch.tensor([m.weight for m in msgs],
                                                           dtype=torch.float64)
            with timed(sw, "reduce"):
                reduced = aggregator(stacked, wts)
            with timed(sw, "encode"):
                payload = codecs[j].encode(reduced, key=f"w{j}/{tag}/gather", offset=a)
            for k in self.members:
                outgoing[(j, k)] = Message(payload, MESSAGE_HEADER_BYTES)
        incoming = self.transport.exchange(outgoing, self.members, phase=f"{tag}/all-gather")

        out = {}
        for k in self.local:
            out[k] = torch.empty(numel, dtype=contributions[k].dtype, device=device)
            for j in self.members:  # each owner's reduced shard, into its place
                a, b = owner[j]
                with timed(sw, "decode"):
                    _decode_checked(codecs[k], incoming[(j, k)].payload, out[k][a:b], a, j,
                                    f"{tag}/all-gather")
        return Work(out)

    def broadcast(self, src: int, tensor: torch.Tensor | None, codec: Codec,
                  dsts: tuple[int, ...], tag: str = "broadcast") -> dict[int, torch.Tensor]:
        """Sends ``tensor`` from ``src`` to each of ``dsts`` (state sync for stale workers).

        Returns {local destination: received tensor}.
        """
        outgoing = {}
        if src in self.local:
            payload = codec.encode(tensor, key=f"w{src}/{tag}")
            outgoing = {(src, d): Message(payload, MESSAGE_HEADER_BYTES) for d in dsts}
        incoming = self.transport.exchange(outgoing, self.members, phase=tag)
        return {d: codec.decode(incoming[(src, d)].payload) for d in dsts if d in self.local}
