"""The real transport: one worker per process, messages over a ``torch.distributed`` group.

An ``exchange`` is a set of point-to-point transfers between the members taking part (gloo
over TCP on CPUs; NCCL groups are not used because payloads are byte buffers), in two rounds:
every member sends every other member a header (``null`` when it has nothing for it), then
the payload tensors move with ``send``/``recv``, each from and into its own memory
(:mod:`islands.transports.wire`: nothing is packed into a contiguous buffer, and a caller may
say where a received tensor goes). Only members of the exchange take part, so a sub-group (a
state transfer from one worker to a joiner) needs no collective over the whole process group.

A received message is checked before use (header fields and sizes consistent, dtypes allowed,
floating values finite unless the caller checks the decoded values itself) and refused with
:class:`~islands.core.errors.PeerRefused` naming the sender otherwise. Bytes are counted
exactly as the simulator counts them (``Message.nbytes`` per message with ``src != dst``) in
``bytes_sent``/``bytes_received``; what actually went through ``send``/``recv`` (headers and
tensor bytes) is counted apart in ``wire_bytes_sent``/``wire_bytes_received``, for comparison
with the kernel's counters.

Waiting is a polling loop so that a membership change seen by the heartbeat thread
(``abort_event``), a SIGTERM (``stopping``) or ``timeout_s`` ends a blocked exchange with
:class:`CommError` instead of a hang. A group replaced by a new epoch's is released at once
when no wait is pending on it (its gloo threads and sockets go with it); one whose exchange
was abandoned mid-flight is kept until that wait ends (the group's own timeout), never
destroyed under pending work, so threads and open files stay bounded. The helper threads
that wait on gloo's works are kept and reused once idle (:func:`_in_waiter`): one thread per
wait made the process's memory grow round after round.

This is the only module of islands that imports ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from islands.core.errors import CodecError, CommError, PeerGaveUp, PeerRefused, Stopping
from islands.core.signing import Signer
from islands.core.timing import timed
from islands.transports import wire
from islands.transports.base import Exchange, Flight, Message, Place, ThreadedFlight, Transport
from islands.transports.streams import Epoch, Listener

# at most this many pieces of a native all_reduce (each at least 2^23 values)
NATIVE_PIECES = 4


def open_store(host: str, port: int, *, is_master: bool, timeout_s: float) -> dist.Store:
    """A ``TCPStore``: the server (``is_master``, ``port`` 0 picks a free one) or a client."""
    try:
        return dist.TCPStore(host, port, is_master=is_master, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistNetworkError) as e:
        raise CommError(f"cannot reach the rendezvous store at {host}:{port}: {e}") from None


def new_group(store: dist.Store, prefix: str, rank: int, size: int,
              timeout_s: float, *, host: str | None = None) -> dist.ProcessGroup:
    """A fresh gloo process group of ``size`` ranks; ``prefix`` isolates it in ``store``.

    Args:
        host: the address this worker's peers reach it at (``--host``): gloo binds its
            sockets there. Without it gloo binds to the address the machine's host name
            resolves to, often 127.0.0.1, which peers on other hosts (or in other network
            namespaces) cannot reach; ``GLOO_SOCKET_IFNAME`` overrides both.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if host and not os.environ.get("GLOO_SOCKET_IFNAME"):
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            options._timeout = timeout
            return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, options)
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, timeout)
    except RuntimeError as e:
        raise CommError(f"process group {prefix!r} (rank {rank} of {size}) failed to form: "
                        f"{e}") from None


