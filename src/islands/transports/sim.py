"""The simulator's transport: every worker in one process, a network model and a virtual clock.

Messages are handed over in memory, so a simulation reproduces bit for bit. Time is virtual:
each worker has a clock advanced by the compute cost model (``compute``) and by exchanges.

Exchange cost model (full-duplex links): an exchange starts when the last member arrives and
every member's link is free, then lasts
``max latency of the senders + max over members of max(sent_i / upload_i, recv_i / download_i)``
with bytes counted in bits, each payload byte times the link's framing (``network.framing``: the
packet headers a link carries besides the payload). This is the usual per-worker-NIC bound: it
charges each worker for its own upload and download, so a slow link slows everyone waiting on
it, as in a real all-reduce. A blocking exchange moves every member to its end; one issued in
the background (an overlapped algorithm's sync, :meth:`SimTransport.in_background`) occupies the
links while the members go on computing, and each waits only for what is left of it when it
needs the result (:class:`VirtualClock`). A one-way post (an asynchronous algorithm's update,
:meth:`SimTransport.posting`) occupies the sender's upload and each receiver's download; the
sender goes on at once, a receiver waits for it only at :meth:`VirtualClock.await_posts`.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from islands.transports.base import Flight, Message, Place, Transport


@dataclass(frozen=True)
class Link:
    """One worker's link: upload/download capacity (bits per second) and one-way latency."""

    upload_bps: float
    download_bps: float
    latency_s: float


class NetworkModel:
    """Per-worker links with defaults overridable per worker.

    Args:
        bandwidth_bps: default upload and download capacity.
        latency_s: default one-way latency.
        overrides: ``{worker: {"upload_bps"|"download_bps"|"latency_s": value}}``.
        framing: bytes a link carries per payload byte (``network.framing``).
    """

    def __init__(self, bandwidth_bps: float = 100e6, latency_s: float = 0.05,
                 overrides: dict[int, dict[str, float]] | None = None,
                 framing: float = 1.0) -> None:
        if bandwidth_bps <= 0 or latency_s < 0 or framing < 1:
            raise ValueError(f"bandwidth_bps ({bandwidth_bps}) must be > 0, latency_s "
                             f"({latency_s}) >= 0 and framing ({framing}) >= 1")
        self.framing = framing
        self.default = Link(bandwidth_bps, bandwidth_bps, latency_s)
        self.overrides = {w: Link(**{**self.default.__dict__, **o})
                          for w, o in (overrides or {}).items()}
        self.cut: frozenset[int] | None = None  # a partition: one side (the fault plan's)

    def reachable(self, a: int, b: int) -> bool:
        """Whether the link between ``a`` and ``b`` is up (not across a partition)."""
        return self.cut is None or (a in self.cut) == (b in self.cut)

    @classmethod
    def from_config(cls, cfg) -> NetworkModel:
        over = {w.id: {k: getattr(w, k) for k in ("upload_bps", "download_bps", "latency_s")
                       if getattr(w, k) is not None} for w in cfg.worker}
        return cls(cfg.bandwidth_bps, cfg.latency_s, over, cfg.framing)

    def link(self, worker: int) -> Link:
        return self.overrides.get(worker, self.default)

    def upload_s(self, worker: int, nbytes: float) -> float:
        """Seconds ``worker``'s upload takes to carry ``nbytes`` of payload."""
        return 8 * nbytes * self.framing / self.link(worker).upload_bps

    def download_s(self, worker: int, nbytes: float) -> float:
        """Seconds ``worker``'s download takes to carry ``nbytes`` of payload."""
        return 8 * nbytes * self.framing / self.link(worker).download_bps


