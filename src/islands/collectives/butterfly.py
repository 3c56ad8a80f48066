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

Every received payload is checked before it is aggregated or used (:mod:`.checks`): its
length must be the shard's, its dtype a float, its wire size the codec's (when the codec knows
it), it must decode, and what it decodes to must be finite; otherwise
:class:`~islands.core.errors.PeerRefused` (a ``CommError``) names the sender, in either
transport, and the round aborts instead of crashing an honest worker. The finiteness check
of the mean is the re-encode's own (a NaN or Inf in any row reaches the mean; only then are
the rows searched for the sender); each gathered shard is read once (once per process in the
simulator, where one message reaches every worker); a worker's own payloads are not checked
again (its encoder refuses NaN/Inf).

Cost (what the data path avoids, measured by ``benchmarks/collective.py``): a lossless codec's
payload is the tensor itself (no copy on encode), the real transport sends it from that memory
and receives the gathered shards straight into the result; the mean of up to
:data:`~islands.aggregators.mean.MAX_STREAMED_ROWS` rows is computed from the rows where they
lie, written into the owner's slice of its result (no stack; bit-identical to
:func:`~islands.aggregators.mean`); larger groups and other aggregators decode into a stack,
and the real transport receives lossless rows straight into it. Over the real transport the
rows are received into buffers kept from round to round (:meth:`Transport.scratch`), and the
mean and the checks of a lossless payload run on each chunk as soon as it has arrived, while
the next chunks are on the wire.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator, Mapping

import torch

from islands.aggregators import Rule, mean
from islands.aggregators.mean import mean_of_rows, streams
from islands.codecs.base import Codec, Encoded, all_finite
from islands.codecs.cast import Identity
from islands.collectives.checks import (
    decode_checked,
    non_finite,
    received,
    refuse_non_finite,
    view_checked,
)
from islands.collectives.verify import verify_shards
from islands.core import memory
from islands.core.errors import CodecError, CommError, PeerGaveUp, PeerRefused
from islands.core.shards import shard_bounds
from islands.core.timing import timed
from islands.transports.base import Exchange, Message, Sources, Transport

MESSAGE_HEADER_BYTES = 16
# Values per step of the work done while the rest of a payload is on the wire: 4 MiB of fp32.
STEP = 1 << 20

Aggregator = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# one rule for every member, or each member's own (a stateful rule: CenteredClip's center)
Aggregators = Aggregator | Mapping[int, Aggregator]


def rule_of(aggregator: Aggregators, member: int) -> Aggregator:
    """The rule ``member`` aggregates with."""
    return aggregator[member] if isinstance(aggregator, Mapping) else aggregator


def aggregate(rule: Aggregator, stacked: torch.Tensor, weights: torch.Tensor | None,
              key: tuple) -> torch.Tensor:
    """``rule(stacked, weights)``; a rule with state per shard (:class:`~islands.aggregators.
    Rule`) is told which shard: ``key = (tag, offset, numel)``."""
    if isinstance(rule, Rule):
        return rule(stacked, weights, key=key)
    return rule(stacked, weights)


def header_weights(msgs: list[Message], members: tuple[int, ...],
                   weights: dict[int, float], what: str) -> torch.Tensor:
    """The aggregation weights of ``members``' messages: the round's own where this process
    knows them (``weights``: every member's in the simulator, the local worker's in the
    runtime), checked against the sender's header (a forged weight is refused, naming the
    sender); the header's otherwise."""
    out = []
    for s, m in zip(members, msgs):
        if s in weights and not same_weight(m.weight, weights[s]):
            raise PeerRefused(f"{what}: worker {s} claims aggregation weight {m.weight:g}, "
                              f"the round gives it {float(weights[s]):g}; refused", s)
        out.append(float(weights[s]) if s in weights else m.weight)
    return torch.tensor(out, dtype=torch.float64)


