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
shard's, its dtype a float, its wire size the codec's (when the codec knows it), it must
decode, and what it decodes to must be finite; otherwise
:class:`~islands.core.errors.PeerRefused` (a ``CommError``) names the sender, in either
transport, and the round aborts instead of crashing an honest worker. The finiteness check
reads the mean once instead of each row (a NaN or Inf in any row reaches the mean; only then
are the rows searched for the sender), and each gathered shard once (once per process in the
simulator, where one message reaches every worker); a worker's own payloads are not checked
again (its encoder refuses NaN/Inf).

Cost (what the data path avoids, measured by ``benchmarks/collective.py``): a lossless codec's
payload is the tensor itself (no copy on encode), the real transport sends it from that memory
and receives the gathered shards straight into the result; the mean of up to
:data:`~islands.aggregators.mean.MAX_STREAMED_ROWS` rows is computed from the rows where they
lie, written into the owner's slice of its result (no stack; bit-identical to
:func:`~islands.aggregators.mean`); larger groups and other aggregators decode into a stack,
and the real transport receives lossless rows straight into it.
"""

from __future__ import annotations

from typing import Callable

import torch

from islands.aggregators import mean
from islands.aggregators.mean import mean_of_rows, streams
from islands.codecs.base import Codec, Encoded, all_finite
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


def _check_payload(codec: Codec, payload: Encoded, n: int, offset: int, sender: int,
                   what: str) -> None:
    """Refuses a payload whose numel, dtype or wire size do not fit a shard of ``n`` values."""
    if payload.numel != n or not payload.dtype.is_floating_point:
        raise PeerRefused(f"{what}: payload from worker {sender} holds {payload.numel} values "
                          f"of {payload.dtype}, expected {n} floats; refused", sender)
    want = codec.wire_bytes(n, offset)
    if want is not None and payload.nbytes != want:
        raise PeerRefused(f"{what}: payload from worker {sender} is {payload.nbytes} bytes, "
                          f"its codec sends {want} for {n} values; refused", sender)


def _undecodable(e: Exception, sender: int, what: str) -> PeerRefused:
    return PeerRefused(f"{what}: payload from worker {sender} does not decode "
                       f"({type(e).__name__}: {str(e).splitlines()[0]}); refused", sender)


_DECODE_ERRORS = (RuntimeError, ValueError, KeyError, IndexError, TypeError)


def _decode_checked(codec: Codec, payload: Encoded, out: torch.Tensor, offset: int,
                    sender: int, what: str) -> None:
    """Decodes ``payload`` into ``out`` after checking it fits; refusals name ``sender``."""
    _check_payload(codec, payload, out.numel(), offset, sender, what)
    try:
        codec.decode_into(payload, out)
    except _DECODE_ERRORS as e:
        raise _undecodable(e, sender, what) from None


def _view_checked(codec: Codec, payload: Encoded, n: int, offset: int, sender: int,
                  what: str) -> torch.Tensor | None:
    """The payload's decoded values without a copy (lossless codecs), after the same checks
    as :func:`_decode_checked`; None when the codec must decode."""
    _check_payload(codec, payload, n, offset, sender, what)
    try:
        return codec.decoded_view(payload)
    except _DECODE_ERRORS as e:
        raise _undecodable(e, sender, what) from None


def _refuse_non_finite(rows: list[torch.Tensor], senders: tuple[int, ...], what: str) -> None:
    """Raises naming the first sender (in member order) whose row holds NaN/Inf, if any."""
    for i, row in zip(senders, rows):
        if not all_finite(row):
            raise PeerRefused(f"{what}: payload from worker {i} decodes to NaN/Inf; refused", i)


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
        x0 = next(iter(contributions.values()))
        numel, dtype, device = x0.numel(), x0.dtype, x0.device
        owner = dict(zip(self.members, shard_bounds(numel, len(self.members))))
        sw = self.transport.stopwatch
        # Allocated first: the mean is written into the owner's own slice, and the real
        # transport receives lossless gathered shards straight into theirs.
        out = {k: torch.empty(numel, dtype=dtype, device=device) for k in self.local}

        # Phase 1: member i sends shard j to member j.
        outgoing = {}
        for i, x in contributions.items():
            w = 1.0 if weights is None else float(weights[i])
            for j, (a, b) in owner.items():
                with timed(sw, "encode"):
                    payload = codecs[i].encode(x[a:b], key=f"w{i}/{tag}/scatter", offset=a)
                outgoing[(i, j)] = Message(payload, MESSAGE_HEADER_BYTES, weight=w)
        stream = aggregator is mean and streams(len(self.members), dtype)
        stacks = {} if stream else {j: torch.empty((len(self.members), b - a), dtype=dtype,
                                                   device=device)
                                    for j, (a, b) in owner.items() if j in self.local}
        rank = {m: r for r, m in enumerate(self.members)}

        def rows_place(src, dst, name, dt, shape):  # lossless rows straight into the stack
            return stacks[dst][rank[src]] if dst in stacks and name == codecs[dst].raw_tensor \
                else None

        incoming = self.transport.exchange(outgoing, self.members, f"{tag}/reduce-scatter",
                                           place=rows_place, check_finite=False)

        # Aggregate each local shard in member order; re-encode for the gather.
        outgoing = {}
        for j in self.local:
            a, b = owner[j]
            msgs = [incoming[(i, j)] for i in self.members]
            wts = None if weights is None else torch.tensor([m.weight for m in msgs],
                                                           dtype=torch.float64)
            reduced = self._reduce(msgs, codecs[j], aggregator, wts, stacks.get(j),
                                   out[j][a:b], a, f"{tag}/reduce-scatter")
            with timed(sw, "encode"):
                payload = codecs[j].encode(reduced, key=f"w{j}/{tag}/gather", offset=a)
            for k in self.members:
                outgoing[(j, k)] = Message(payload, MESSAGE_HEADER_BYTES)
        stacks.clear()  # the aggregates are computed: free the rows before the gather

        def out_place(src, dst, name, dt, shape):  # lossless shards straight into the result
            return out[dst][slice(*owner[src])] if name == codecs[dst].raw_tensor else None

        incoming = self.transport.exchange(outgoing, self.members, f"{tag}/all-gather",
                                           place=out_place, check_finite=False)
        self._gather(incoming, codecs, owner, out, f"{tag}/all-gather")
        return Work(out)

    def _reduce(self, msgs: list[Message], codec: Codec, aggregator: Aggregator,
                weights: torch.Tensor | None, stacked: torch.Tensor | None, into: torch.Tensor,
                a: int, what: str) -> torch.Tensor:
        """One shard (``into``, the owner's slice of its result, starting at ``a``): the
        aggregate of the rows in ``msgs`` (member order); refusals name the sender.

        Without a stack (``stacked`` None: the streamed mean), a lossless codec's rows are read
        where they lie and the mean is written into ``into``; otherwise the rows are decoded
        into a stack and the aggregator returns a new tensor.
        """
        sw, n = self.transport.stopwatch, into.numel()
        rows = None
        if stacked is None:
            with timed(sw, "decode"):
                views = [_view_checked(codec, m.payload, n, a, i, what)
                         for i, m in zip(self.members, msgs)]
            if all(v is not None for v in views):
                rows = views
            else:
                stacked = torch.empty((len(msgs), n), dtype=into.dtype, device=into.device)
        if rows is None:
            with timed(sw, "decode"):
                for i, row, m in zip(self.members, stacked, msgs):  # in place if received so
                    _decode_checked(codec, m.payload, row, a, i, what)
            rows = list(stacked)
        # Every row but the owner's own came from another worker (in the simulator too, where
        # one may be a Byzantine one): its values are checked before the result is used.
        foreign = len(msgs) > 1
        if foreign and aggregator is not mean:  # a robust rule might hide a NaN: check rows
            with timed(sw, "decode"):
                _refuse_non_finite(rows, self.members, what)
        with timed(sw, "reduce"):
            reduced = (mean_of_rows(rows, weights, into) if stacked is None
                       else aggregator(stacked, weights))
        if foreign and aggregator is mean:
            with timed(sw, "decode"):
                # Any NaN/Inf in a row reaches the mean; then the rows name the sender. Finite
                # rows whose mean overflows are refused by the re-encode, as before.
                if not all_finite(reduced):
                    _refuse_non_finite(rows, self.members, what)
        return reduced

    def _gather(self, incoming: dict[tuple[int, int], Message], codecs: dict[int, Codec],
                owner: dict[int, tuple[int, int]], out: dict[int, torch.Tensor],
                what: str) -> None:
        """Decodes every aggregated shard into its place in each local result."""
        sw = self.transport.stopwatch
        done: dict[int, int] = {}  # id(payload) -> the local worker whose result holds it
        for k in self.local:
            for j in self.members:
                a, b = owner[j]
                payload = incoming[(j, k)].payload
                with timed(sw, "decode"):
                    if id(payload) in done:  # one message to several local workers: decode once
                        out[k][a:b].copy_(out[done[id(payload)]][a:b])
                        continue
                    _decode_checked(codecs[k], payload, out[k][a:b], a, j, what)
                    if j != k and not all_finite(out[k][a:b]):
                        raise PeerRefused(f"{what}: payload from worker {j} decodes to NaN/Inf; "
                                          "refused", j)
                    done[id(payload)] = k

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