class VirtualClock:
    """Per-worker virtual time, compute time and communication time (seconds): a timeline.

    Each worker has its own time (``now``) and its link's busy-until time. An exchange starts
    when the last member is there and every member's link is free, and occupies the links for
    its duration. A blocking exchange (:meth:`barrier`) moves every member to its end, as a
    worker waiting on it would. One issued in the background (inside :meth:`background`)
    leaves the members' time alone: they go on computing while it crosses the links, and
    :meth:`settle` moves each only as far as the exchange's end, when it needs the result.

    Attributes:
        comm_s: communication each worker waited for (exposed).
        hidden_s: communication that crossed a worker's link while it computed (hidden).
    """

    kind = "virtual"  # summary.json's "clock": modelled seconds, not measured ones

    def __init__(self, workers: int) -> None:
        self.now = [0.0] * workers
        self.compute_s = [0.0] * workers
        self.comm_s = [0.0] * workers
        self.hidden_s = [0.0] * workers
        self.link_free = [0.0] * workers  # each worker's link is busy until then
        self._flight: dict[int, list[float]] | None = None  # {member: [end, link time]}
        # one-way posts: each worker's upload and download busy-until times, when the last
        # post addressed to it arrives, and the download time not yet charged
        self.up_free = [0.0] * workers
        self.down_free = [0.0] * workers
        self.arrives = [0.0] * workers
        self.inbound_s = [0.0] * workers

    def compute(self, worker: int, seconds: float) -> None:
        self.now[worker] += seconds
        self.compute_s[worker] += seconds

    def time_s(self, worker: int) -> float:
        return self.now[worker]

    def commit(self, worker: int, seconds: float) -> None:
        """``worker`` spends ``seconds`` on a round's commit (``compute.commit_time_s``):
        waited for, so counted as communication."""
        self.now[worker] += seconds
        self.comm_s[worker] += seconds

    def barrier(self, members: tuple[int, ...], duration_s: float) -> None:
        """All ``members`` wait for the last one and for their links, then spend
        ``duration_s`` together (in the background: their links do; they go on)."""
        start = max(max(self.now[m], self.link_free[m]) for m in members)
        for m in members:
            self.link_free[m] = start + duration_s
            if self._flight is not None:
                end_busy = self._flight.setdefault(m, [0.0, 0.0])
                end_busy[0] = start + duration_s
                end_busy[1] += duration_s
            else:
                self.comm_s[m] += duration_s
                self.now[m] = start + duration_s

    def neighbourhoods(self, peers: dict[int, set[int]], durations: dict[int, float]) -> None:
        """A gossip step: each worker waits for the last of its ``peers`` (itself included)
        and for their links, then spends its own ``durations`` entry; the waits are taken
        from the times before the step, so a worker is held only by its neighbourhood.
        Issued in the background it falls back to :meth:`barrier` over everyone."""
        if self._flight is not None:
            self.barrier(tuple(peers), max(durations.values(), default=0.0))
            return
        start = {m: max(max(self.now[j], self.link_free[j]) for j in p)
                 for m, p in peers.items()}
        for m, t0 in start.items():
            self.link_free[m] = self.now[m] = t0 + durations[m]
            self.comm_s[m] += durations[m]

    def abandon(self, worker: int, at_s: float) -> None:
        """``worker`` stops computing at ``at_s`` (its round, left out, is abandoned): the
        compute it would have done after is not done."""
        if self.now[worker] > at_s:
            self.compute_s[worker] -= self.now[worker] - at_s
            self.now[worker] = at_s

    @contextlib.contextmanager
    def background(self) -> Iterator[dict[int, list[float]]]:
        """Exchanges inside are issued in the background; yields what :meth:`settle` takes."""
        assert self._flight is None, "one background issue at a time"
        self._flight = flight = {}
        try:
            yield flight
        finally:
            self._flight = None

    def settle(self, flight: dict[int, list[float]]) -> None:
        """Each member of a background exchange waits for its end (if it is still on the
        wire): the wait is exposed communication, the rest of its link time was hidden."""
        for m, (end, busy) in flight.items():
            exposed = min(busy, max(0.0, end - self.now[m]))
            self.now[m] = max(self.now[m], end)
            self.comm_s[m] += exposed
            self.hidden_s[m] += busy - exposed
        flight.clear()

    def post(self, src: int, nbytes: int, receivers: dict[int, int], network: NetworkModel
             ) -> None:
        """A one-way post from ``src`` (``nbytes`` up in all) to ``receivers`` (``{worker:
        bytes down}``), issued at ``src``'s now once its upload is free. ``src`` goes on
        computing (its upload time is hidden); each receiver's copy arrives when the upload
        and its download are through, plus the sender's latency."""
        up = network.link(src)
        start = max(self.now[src], self.up_free[src])
        sent = start + network.upload_s(src, nbytes)
        self.up_free[src] = sent
        self.hidden_s[src] += sent - start
        for d, got in receivers.items():
            down_s = network.download_s(d, got)
            done = max(sent, max(start, self.down_free[d]) + down_s)
            self.down_free[d] = done
            self.arrives[d] = max(self.arrives[d], done + up.latency_s)
            self.inbound_s[d] += down_s

    def fetch(self, src: int, dst: int, at_s: float, transfer_s: float, latency_s: float
              ) -> None:
        """``dst`` (idle until ``at_s``) downloads ``transfer_s`` seconds of state from
        ``src`` once both links are free: ``src``'s upload goes on behind its compute (a
        post's), ``dst`` waits for the last byte."""
        start = max(at_s, self.now[dst], self.up_free[src], self.down_free[dst])
        done = start + transfer_s
        self.up_free[src] = self.down_free[dst] = done
        self.hidden_s[src] += transfer_s
        wait = done + latency_s - max(at_s, self.now[dst])
        self.now[dst] = done + latency_s
        self.comm_s[dst] += wait

    def await_posts(self, worker: int) -> None:
        """``worker`` waits for every post addressed to it so far: the wait is exposed
        communication, the rest of their download time was hidden behind its compute."""
        wait = max(0.0, self.arrives[worker] - self.now[worker])
        exposed = min(wait, self.inbound_s[worker])
        self.hidden_s[worker] += self.inbound_s[worker] - exposed
        self.comm_s[worker] += wait
        self.now[worker] += wait
        self.inbound_s[worker] = 0.0

    @property
    def makespan_s(self) -> float:
        return max(self.now)

    def utilization(self) -> float:
        """Share of all workers' wall time spent computing, over the whole run."""
        span = self.makespan_s
        return sum(self.compute_s) / (len(self.now) * span) if span > 0 else 1.0