class DistTransport(Transport):
    """One local worker; exchanges run over the current process group.

    Args:
        worker: the id of the worker this process drives.
        timeout_s: an exchange waiting longer than this raises :class:`CommError`.
        signer: this process's key (an open job): every header it sends is signed, every
            header it receives must be signed with the sender's key in ``keys`` and name
            the exchange's context (``context``, the phase, sender and receiver); what was
            received in the current context is kept (``kept``) as evidence.
        streams: this process's listener (``runtime.wire = "streams"``): every message goes
            over islands' framed TCP streams (:mod:`islands.transports.streams`) instead of
            gloo's pairs, once :meth:`open_streams` opened an epoch's.
    """

    def __init__(self, worker: int, timeout_s: float = 30.0, *,
                 stopping: threading.Event | None = None, signer: Signer | None = None,
                 streams: Listener | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be > 0")
        self.worker = worker
        self.timeout_s = timeout_s
        self.stopping = stopping or threading.Event()
        self.group: dist.ProcessGroup | None = None
        self.ranks: dict[int, int] = {}
        self.abort_event = threading.Event()
        self.signer = signer
        self.keys: dict[int, str] = {}  # {worker: its registered public key}
        self.context = ""
        self.kept: dict[tuple[str, int], Message] = {}  # {(phase, sender): its message}
        self._thread = threading.local()  # a flight's own context (in_background)
        self.streams = streams
        self._epoch: Epoch | None = None
        self.group_since = 0.0  # time.monotonic() when the current group was formed
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wire_bytes_sent = 0
        self.wire_bytes_received = 0
        self.pipeline = True  # the all-gather starts while the shard is reduced (start_relay)
        self._waits: list[threading.Event] = []  # waits on the current group, set when done
        # replaced groups with a wait still pending on them: (group, its waits)
        self._abandoned: list[tuple[dist.ProcessGroup, list[threading.Event]]] = []

    @property
    def local(self) -> tuple[int, ...]:
        return (self.worker,)

    def sent(self, worker: int) -> int:
        assert worker == self.worker, (worker, self.worker)
        return self.bytes_sent

    def received(self, worker: int) -> int:
        assert worker == self.worker, (worker, self.worker)
        return self.bytes_received

    def set_context(self, context: str, keys: dict[int, str]) -> None:
        """Where the next exchanges belong (e.g. ``"round/attempt"``) and the members' keys;
        what was kept as evidence from the last context is dropped."""
        self.context, self.keys, self.kept = context, dict(keys), {}

    def open_streams(self, store: dist.Store, prefix: str, members: tuple[int, ...],
                     keys: dict[int, str], peers: dict[int, str] | None = None) -> None:
        """An epoch's streams (``runtime.wire = "streams"``): connects to each member at its
        address in ``peers`` (by default :meth:`stream_addresses` reads them now); the last
        epoch's connections are closed (a transfer pending on them fails at once)."""
        if self.streams is None:
            return
        if peers is None:
            peers = self.stream_addresses(store, prefix, members)
        if self._epoch is not None:
            self._epoch.close()
            self._epoch = None
        self._epoch = Epoch(self.streams, prefix, self.worker, peers, keys, self.timeout_s)

    def close_streams(self) -> None:
        """Closes the current epoch's streams now: the peers' transfers with this worker fail
        at once instead of at their timeout (a gossip member leaving its epoch to regroup)."""
        if self._epoch is not None:
            self._epoch.close()
            self._epoch = None

    def stream_addresses(self, store: dist.Store, prefix: str,
                         members: tuple[int, ...]) -> dict[int, str] | None:
        """Publishes this worker's stream address under ``prefix`` in ``store`` and reads the
        other members' (blocking until each published, or the store's timeout); None without
        streams."""
        if self.streams is None:
            return None
        me, listener = self.worker, self.streams
        try:
            store.set(f"{prefix}streams/{me}", f"{listener.host}:{listener.port}")
            return {p: store.get(f"{prefix}streams/{p}").decode() for p in members if p != me}
        except (RuntimeError, dist.DistStoreError) as e:
            raise CommError(f"the streams of {prefix!r} could not be set up: {e}") from None

    def _ctx(self, phase: str, src: int, dst: int) -> str:
        return f"{getattr(self._thread, 'context', self.context)}/{phase}/{src}>{dst}"

    @property
    def in_flight(self) -> bool:
        """Whether a wait on the current group's transfers is pending."""
        return any(not e.is_set() for e in self._waits)

    def use_group(self, group: dist.ProcessGroup, members: tuple[int, ...]) -> None:
        """Switches to ``group``, whose rank ``i`` is worker ``sorted(members)[i]``; the old
        group is released now, or once the wait pending on it ends."""
        pending = [e for e in self._waits if not e.is_set()]
        if self.group is not None and pending:
            self._abandoned.append((self.group, pending))
        self._abandoned = [(g, es) for g, es in self._abandoned
                           if not all(e.is_set() for e in es)]
        self._waits = []
        self.group = group
        self.ranks = {m: i for i, m in enumerate(sorted(members))}
        self.group_since = time.monotonic()
        self.abort_event.clear()

    @contextlib.contextmanager
    def in_background(self) -> Iterator[Flight]:
        """Collectives issued inside run on a thread of their own while this worker computes
        (:class:`ThreadedFlight`); nothing else may use this transport until they settle.
        Their messages are signed for the context in force now, where every member issues
        them (the caller's next round may change it meanwhile)."""
        yield _InContext(self, self.context)

    def exchange(self, messages: dict[tuple[int, int], Message], members: tuple[int, ...],
                 phase: str, *, place: Place | None = None,
                 check_finite: bool = True) -> dict[tuple[int, int], Message]:
        return self.start_exchange(messages, members, phase, place=place,
                                   check_finite=check_finite).wait()

    def start_exchange(self, messages: dict[tuple[int, int], Message],
                       members: tuple[int, ...], phase: str, *, place: Place | None = None,
                       check_finite: bool = True) -> Exchange:
        """Round 1 (the headers), then round 2 posted: every tensor's bytes, in chunks of
        :data:`~islands.transports.wire.CHUNK_BYTES`, each its own send/recv (gloo delivers a
        pair's messages in order), so the caller can work on the first chunks while the next
        ones arrive."""
        me = self.worker
        out = {k: m for k, m in messages.items() if k[0] == me}
        assert len(out) == len(messages), f"{phase}: messages from a non-local worker"
        peers = [m for m in members if m != me]
        missing = [m for m in members if m not in self.ranks]
        if self.group is None or missing:
            raise CommError(f"{phase}: workers {missing} are not in the current process group")
        sw = self.stopwatch
        with timed(sw, "pack"):
            try:
                roots: dict = {}  # a tensor sent to several peers is hashed once
                heads = {p: wire.pack_header(out.get((me, p)), self.signer,
                                             self._ctx(phase, me, p), roots) for p in peers}
            except CommError as e:  # our own message cannot go: we are the one to blame
                raise PeerRefused(f"{phase}: worker {me}'s own message cannot be sent: {e}",
                                  me) from None
            head_bufs = {p: torch.empty(wire.MAX_HEADER_BYTES, dtype=torch.uint8) for p in peers}
        self._transfer([(heads[p], p) for p in peers], [(head_bufs[p], p) for p in peers],
                       0, phase)
        with timed(sw, "pack"):
            # A malformed header is refused once the transfers with the other peers are done
            # (they are not kept waiting); nothing more is sent to or taken from its sender.
            specs, refused = {}, {}
            for p in peers:
                try:
                    key = None if self.signer is None else self.keys.get(p, "")
                    if (h := wire.unpack_header(head_bufs[p], p, key,
                                                self._ctx(phase, p, me))) is not None:
                        specs[p] = h
                except (PeerRefused, PeerGaveUp) as e:
                    refused[p] = e
            received = {p: wire.receive_buffers(
                h, None if place is None else lambda *t, p=p: place(p, me, *t))
                for p, h in specs.items()}
            sends = [(wire.as_bytes(m.payload.tensors[k]), dst) for (_, dst), m in out.items()
                     if dst != me and dst not in refused for k in sorted(m.payload.tensors)]
        arriving = _Arriving(self, phase, specs, received, check_finite)
        if self.signer is not None:
            self.kept.update({(phase, src): m for (src, _), m in arriving.messages.items()})
        arriving.post(sends)
        # counted once everything has gone through (Exchange.wait)
        arriving.counts = {
            "bytes_sent": sum(m.nbytes for (_, dst), m in out.items()
                              if dst != me and dst not in refused),
            "wire_bytes_sent": sum(h.numel() for h in heads.values())
            + sum(b.numel() for b, _ in sends),
            "wire_bytes_received": sum(wire.header_length(head_bufs[p]) for p in peers
                                       if p not in refused)}
        if (me, me) in out:
            arriving.messages[(me, me)] = out[(me, me)]
        if refused:
            with contextlib.suppress(CommError):
                arriving.wait()
            raise next(iter(refused.values()))
        return arriving

    def all_reduce_mean(self, tensor: torch.Tensor, members: tuple[int, ...], phase: str
                        ) -> torch.Tensor:
        """``torch.distributed.all_reduce`` of ``tensor / n``, in place: the plain mean, for a
        trusted job (``runtime.trust = "cluster"``) with a lossless codec.

        Each member divides its own contribution by ``n`` and checks it is finite in the same
        pass (the fused kernel of torch's gradient scaler), up to four pieces of at least
        32 MB, each sent as soon as it is checked; then all members share a vector of who
        found NaN/Inf (a few bytes): a bad contribution is named at once, by every member
        alike, and the result is void. The sum is gloo's own (its order,
        not the butterfly's: see ``islands.collectives``). Bytes: the ring's
        ``2 (n - 1) / n`` of the tensor per worker, sent and received (gloo's own framing is
        not counted).

        Raises:
            CodecError: this worker's contribution holds NaN/Inf (it blames itself).
            PeerRefused: another's does, naming it.
            CommError: the collective failed (a peer gone, the timeout).
        """
        me, n = self.worker, len(members)
        missing = [m for m in members if m not in self.ranks]
        if self.group is None or missing or sorted(members) != sorted(self.ranks):
            raise CommError(f"{phase}: the native all_reduce needs the whole current group "
                            f"(members {list(members)}, group {sorted(self.ranks)})")
        found = torch.zeros(1, dtype=torch.float32, device=tensor.device)
        inv = torch.full((1,), 1.0 / n, dtype=torch.float32, device=tensor.device)
        # piece by piece, so that checking a piece overlaps the all_reduce of the one before
        # (a NaN in a later piece wastes the pieces already sent, nothing else: the flags
        # below void the result)
        works = []
        for piece in tensor.chunk(max(1, min(NATIVE_PIECES, tensor.numel() >> 23))):
            torch._amp_foreach_non_finite_check_and_unscale_([piece], found, inv)
            works.append(self.group.allreduce([piece]))
        # the flags follow the pieces at once (every piece is checked by now): one wait
        flags = torch.zeros(n, dtype=torch.float32)
        flags[self.ranks[me]] = float(found.item())
        works.append(self.group.allreduce([flags]))
        self._wait(works, phase)
        bad = [m for m in sorted(self.ranks) if flags[self.ranks[m]] > 0]
        if me in bad:
            raise CodecError(f"{phase}: worker {me}'s own contribution holds NaN/Inf")
        if bad:
            raise PeerRefused(f"{phase}: worker {bad[0]}'s contribution holds NaN/Inf", bad[0])
        volume = 2 * (n - 1) * tensor.numel() * tensor.element_size() // n
        self.bytes_sent += volume
        self.bytes_received += volume
        self.wire_bytes_sent += volume + 4 * n
        self.wire_bytes_received += volume + 4 * n
        return tensor

    def relays(self, device: torch.device) -> bool:
        return (self.pipeline and self.signer is None and self._epoch is None
                and torch.device(device).type == "cpu")

    def start_relay(self, members: tuple[int, ...], phase: str, own: Message,
                    incoming: dict[int, Message]) -> _Relay:
        """An all-gather whose sends start before their values exist (:class:`_Relay`): the
        receives of every peer's message are posted now, straight into its payload's tensors
        (``incoming``: where each peer's shard belongs in this worker's result), and
        :meth:`_Relay.release` sends ``own``'s one payload tensor to every peer as its values
        are computed. No header: both sides know what travels (a lossless shard of known
        length). Only over gloo's pairs without signatures (a signed header covers the
        payload's hash, which does not exist yet), for CPU tensors (:meth:`relays`;
        ``pipeline = False`` turns it off: the all-gather follows the reduce)."""
        (shard,) = own.payload.tensors.values()
        assert self.relays(shard.device), "start_relay where relays() is False"
        missing = [m for m in members if m not in self.ranks]
        if self.group is None or missing:
            raise CommError(f"{phase}: workers {missing} are not in the current process group")
        return _Relay(self, phase, own, incoming)

    def send_post(self, message: Message, to: tuple[int, ...], phase: str) -> list:
        """One way, not waited for: ``message`` (its signed header, then its bytes) to each
        worker of ``to`` (an asynchronous update: each receiver takes it with
        :meth:`receive_post` when it needs it). Returns the sends' works: the caller keeps
        them (and so the tensors they read) and waits for them before it leaves."""
        me, roots = self.worker, {}
        missing = [p for p in to if p not in self.ranks]
        if self.group is None or missing:
            raise CommError(f"{phase}: workers {missing} are not in the current process group")
        heads = {p: wire.pack_header(message, self.signer, self._ctx(phase, me, p), roots)
                 for p in to}
        data = [wire.as_bytes(message.payload.tensors[k]) for k in sorted(message.payload.tensors)]
        pieces = [(b[x:y], p) for p in to for b in data for x, y in wire.chunks(b.numel())]
        works = self._post([(heads[p], p) for p in to], [], 0, phase)
        works += self._post(pieces, [], 1, phase)
        self.bytes_sent += message.nbytes * len(to)
        self.wire_bytes_sent += (sum(h.numel() for h in heads.values())
                                 + len(to) * sum(b.numel() for b in data))
        return works

    def wait_sends(self, works: list, phase: str) -> None:
        """Waits for :meth:`send_post`'s works (within ``runtime.collective_timeout_s``)."""
        self._wait(works, phase)

    @staticmethod
    def unfinished(works: list) -> list:
        """The works of ``works`` not known to be done (gloo's cannot be polled: all of
        them; the streams' that have not completed)."""
        return [w for w in works if not (hasattr(w, "done") and w.done())]

    def receive_post(self, src: int, phase: str) -> Message:
        """The next message :meth:`send_post` sent this worker from ``src`` for ``phase``:
        its header checked (signed by ``src`` for this context), then its bytes, refused
        naming ``src`` if they hold NaN/Inf."""
        me = self.worker
        head = torch.empty(wire.MAX_HEADER_BYTES, dtype=torch.uint8)
        self._transfer([], [(head, src)], 0, phase)
        key = None if self.signer is None else self.keys.get(src, "")
        h = wire.unpack_header(head, src, key, self._ctx(phase, src, me))
        if h is None:
            raise PeerRefused(f"{phase}: worker {src} posted no update", src)
        received = wire.receive_buffers(h, None)
        recvs = [(wire.as_bytes(t)[a:b], src) for t in received.values()
                 for a, b in wire.chunks(wire.as_bytes(t).numel())]
        self._transfer([], recvs, 1, phase)
        msg = wire.message(h, received)
        wire.check_finite(msg, src)
        self.bytes_received += msg.nbytes
        self.wire_bytes_received += wire.header_length(head) + sum(
            wire.as_bytes(t).numel() for t in received.values())
        return msg

    def give_up(self, members: tuple[int, ...], phase: str, reason: str) -> None:
        """Tells every other member at once that this worker will send nothing in ``phase``
        (its own contribution could not be encoded, or it refused another's): a header that
        says why takes the place of each message, so the peers end the exchange now instead
        of waiting ``timeout_s`` for bytes that will not come. Their headers are taken and
        dropped (they send no payload to a member that gave up)."""
        me = self.worker
        peers = [m for m in members if m != me and m in self.ranks]
        void = wire.pack_void(f"{phase}: {reason}")
        bufs = {p: torch.empty(wire.MAX_HEADER_BYTES, dtype=torch.uint8) for p in peers}
        with contextlib.suppress(CommError):  # the peers learn it, or they are gone anyway
            self._transfer([(void, p) for p in peers], [(bufs[p], p) for p in peers], 0,
                           phase)

    def _post(self, sends: list, recvs: list, tag: int, phase: str) -> list:
        """Posts gloo sends and receives of ``(tensor, peer)``; returns their works."""
        # Receives first: gloo tells the peer "ready to receive" on the pair's one TCP
        # connection, in order behind whatever this side sends. Posted after a send whose
        # data is already flowing, that notice would wait behind all of it, and the peer's
        # data could not start until ours had crossed: a full-duplex link used one way at a
        # time (half its capacity over a slow link).
        if self._epoch is not None:
            return self._epoch.post(sends, recvs, tag)
        try:
            recv_works = [self.group.recv([t], self.ranks[p], tag) for t, p in recvs]
            works = [self.group.send([t], self.ranks[p], tag) for t, p in sends]
        except RuntimeError as e:  # a pair already known dead fails at once
            raise CommError(f"{phase}: a peer failed: {str(e).splitlines()[0]}") from None
        return works + recv_works

    def _transfer(self, sends: list, recvs: list, tag: int, phase: str) -> None:
        works = self._post(sends, recvs, tag, phase)
        with timed(self.stopwatch, "wire"):
            self._wait(works, phase)

    def _wait(self, works: list, phase: str) -> None:
        # gloo's point-to-point work cannot be polled (is_completed stays False until wait),
        # so a helper thread waits and this thread watches the abort flag and the deadline.
        # An abandoned helper ends when the group's own timeout fires.
        errors: list[BaseException] = []
        done = threading.Event()

        def wait_all() -> None:
            try:
                for w in works:
                    w.wait()
            except BaseException as e:  # reported to the caller below, never from the thread
                errors.append(e)
            done.set()

        self._waits = [e for e in self._waits if not e.is_set()] + [done]
        _in_waiter(wait_all)
        deadline = time.monotonic() + self.timeout_s
        try:
            while not done.wait(0.002):
                if self.abort_event.is_set():
                    raise CommError(f"{phase}: aborted, the membership changed mid-exchange")
                if self.stopping.is_set():
                    raise Stopping(f"{phase}: asked to stop (SIGTERM)")
                if time.monotonic() > deadline:
                    raise CommError(f"{phase}: no answer within {self.timeout_s:g} s "
                                    "(runtime.collective_timeout_s)")
        except BaseException:
            self.drop_scratch()  # the waiter still holds receives into them
            raise
        if errors:
            if isinstance(errors[0], PeerRefused):  # a stream refused what a peer sent
                raise PeerRefused(f"{phase}: {errors[0]}", errors[0].sender)
            raise CommError(f"{phase}: a peer failed: {str(errors[0]).splitlines()[0]}")


class _InContext(ThreadedFlight):
    """A flight whose exchanges are signed for the context it was issued in."""

    def __init__(self, transport: DistTransport, context: str) -> None:
        super().__init__()
        self.transport, self.context = transport, context

    def run(self, work) -> None:
        def in_context():
            self.transport._thread.context = self.context
            return work()

        super().run(in_context)


class _Arriving(Exchange):
    """Round 2 of an exchange in flight: the tensors' chunks, sent and received in order."""

    def __init__(self, transport: DistTransport, phase: str, specs: dict,
                 received: dict[int, dict[str, torch.Tensor]], check_finite: bool) -> None:
        me = transport.worker
        super().__init__({(p, me): wire.message(h, received[p]) for p, h in specs.items()})
        self.transport, self.phase, self.check_finite = transport, phase, check_finite
        self.received = received
        self.sends: list = []
        self.counts: dict[str, int] = {}
        self.finished = False
        # (peer, tensor name) -> [(end byte, work)] in arrival order, and how many were waited
        self.chunks: dict[tuple[int, str], list] = {}
        self.waited: dict[tuple[int, str], int] = {}

    def post(self, sends: list) -> None:
        recvs, owners = [], []
        for p, tensors in self.received.items():
            for name, t in tensors.items():
                for a, b in wire.chunks(wire.as_bytes(t).numel()):
                    recvs.append((wire.as_bytes(t)[a:b], p))
                    owners.append(((p, name), b))
        pieces = [(b[x:y], p) for b, p in sends for x, y in wire.chunks(b.numel())]
        works = self.transport._post(pieces, recvs, 1, self.phase)
        self.sends = works[:len(pieces)]
        for (key, end), work in zip(owners, works[len(pieces):]):
            self.chunks.setdefault(key, []).append((end, work))

    def wait_for(self, key: tuple[int, int], name: str, nbytes: int) -> None:
        src = key[0]
        if src == self.transport.worker or nbytes <= 0:
            return  # handed over in memory
        chunks, done = self.chunks.get((src, name), []), self.waited.get((src, name), 0)
        need = done
        while need < len(chunks) and (need == 0 or chunks[need - 1][0] < nbytes):
            need += 1
        if need == done:
            return
        left = sum(len(c) - self.waited.get(k, 0) for k, c in self.chunks.items())
        if left == need - done:  # the last bytes: one wait for everything, sends included
            self.wait()
            return
        self.waited[(src, name)] = need  # handed to _wait, which holds them if it fails
        with timed(self.transport.stopwatch, "wire"):
            self.transport._wait([w for _, w in chunks[done:need]], self.phase)

    def abandon(self) -> None:
        # As _wait does with the works it gives up on: a helper holds them (and so the
        # tensors gloo reads and writes) until they end or one fails, which the group's own
        # timeout guarantees. Works already handed to _wait are its helper's.
        if self.finished:
            return
        works = self.sends + [w for key, chunks in self.chunks.items()
                              for _, w in chunks[self.waited.get(key, 0):]]
        self.finished = True
        self.transport.drop_scratch()  # the works still receive into kept buffers

        held = threading.Event()

        def hold() -> None:
            with contextlib.suppress(BaseException):  # the caller already has the error
                for w in works:
                    w.wait()
            held.set()

        self.transport._waits.append(held)  # its group is kept while they are held
        _in_waiter(hold)

    def wait(self) -> dict[tuple[int, int], Message]:
        t = self.transport
        if self.finished:
            return self.messages
        rest = [w for key, chunks in self.chunks.items()
                for _, w in chunks[self.waited.get(key, 0):]]
        self.finished = True  # everything is handed to _wait, which holds it if it fails
        with timed(t.stopwatch, "wire"):
            t._wait(self.sends + rest, self.phase)
        self.waited = {key: len(chunks) for key, chunks in self.chunks.items()}
        for name, n in self.counts.items():
            setattr(t, name, getattr(t, name) + n)
        self.counts = {}
        for (src, dst), msg in self.messages.items():
            if src == dst:
                continue
            if self.check_finite:
                with timed(t.stopwatch, "pack"):
                    wire.check_finite(msg, src)
            t.bytes_received += msg.nbytes
            t.wire_bytes_received += sum(b.numel() for b in map(wire.as_bytes,
                                                                 msg.payload.tensors.values()))
        return self.messages


# Idle waiter threads, each by its inbox. A wait abandoned on a dead group keeps its thread
# until the group's own timeout ends it; the next wait meanwhile takes another (or a new) one.
_idle: queue.SimpleQueue[queue.SimpleQueue] = queue.SimpleQueue()


def _in_waiter(job) -> None:
    """Runs ``job`` (which must not raise) on an idle waiter thread, or a new one."""
    try:
        inbox = _idle.get_nowait()
    except queue.Empty:
        inbox = queue.SimpleQueue()
        threading.Thread(target=_waiter, args=(inbox,), daemon=True, name="wait").start()
    inbox.put(job)


def _waiter(inbox: queue.SimpleQueue) -> None:
    while True:
        inbox.get()()
        _idle.put(inbox)


# gloo's tag of a relay's transfers (headers 0, an exchange's payloads 1)
RELAY_TAG = 2
# a relay's trailer when its sender found nothing wrong
NO_BLAME = -1


class _Relay(_Arriving):
    """A pipelined all-gather in flight (:meth:`DistTransport.start_relay`).

    The sender computes its shard step by step and sends each step's values to every peer at
    once (:meth:`release`), then a trailer (:meth:`finish`): ``NO_BLAME``, or the worker it
    blames for a shard it could not compute (a peer's malformed or non-finite row: the values
    sent are void). A receiver reads each peer's message (:attr:`messages`: its tensors where
    they belong) as it arrives (:meth:`wait_for`) and that peer's verdict (:meth:`blame`)
    before it trusts it; :meth:`wait` counts the messages' bytes as any exchange's.
    """

    def __init__(self, transport: DistTransport, phase: str, own: Message,
                 incoming: dict[int, Message]) -> None:
        super().__init__(transport, phase, {}, {}, check_finite=False)
        me = transport.worker
        self.messages = {**{(p, me): m for p, m in incoming.items()}, (me, me): own}
        (shard,) = own.payload.tensors.values()
        self.shard = wire.as_bytes(shard)
        self.peers = list(incoming)
        self.released = 0
        self.done_releasing = False
        self.verdicts = {p: torch.empty(1, dtype=torch.int64) for p in self.peers}
        recvs, owners = [], []
        for p, m in incoming.items():
            for name, t in m.payload.tensors.items():
                b = wire.as_bytes(t)
                for x, y in wire.chunks(b.numel()):
                    recvs.append((b[x:y], p))
                    owners.append(((p, name), y))
            recvs.append((self.verdicts[p], p))
            owners.append(((p, "verdict"), 8))
        for (key, end), work in zip(owners, transport._post([], recvs, RELAY_TAG, phase)):
            self.chunks.setdefault(key, []).append((end, work))
        self.counts = {"bytes_sent": own.nbytes * len(self.peers),  # payloads: see wait
                       "wire_bytes_sent": (self.shard.numel() + 8) * len(self.peers),
                       "wire_bytes_received": 8 * len(self.peers)}

    def release(self, nbytes: int) -> None:
        """Sends the shard's whole chunks up to byte ``nbytes`` (all of it at its end) not
        sent yet to every peer."""
        total = self.shard.numel()
        hi = total if nbytes >= total else nbytes - nbytes % wire.CHUNK_BYTES
        if self.done_releasing or hi <= self.released:
            return
        pieces = [(self.shard[x:min(hi, x + wire.CHUNK_BYTES)], p) for p in self.peers
                  for x in range(self.released, hi, wire.CHUNK_BYTES)]
        self.sends += self.transport._post(pieces, [], RELAY_TAG, self.phase)
        self.released = hi

    def finish(self, blame: int | None = None) -> None:
        """Sends what is left of the shard, then the trailer: ``blame`` (the worker this one
        refused while computing it; None: none)."""
        if self.done_releasing:
            return
        self.release(self.shard.numel())
        verdict = torch.tensor([NO_BLAME if blame is None else blame], dtype=torch.int64)
        self.sends += self.transport._post([(verdict, p) for p in self.peers], [], RELAY_TAG,
                                           self.phase)
        self.done_releasing = True

    def wait_for(self, key: tuple[int, int], name: str, nbytes: int) -> None:
        # its last wait completes the whole relay, own sends included: they must all be out
        assert self.done_releasing, "a relay's receives are awaited once its shard is sent"
        super().wait_for(key, name, nbytes)

    def blame(self, src: int) -> int | None:
        """Whom ``src`` blamed for its shard (None: nobody), once its trailer is in."""
        self.wait_for((src, self.transport.worker), "verdict", 8)
        who = int(self.verdicts[src].item())
        return None if who == NO_BLAME else who

    def wait(self) -> dict[tuple[int, int], Message]:
        self.finish()  # a sender that stopped early still owes its peers the rest
        return super().wait()