class Work:
    """A collective in flight: :meth:`wait` returns ``{local worker: result}``.

    Collectives complete when issued for now; the handle is where overlapped algorithms will
    wait later.
    """

    def __init__(self, result: dict[int, torch.Tensor]) -> None:
        self._result = result

    def wait(self) -> dict[int, torch.Tensor]:
        return self._result


@contextlib.contextmanager
def _finished(pending: Exchange) -> Iterator[None]:
    """Runs the block, then waits for the whole exchange. If the block raised: after a refusal
    or any error off the wire, the exchange is still completed (no transfer left behind, the
    peers not kept waiting) and the block's error reported; after a failure of the wire
    itself (a timeout, an abort), what is still in flight is abandoned at once."""
    try:
        yield
    except CommError as e:
        if isinstance(e, PeerRefused):
            with contextlib.suppress(CommError):
                pending.wait()
        else:
            pending.abandon()
        raise
    except BaseException:
        with contextlib.suppress(CommError):
            pending.wait()
        raise
    pending.wait()


@contextlib.contextmanager
def _relaying(relay, me: int) -> Iterator[None]:
    """Runs the block that computes the shard a relay sends (None: no relay), then sends the
    relay's verdict: nobody blamed, or, if the block refused a row, its sender (this worker
    for its own contribution or an aggregate it cannot encode), so the peers end the attempt
    now (:func:`_verdict`); the relay is then completed before the error goes on (transfers
    left pending on gloo's pairs would stall the next collective). After a failure of the
    wire itself the relay is abandoned."""
    if relay is None:
        yield
        return

    def void(blame: int) -> None:
        relay.finish(blame)
        with contextlib.suppress(CommError):
            relay.wait()

    try:
        yield
    except PeerRefused as e:
        void(e.sender)
        raise
    except CommError:
        relay.abandon()
        raise
    except BaseException:
        void(me)
        raise
    relay.finish()


def _verdict(relay, sender: int, what: str) -> None:
    """Raises :class:`PeerGaveUp` if ``sender``'s relayed shard ended with a verdict against
    a worker (``sender`` itself for its own contribution or an aggregate it cannot encode)."""
    if (who := relay.blame(sender)) is not None:
        whose = "its own values" if who == sender else f"worker {who}'s payload"
        raise PeerGaveUp(f"{what}: worker {sender} gave up its shard: it refused {whose}",
                         sender)


def same_weight(claimed: float, recorded: float) -> bool:
    """Whether a header's weight is the round's: compared as the f32 the header carries
    (``MESSAGE_HEADER_BYTES``)."""
    return _f32(claimed) == _f32(recorded)


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def _claim(weights: dict[int, float] | None, claims: dict[int, float] | None,
           sender: int) -> float:
    """The weight ``sender``'s headers carry."""
    if claims is not None and sender in claims:
        return float(claims[sender])
    return 1.0 if weights is None else float(weights[sender])


def _arrived(pending: Exchange, key: tuple[int, int], payload: Encoded) -> None:
    for name, t in payload.tensors.items():
        pending.wait_for(key, name, t.numel() * t.element_size())


def _result_buffers(out: dict[int, torch.Tensor], contributions: dict[int, torch.Tensor]
                    ) -> dict[int, torch.Tensor]:
    """``out`` checked against the contributions (:meth:`Group.start_all_reduce`)."""
    if set(out) != set(contributions):
        raise ValueError(f"out has buffers for workers {sorted(out)}; give one for each local "
                         f"contributor {sorted(contributions)}")
    for k, t in out.items():
        x = contributions[k]
        if (t.dim() != 1 or t.numel() != x.numel() or t.dtype != x.dtype
                or t.device != x.device or not t.is_contiguous()):
            layout = "" if t.is_contiguous() else "non-contiguous "
            raise ValueError(f"out[{k}] is a {layout}{t.dtype} tensor of shape "
                             f"{tuple(t.shape)} on {t.device}; it must be contiguous, 1-D, "
                             f"{x.numel()} values of {x.dtype} on {x.device}, as the "
                             "contribution")
        if t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError(f"out[{k}] shares the contribution's memory; give a buffer of "
                             "its own (the contribution is still read while the result is "
                             "written)")
    if len({t.untyped_storage().data_ptr() for t in out.values()}) < len(out):
        raise ValueError("out gives two workers the same buffer; give each one of its own")
    return dict(out)