class SimTransport(Transport):
    """All workers in this process; in-memory delivery, exact byte ledger, virtual time.

    Args:
        workers: number of workers.
        network: the network model.
        clock: the virtual clock to advance (one per simulation).
    """

    def __init__(self, workers: int, network: NetworkModel, clock: VirtualClock) -> None:
        self.workers = workers
        self.network = network
        self.clock = clock
        self.bytes_sent = [0] * workers
        self.bytes_received = [0] * workers
        # {(sender, receiver): bytes}: what crossed each directed link (the busiest one)
        self.link_bytes: collections.Counter = collections.Counter()
        self._posting = False
        self._pairwise = False

    @property
    def local(self) -> tuple[int, ...]:
        return tuple(range(self.workers))

    def sent(self, worker: int) -> int:
        return self.bytes_sent[worker]

    def received(self, worker: int) -> int:
        return self.bytes_received[worker]

    def reachable(self, a: int, b: int) -> bool:
        return self.network.reachable(a, b)

    def exchange(self, messages: dict[tuple[int, int], Message], members: tuple[int, ...],
                 phase: str, *, place: Place | None = None,
                 check_finite: bool = True) -> dict[tuple[int, int], Message]:
        sent = dict.fromkeys(members, 0)
        received = dict.fromkeys(members, 0)
        for (src, dst), msg in messages.items():
            assert src in sent and dst in received, f"{phase}: {src}->{dst} outside {members}"
            if src != dst:
                sent[src] += msg.nbytes
                received[dst] += msg.nbytes
                self.link_bytes[(src, dst)] += msg.nbytes
        for m in members:
            self.bytes_sent[m] += sent[m]
            self.bytes_received[m] += received[m]
        if self._posting:
            for src in {s for s, _ in messages}:
                self.clock.post(src, sent[src], {d: msg.nbytes for (s, d), msg
                                                 in messages.items() if s == src and d != s},
                                self.network)
        elif self._pairwise:
            peers = {m: {m} for m in members}
            for src, dst in messages:
                peers[src].add(dst)
                peers[dst].add(src)
            self.clock.neighbourhoods(peers, {
                m: self._duration({j: sent[j] for j in p}, {j: received[j] for j in p})
                for m, p in peers.items()})
        else:
            self.clock.barrier(members, self._duration(sent, received))
        return dict(messages)

    def send_state(self, src: int, dst: int, nbytes: int, *, at_s: float | None = None
                   ) -> None:
        """A state transfer (a joiner's): ``nbytes`` from ``src`` to ``dst``, counted in the
        ledger and charged to both as a blocking exchange; or (``at_s``: an asynchronous
        run's joiner, ``src`` training on) one way from ``at_s``, ``dst`` waiting for it
        (:meth:`VirtualClock.fetch`)."""
        self.bytes_sent[src] += nbytes
        self.bytes_received[dst] += nbytes
        self.link_bytes[(src, dst)] += nbytes
        if at_s is None:
            self.clock.barrier((src, dst), self._duration({src: nbytes, dst: 0},
                                                          {src: 0, dst: nbytes}))
            return
        self.clock.fetch(src, dst, at_s, max(self.network.upload_s(src, nbytes),
                                             self.network.download_s(dst, nbytes)),
                         self.network.link(src).latency_s)

    @contextlib.contextmanager
    def in_background(self) -> Iterator[Flight]:
        with self.clock.background() as flight:
            yield Flight(lambda: self.clock.settle(flight))

    @contextlib.contextmanager
    def pairwise(self) -> Iterator[None]:
        self._pairwise = True
        try:
            yield
        finally:
            self._pairwise = False

    @contextlib.contextmanager
    def posting(self) -> Iterator[None]:
        self._posting = True
        try:
            yield
        finally:
            self._posting = False

    def _duration(self, sent: dict[int, int], received: dict[int, int]) -> float:
        if not any(sent.values()):
            return 0.0
        latency = max(self.network.link(m).latency_s for m, b in sent.items() if b)
        transfer = max(max(self.network.upload_s(m, sent[m]),
                           self.network.download_s(m, received[m])) for m in sent)
        return latency + transfer
