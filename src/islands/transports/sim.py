"""The simulator's transport: every worker in one process, a network model and a virtual clock.

Messages are handed over in memory, so a simulation reproduces bit for bit. Time is virtual:
each worker has a clock advanced by the compute cost model (``compute``) and by exchanges.

Exchange cost model (bulk synchronous, full-duplex links): an exchange starts when the last
member arrives (a barrier), then lasts
``max latency of the senders + max over members of max(sent_i / upload_i, recv_i / download_i)``
with bytes counted in bits. Every member leaves it at that time. This is the usual
per-worker-NIC bound: it charges each worker for its own upload and download, so a slow link
slows everyone waiting on it, as in a real all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

from islands.transports.base import Message, Place, Transport


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
    """

    def __init__(self, bandwidth_bps: float = 100e6, latency_s: float = 0.05,
                 overrides: dict[int, dict[str, float]] | None = None) -> None:
        if bandwidth_bps <= 0 or latency_s < 0:
            raise ValueError(f"bandwidth_bps ({bandwidth_bps}) must be > 0 and latency_s "
                             f"({latency_s}) >= 0")
        self.default = Link(bandwidth_bps, bandwidth_bps, latency_s)
        self.overrides = {w: Link(**{**self.default.__dict__, **o})
                          for w, o in (overrides or {}).items()}

    @classmethod
    def from_config(cls, cfg) -> NetworkModel:
        over = {w.id: {k: getattr(w, k) for k in ("upload_bps", "download_bps", "latency_s")
                       if getattr(w, k) is not None} for w in cfg.worker}
        return cls(cfg.bandwidth_bps, cfg.latency_s, over)

    def link(self, worker: int) -> Link:
        return self.overrides.get(worker, self.default)


class VirtualClock:
    """Per-worker virtual time, compute time and communication time (seconds)."""

    kind = "virtual"  # summary.json's "clock": modelled seconds, not measured ones

    def __init__(self, workers: int) -> None:
        self.now = [0.0] * workers
        self.compute_s = [0.0] * workers
        self.comm_s = [0.0] * workers

    def compute(self, worker: int, seconds: float) -> None:
        self.now[worker] += seconds
        self.compute_s[worker] += seconds

    def time_s(self, worker: int) -> float:
        return self.now[worker]

    def barrier(self, members: tuple[int, ...], duration_s: float) -> None:
        """All ``members`` wait for the last one, then spend ``duration_s`` together."""
        start = max(self.now[m] for m in members)
        for m in members:
            self.comm_s[m] += duration_s
            self.now[m] = start + duration_s

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

    @property
    def local(self) -> tuple[int, ...]:
        return tuple(range(self.workers))

    def sent(self, worker: int) -> int:
        return self.bytes_sent[worker]

    def received(self, worker: int) -> int:
        return self.bytes_received[worker]

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
        for m in members:
            self.bytes_sent[m] += sent[m]
            self.bytes_received[m] += received[m]
        self.clock.barrier(members, self._duration(sent, received))
        return dict(messages)

    def _duration(self, sent: dict[int, int], received: dict[int, int]) -> float:
        if not any(sent.values()):
            return 0.0
        latency = max(self.network.link(m).latency_s for m, b in sent.items() if b)
        transfer = max(max(8 * sent[m] / self.network.link(m).upload_bps,
                           8 * received[m] / self.network.link(m).download_bps) for m in sent)
        return latency + transfer