def _steps(n: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + STEP)) for a in range(0, n, STEP)]


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
                   aggregator: Aggregators = mean, weights: dict[int, float] | None = None,
                   tag: str = "all-reduce", native: bool = False,
                   out: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """:meth:`start_all_reduce`, waited on."""
        return self.start_all_reduce(contributions, codecs=codecs, aggregator=aggregator,
                                     weights=weights, tag=tag, native=native, out=out).wait()

    def start_all_reduce(self, contributions: dict[int, torch.Tensor], *,
                         codecs: dict[int, Codec], aggregator: Aggregators = mean,
                         weights: dict[int, float] | None = None, tag: str = "all-reduce",
                         native: bool = False, claims: dict[int, float] | None = None,
                         verifiers: dict[int, int] | None = None,
                         out: dict[int, torch.Tensor] | None = None) -> Work:
        """Reduces one flat tensor per member; the handle gives each local member's result.

        Args:
            contributions: {local worker: 1-D tensor}, all of the same length.
            codecs: {local worker: its codec}.
            aggregator: applied to each shard's stacked decoded contributions (one rule, or
                {member: its rule}: the shard's owner applies its own).
            weights: {worker: weight} for weighted aggregation: the round's weights (sent in
                the header; a received header that differs from a weight given here is
                refused, :func:`header_weights`).
            claims: {local worker: the weight its headers say}, where not its ``weights``
                (an attacker's forged weight).
            verifiers: {owner: the member that recomputes its shard} (None: no
                verification; :mod:`islands.collectives.verify`).
            tag: names the stream (no round number: codec state carries across rounds).
            native: a trusted job (``runtime.trust = "cluster"``): where the codec is
                lossless, the rule the plain mean and the transport has a collective of its
                own, that collective computes it, in place (the contribution is overwritten:
                the engine's are fresh tensors). Otherwise the butterfly.
            out: {local worker: a contiguous 1-D buffer of the contribution's length, dtype
                and device} the result is written into (None: new tensors); checked before
                anything is sent (``ValueError`` naming the buffer). The native collective
                leaves it unwritten: its result is the contribution itself.
        """
        assert set(contributions) == set(self.local), (sorted(contributions), self.local)
        if out is not None:
            out = _result_buffers(out, contributions)
        plain = all(rule_of(aggregator, j) is mean for j in self.local)
        if native and weights is None and plain and len(self.local) == 1 and all(
                type(c) is Identity for c in codecs.values()):
            (me, x), = contributions.items()
            reduced = self.transport.all_reduce_mean(x, self.members, f"{tag}/all-reduce")
            if reduced is not None:
                return Work({me: reduced})
        x0 = next(iter(contributions.values()))
        numel, dtype, device = x0.numel(), x0.dtype, x0.device
        owner = dict(zip(self.members, shard_bounds(numel, len(self.members))))
        sw = self.transport.stopwatch
        # Allocated first: the mean is written into the owner's own slice, and the real
        # transport receives lossless gathered shards straight into theirs.
        if out is None:
            out = {k: memory.empty(numel, dtype, device) for k in self.local}

        stream = plain and streams(len(self.members), dtype)
        # A lossless shard's streamed mean can go to the peers step by step as it is
        # computed (the all-gather overlapping the reduce-scatter, as a ring's phases do),
        # over a transport that can relay: offered in the rows' headers, used if all offer.
        relaying = (stream and verifiers is None and len(self.local) == 1
                    and all(type(c) is Identity for c in codecs.values())
                    and self.transport.relays(device))

        # Phase 1: member i sends shard j to member j; its own shard is encoded while the
        # others travel.
        def scattered(i: int, j: int) -> Message:
            a, b = owner[j]
            with timed(sw, "encode"):
                payload = codecs[i].encode(contributions[i][a:b], key=f"w{i}/{tag}/scatter",
                                           offset=a)
            return Message(payload, MESSAGE_HEADER_BYTES, weight=_claim(weights, claims, i),
                           claim=True, relay=relaying)

        scatter = f"{tag}/reduce-scatter"
        with self._or_give_up(scatter):  # a NaN contribution: the peers hear it at once
            outgoing = {(i, j): scattered(i, j) for i in self.local for j in self.members
                        if i != j}
        sent = dict(outgoing)  # a verified sync sends them again
        rank = {m: r for r, m in enumerate(self.members)}

        def row_place(src, dst):  # the kept buffer of a streamed row, or its row of the stack
            n = owner[dst][1] - owner[dst][0]
            if stream:
                return self.transport.scratch(("row", tag, src), (n,), dtype, device)
            return self._stack(tag, n, dtype, device)[rank[src]]

        pending = self.transport.start_exchange(
            outgoing, self.members, scatter, check_finite=False,
            place=self._place(codecs, f"{tag}/scatter", row_place))
        gather = f"{tag}/all-gather"
        relay = self._relay(pending, relaying, codecs, owner, out, gather)

        # Aggregate each local shard in member order; re-encode for the gather.
        outgoing = {}
        with (self._or_give_up(gather) if relay is None else contextlib.nullcontext()), \
                _finished(pending), _relaying(relay, self.local[0]):
            for i in self.local:
                pending.messages[(i, i)] = sent[(i, i)] = scattered(i, i)
            for j in self.local:
                a, b = owner[j]
                msgs = [received(pending, (i, j), scatter) for i in self.members]
                wts = None if weights is None else header_weights(msgs, self.members,
                                                                  weights, scatter)
                reduced, rows, finite = self._reduce(pending, j, codecs[j],
                                                     rule_of(aggregator, j), wts, stream,
                                                     out[j][a:b], a, tag,
                                                     None if relay is None else relay.release)
                with timed(sw, "encode"):
                    payload = self._encode_reduced(codecs[j], reduced, rows, finite,
                                                   f"w{j}/{tag}/gather", a, scatter)
                # relayed from there as it was computed (lossless rows always stream)
                assert relay is None or reduced.data_ptr() == out[j][a:b].data_ptr()
                # a verified sync's owner vouches for its inputs (signed with the aggregate)
                src = None if verifiers is None else Sources(
                    self.members, tuple(msgs), None if wts is None else tuple(wts.tolist()))
                for k in self.members:
                    outgoing[(j, k)] = Message(payload, MESSAGE_HEADER_BYTES, sources=src)

        if relay is not None:  # already on the wire
            with _finished(relay):
                self._gather_relayed(relay, codecs, owner, out, gather)
            return Work(out)
        pending = self.transport.start_exchange(
            outgoing, self.members, gather, check_finite=False,
            place=self._place(codecs, f"{tag}/gather",
                              lambda src, dst: out[dst][slice(*owner[src])]))
        with _finished(pending):
            self._gather(pending, codecs, owner, out, gather)
        if verifiers is not None:
            verify_shards(self.transport, self.members, self.local, sent, pending.messages,
                          out, owner, codecs, lambda v: rule_of(aggregator, v),
                          lambda msgs: None if weights is None else header_weights(
                              msgs, self.members, weights, f"{tag}/verify"),
                          verifiers, tag)
        return Work(out)

    def gather_rows(self, contributions: dict[int, torch.Tensor], *, codecs: dict[int, Codec],
                    weights: dict[int, float] | None = None, tag: str = "all-gather",
                    claims: dict[int, float] | None = None
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """An all-gather: every member's whole tensor, encoded once by its own codec, to
        every other member, for contributions a reduced shard must not be re-encoded from
        (sparse ones) and for rules over whole vectors (Krum). Each member decodes every
        payload, its own included, so all hold the same rows bit for bit.

        Args:
            contributions: {local worker: 1-D tensor}, all of the same length.
            codecs: {local worker: its codec}.
            weights, claims: as the all-reduce's (:meth:`start_all_reduce`).
            tag: names the stream (keys codec state such as error-feedback residuals).

        Returns:
            {local worker: (rows (members, numel) in member order, weights (members,) or
            None)}. Bytes: each member sends its payload (plus a header) to the ``n - 1``
            others and receives theirs: the download grows with the members.
        """
        assert set(contributions) == set(self.local), (sorted(contributions), self.local)
        sent: dict[int, Message] = {}
        with self._or_give_up(tag):
            for i in self.local:
                sent[i] = Message(codecs[i].encode(contributions[i], key=f"w{i}/{tag}"),
                                  MESSAGE_HEADER_BYTES, weight=_claim(weights, claims, i),
                                  claim=True)
        outgoing = {(i, j): sent[i] for i in self.local for j in self.members if j != i}
        incoming = self.transport.exchange(outgoing, self.members, phase=tag)
        x0 = next(iter(contributions.values()))
        pending = Exchange(incoming)
        out = {}
        for d in self.local:
            msgs = [sent[d] if s == d else received(pending, (s, d), tag)
                    for s in self.members]
            rows = torch.empty(len(msgs), x0.numel(), dtype=x0.dtype)
            for s, m, row in zip(self.members, msgs, rows):
                decode_checked(codecs[d], m.payload, row, 0, s, tag)
            refuse_non_finite(list(rows), self.members, tag)
            wts = None if weights is None else header_weights(msgs, self.members, weights, tag)
            out[d] = (rows, wts)
        return out

    def start_all_gather(self, contributions: dict[int, torch.Tensor], *,
                         codecs: dict[int, Codec], aggregator: Aggregators = mean,
                         weights: dict[int, float] | None = None, tag: str = "all-gather",
                         claims: dict[int, float] | None = None) -> Work:
        """:meth:`gather_rows`, then each local member's rule over the whole rows: the
        handle gives each local member's result (the same on every member)."""
        gathered = self.gather_rows(contributions, codecs=codecs, weights=weights, tag=tag,
                                    claims=claims)
        return Work({d: aggregate(rule_of(aggregator, d), rows, wts, (tag, 0, rows.shape[1]))
                     for d, (rows, wts) in gathered.items()})

    @contextlib.contextmanager
    def _or_give_up(self, phase: str) -> Iterator[None]:
        """Runs the block that prepares this worker's messages of ``phase``; if it refuses
        them (its own contribution, or a peer's it aggregates: NaN, undecodable), the other
        members are told at once (:meth:`Transport.give_up`) rather than left waiting for
        them, and the refusal goes on to the caller."""
        try:
            yield
        except (CodecError, PeerRefused) as e:
            self.transport.give_up(self.members, phase, str(e))
            raise

    def _relay(self, pending: Exchange, relaying: bool, codecs: dict[int, Codec],
               owner: dict[int, tuple[int, int]], out: dict[int, torch.Tensor], gather: str):
        """The all-gather started before the reduce (the transport's relay: each step of the
        local shard's mean goes to every peer as soon as it is computed), where this member
        offered it (``relaying``) and every peer's row offered it too; None otherwise (the
        all-gather follows the reduce, as every member then decides alike)."""
        me = self.local[0]
        if not relaying or not all(
                (m := pending.messages.get((p, me))) is not None and m.relay
                for p in self.members if p != me):
            return None
        def shard(m: int) -> Message:  # m's aggregated shard, where it lies in the result
            payload = codecs[me].encode(out[me][slice(*owner[m])], finite=True)  # not yet
            return Message(payload, MESSAGE_HEADER_BYTES)

        return self.transport.start_relay(self.members, gather, shard(me),
                                          {p: shard(p) for p in self.members if p != me})

    def _gather_relayed(self, relay: Exchange, codecs: dict[int, Codec],
                        owner: dict[int, tuple[int, int]], out: dict[int, torch.Tensor],
                        what: str) -> None:
        """:meth:`_gather` over the relay's messages (each peer's shard received in place,
        checked step by step as it arrives), and each peer's verdict read before its shard
        is trusted. A peer that refused one of its rows sent void values: the attempt is
        void, without blame on it (:func:`_verdict`; it blames the row's sender itself);
        non-finite values without such a verdict are its own."""
        try:
            self._gather(relay, codecs, owner, out, what)
        except PeerRefused as e:
            _verdict(relay, e.sender, what)
            raise
        for j in self.members:
            if j not in self.local:
                _verdict(relay, j, what)

    def _place(self, codecs: dict[int, Codec], tag: str, where):
        """Where the real transport receives a payload tensor for a local worker: the raw
        (lossless) values where ``where(src, dst)`` says they belong, any other tensor into a
        buffer kept from round to round (decoded before the call returns)."""
        def place(src, dst, name, dtype, shape):
            if name == codecs[dst].raw_tensor:
                return where(src, dst)
            return self.transport.scratch(("in", tag, src, name), shape, dtype, "cpu")

        return place

    def _stack(self, tag: str, n: int, dtype: torch.dtype, device: torch.device
               ) -> torch.Tensor:
        """The ``(members, n)`` stack of a shard's rows, kept from round to round (the real
        transport receives lossless rows straight into it). Aggregators return new tensors,
        so the next shard may reuse it."""
        return self.transport.scratch(("stack", tag), (len(self.members), n), dtype, device)

    def _reduce(self, pending: Exchange, j: int, codec: Codec, aggregator: Aggregator,
                weights: torch.Tensor | None, stream: bool, into: torch.Tensor, a: int,
                tag: str, release: Callable[[int], None] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor], bool]:
        """Member ``j``'s shard (``into``, its slice of its result, starting at ``a``): the
        aggregate of the rows in member order, the rows, and whether the aggregate was found
        finite already; refusals name the sender.

        The streamed mean of a lossless codec's rows reads them where they lie, each step as
        soon as it has arrived, and writes into ``into``; otherwise the rows are decoded into
        a stack (where the real transport received lossless rows already) and the aggregator
        returns a new tensor. Rows from other workers (in the simulator too, where one may
        play a Byzantine worker) are checked for NaN/Inf before a robust rule sees them; the
        mean needs no pass of its own: the streamed one is checked step by step while in
        cache, the stacked one by its re-encode (:meth:`_encode_reduced`). ``release``
        (a relay's) is told each streamed step's end, in bytes, once it is computed.
        """
        sw, n, what = self.transport.stopwatch, into.numel(), f"{tag}/reduce-scatter"
        keys = [(i, j) for i in self.members]
        payloads = [pending.messages[key].payload for key in keys]  # all there: see received
        with timed(sw, "decode"):
            views = [view_checked(codec, p, n, a, i, what)
                     for i, p in zip(self.members, payloads)]
        if stream and all(v is not None and v.device == into.device for v in views):
            finite = True
            for lo, hi in _steps(n):
                for key in keys:
                    pending.wait_for(key, codec.raw_tensor, hi * into.element_size())
                with timed(sw, "reduce"):
                    mean_of_rows([v[lo:hi] for v in views], weights, into[lo:hi])
                    finite = finite and all_finite(into[lo:hi])  # while it is in cache
                if release is not None:
                    release(hi * into.element_size())
            return into, views, finite
        stacked = self._stack(tag, n, into.dtype, into.device)
        for i, key, row, p in zip(self.members, keys, stacked, payloads):
            _arrived(pending, key, p)
            with timed(sw, "decode"):  # in place (nothing to do) if received there
                decode_checked(codec, p, row, a, i, what)
        rows = list(stacked)
        if len(rows) > 1 and aggregator is not mean:  # a robust rule might hide a NaN
            with timed(sw, "decode"):
                refuse_non_finite(rows, self.members, what)
        with timed(sw, "reduce"):
            return aggregate(aggregator, stacked, weights, (tag, a, n)), rows, False

    def _encode_reduced(self, codec: Codec, reduced: torch.Tensor, rows: list[torch.Tensor],
                        finite: bool, key: str, offset: int, what: str) -> Encoded:
        """Re-encodes an aggregate (``finite``: already checked); a NaN/Inf in it is refused
        naming the row's sender.

        Every encoder refuses NaN/Inf, in the pass it makes anyway (a separate read for a
        lossless codec, none for the quantizers), and a NaN or Inf in any row reaches the mean;
        so the rows are searched only when the encoder refuses. Finite rows whose mean
        overflows are the encoder's refusal, as they always were.
        """
        try:
            return codec.encode(reduced, key=key, offset=offset, finite=finite)
        except CodecError:
            if len(rows) > 1:
                refuse_non_finite(rows, self.members, what)
            raise

    def _gather(self, pending: Exchange, codecs: dict[int, Codec],
                owner: dict[int, tuple[int, int]], out: dict[int, torch.Tensor],
                what: str) -> None:
        """Decodes every aggregated shard into its place in each local result, checking what
        another worker sent for NaN/Inf (a lossless shard step by step, as it arrives)."""
        sw = self.transport.stopwatch
        done: dict[int, int] = {}  # id(payload) -> the local worker whose result holds it
        for k in self.local:
            for j in self.members:
                a, b = owner[j]
                payload, dest = received(pending, (j, k), what).payload, out[k][a:b]
                if id(payload) in done:  # one message to several local workers: decode once
                    with timed(sw, "decode"):
                        dest.copy_(out[done[id(payload)]][a:b])
                    continue
                done[id(payload)] = k
                with timed(sw, "decode"):
                    view = view_checked(codecs[k], payload, b - a, a, j, what)
                if view is not None and view.device == dest.device:
                    # Lossless: received in place (nothing to copy) or copied step by step,
                    # each step checked while in cache.
                    in_place = view.data_ptr() == dest.data_ptr()
                    for lo, hi in _steps(b - a) if j != k or not in_place else ():
                        pending.wait_for((j, k), codecs[k].raw_tensor, hi * dest.element_size())
                        with timed(sw, "decode"):
                            if not in_place:
                                dest[lo:hi].copy_(view[lo:hi])
                            if j != k and not all_finite(dest[lo:hi]):
                                raise non_finite(j, what)
                    continue
                _arrived(pending, (j, k), payload)
                with timed(sw, "decode"):
                    decode_checked(codecs[k], payload, dest, a, j, what)
                    if j != k and not all_finite(dest):
                        raise non_finite(j, what)

    def broadcast(self, src: int, tensor: torch.Tensor | None, codec: Codec,
                  dsts: tuple[int, ...], tag: str = "broadcast", *, echo: bool = False
                  ) -> dict[int, torch.Tensor]:
        """Sends ``tensor`` from ``src`` to each of ``dsts`` (state sync for stale workers; an
        asynchronous update, inside ``transport.posting()``, to every other member).

        Args:
            echo: ``src`` (if local) decodes the payload it sent as well, so every member
                applies the same values whatever the codec loses.

        Returns {local destination (and ``src`` with ``echo``): decoded tensor}.
        """
        outgoing, payload = {}, None
        if src in self.local:
            payload = codec.encode(tensor, key=f"w{src}/{tag}")
            outgoing = {(src, d): Message(payload, MESSAGE_HEADER_BYTES) for d in dsts}
        incoming = self.transport.exchange(outgoing, self.members, phase=tag)
        got = {d: codec.decode(incoming[(src, d)].payload) for d in dsts if d in self.local}
        if echo and payload is not None:
            got[src] = codec.decode(payload)
        return got

    def others(self, member: int) -> tuple[int, ...]:
        """The members but ``member``."""
        return tuple(m for m in self.members if m != member)
