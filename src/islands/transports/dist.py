"""The real transport: one worker per process, messages over a ``torch.distributed`` group.

An ``exchange`` is a set of point-to-point transfers between the members taking part (gloo
over TCP on CPUs; NCCL groups are not used because payloads are byte buffers): first every
member tells every other member how many bytes it will send (an int64 each), then the
payloads move with ``isend``/``irecv``. Only members of the exchange take part, so a
sub-group (a state transfer from one worker to a joiner) needs no collective over the whole
process group.

On the wire a message is ``u32 header length | JSON header | raw tensor bytes``. The header
names each payload tensor's dtype and shape; a received message is checked before use (sizes
consistent, dtype allowed, floating values finite) and refused with :class:`CommError`
otherwise. Bytes are counted exactly as the simulator counts them (``Message.nbytes`` per
message with ``src != dst``) in ``bytes_sent``/``bytes_received``; the serialization overhead
is counted apart in ``wire_bytes_sent`` for comparison with the kernel's counters.

Waiting is a polling loop so that a membership change seen by the heartbeat thread
(``abort_event``) or ``timeout_s`` ends a blocked exchange with :class:`CommError` instead of a
hang. Groups whose work was abandoned that way are kept alive, never destroyed mid-flight.

This is the only module of islands that imports ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import json
import math
import struct
import threading
import time

import torch
import torch.distributed as dist

from islands.codecs.base import Encoded
from islands.core.errors import CommError, PeerRefused
from islands.core.timing import timed
from islands.transports.base import Message, Transport

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                               torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                               torch.bool)}
MAX_MESSAGE_BYTES = 1 << 33  # 8 GiB: a size above this from a peer is malformed


def open_store(host: str, port: int, *, is_master: bool, timeout_s: float) -> dist.Store:
    """A ``TCPStore``: the server (``is_master``, ``port`` 0 picks a free one) or a client."""
    try:
        return dist.TCPStore(host, port, is_master=is_master, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistNetworkError) as e:
        raise CommError(f"cannot reach the rendezvous store at {host}:{port}: {e}") from None


def new_group(store: dist.Store, prefix: str, rank: int, size: int,
              timeout_s: float) -> dist.ProcessGroup:
    """A fresh gloo process group of ``size`` ranks; ``prefix`` isolates it in ``store``."""
    try:
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size,
                                     datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise CommError(f"process group {prefix!r} (rank {rank} of {size}) failed to form: "
                        f"{e}") from None


def _pad(n: int) -> int:
    return -n % 8  # sections start 8-byte aligned so tensors are views, not copies


def pack(msg: Message) -> torch.Tensor:
    """Serializes a message into one uint8 tensor (header, then 8-byte aligned tensors)."""
    p = msg.payload
    names = sorted(p.tensors)
    header = {"w": msg.weight, "hb": msg.header_bytes, "n": p.numel, "dt": str(p.dtype),
              "eh": p.header_bytes, "meta": p.meta,
              "t": [[k, str(p.tensors[k].dtype), list(p.tensors[k].shape)] for k in names]}
    try:
        head = json.dumps(header).encode()
    except TypeError as e:
        raise CommError(f"codec meta {p.meta!r} is not JSON-serializable: {e}") from None
    head = struct.pack("<I", len(head)) + head
    parts = [torch.frombuffer(bytearray(head + bytes(_pad(len(head)))), dtype=torch.uint8)]
    for k in names:
        t = p.tensors[k].detach().contiguous().cpu().reshape(-1)
        if t.numel():
            parts.append(t.view(torch.uint8))
            if _pad(parts[-1].numel()):
                parts.append(torch.zeros(_pad(parts[-1].numel()), dtype=torch.uint8))
    return torch.cat(parts)


def unpack(buf: torch.Tensor, peer: int) -> Message:
    """Parses and validates what :func:`pack` wrote; :class:`CommError` names ``peer``."""
    try:
        (hlen,) = struct.unpack("<I", buf[:4].numpy().tobytes())
        if 4 + hlen > buf.numel():
            raise ValueError("header longer than the message")
        header = json.loads(buf[4:4 + hlen].numpy().tobytes())
        offset = 4 + hlen + _pad(4 + hlen)
        tensors = {}
        for name, dtype, shape in header["t"]:
            dt = _DTYPES[dtype]
            if any(not isinstance(s, int) or s < 0 for s in shape):
                raise ValueError(f"bad shape {shape}")
            n = torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size()
            if offset + n > buf.numel():
                raise ValueError("payload shorter than its header says")
            tensors[name] = buf[offset:offset + n].view(dt).reshape(shape)
            offset += n + _pad(n)
        if offset != buf.numel():
            raise ValueError(f"{buf.numel() - offset} trailing bytes")
        payload = Encoded(tensors, numel=int(header["n"]), dtype=_DTYPES[header["dt"]],
                          header_bytes=int(header["eh"]), meta=dict(header["meta"]))
        msg = Message(payload, int(header["hb"]), weight=float(header["w"]))
    except (ValueError, KeyError, TypeError, struct.error, RuntimeError) as e:
        raise PeerRefused(f"malformed message from worker {peer}: {e}", peer) from None
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise PeerRefused(f"message from worker {peer}: tensor {name!r} holds NaN/Inf; "
                              "refused", peer)
    if payload.numel < 0 or not math.isfinite(msg.weight):
        raise PeerRefused(f"message from worker {peer}: bad numel or weight; refused", peer)
    return msg


class DistTransport(Transport):
    """One local worker; exchanges run over the current process group.

    Args:
        worker: the id of the worker this process drives.
        timeout_s: an exchange waiting longer than this raises :class:`CommError`.
    """

    def __init__(self, worker: int, timeout_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be > 0")
        self.worker = worker
        self.timeout_s = timeout_s
        self.group: dist.ProcessGroup | None = None
        self.ranks: dict[int, int] = {}
        self.abort_event = threading.Event()
        self.group_since = 0.0  # time.monotonic() when the current group was formed
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wire_bytes_sent = 0
        self._abandoned: list[dist.ProcessGroup] = []

    @property
    def local(self) -> tuple[int, ...]:
        return (self.worker,)

    def sent(self, worker: int) -> int:
        assert worker == self.worker, (worker, self.worker)
        return self.bytes_sent

    def received(self, worker: int) -> int:
        assert worker == self.worker, (worker, self.worker)
        return self.bytes_received

    def use_group(self, group: dist.ProcessGroup, members: tuple[int, ...]) -> None:
        """Switches to ``group``, whose rank ``i`` is worker ``sorted(members)[i]``."""
        if self.group is not None:
            self._abandoned.append(self.group)  # may hold abandoned work: never destroyed
        self.group = group
        self.ranks = {m: i for i, m in enumerate(sorted(members))}
        self.group_since = time.monotonic()
        self.abort_event.clear()

    def exchange(self, messages: dict[tuple[int, int], Message], members: tuple[int, ...],
                 phase: str) -> dict[tuple[int, int], Message]:
        me = self.worker
        out = {k: m for k, m in messages.items() if k[0] == me}
        assert len(out) == len(messages), f"{phase}: messages from a non-local worker"
        peers = [m for m in members if m != me]
        missing = [m for m in members if m not in self.ranks]
        if self.group is None or missing:
            raise CommError(f"{phase}: workers {missing} are not in the current process group")
        with timed(self.stopwatch, "pack"):
            bufs = {dst: pack(msg) for (src, dst), msg in out.items() if dst != me}
        sizes_out = {p: torch.tensor([bufs[p].numel() if p in bufs else 0]) for p in peers}
        sizes_in = {p: torch.zeros(1, dtype=torch.int64) for p in peers}
        self._transfer([(sizes_out[p], p) for p in peers], [(sizes_in[p], p) for p in peers],
                       0, phase)
        recv_bufs = {}
        for p in peers:
            n = int(sizes_in[p])
            if not 0 <= n <= MAX_MESSAGE_BYTES:
                raise PeerRefused(f"{phase}: worker {p} announced {n} bytes; refused", p)
            if n:
                recv_bufs[p] = torch.empty(n, dtype=torch.uint8)
        self._transfer([(b, p) for p, b in bufs.items()],
                       [(b, p) for p, b in recv_bufs.items()], 1, phase)
        result = {(me, me): out[(me, me)]} if (me, me) in out else {}
        for (src, dst), msg in out.items():
            if dst != me:
                self.bytes_sent += msg.nbytes
                self.wire_bytes_sent += bufs[dst].numel()
        for p, b in recv_bufs.items():
            with timed(self.stopwatch, "pack"):
                msg = unpack(b, p)
            result[(p, me)] = msg
            self.bytes_received += msg.nbytes
        return result

    def _transfer(self, sends: list, recvs: list, tag: int, phase: str) -> None:
        try:
            works = [self.group.send([t], self.ranks[p], tag) for t, p in sends]
            works += [self.group.recv([t], self.ranks[p], tag) for t, p in recvs]
        except RuntimeError as e:  # a pair already known dead fails at once
            raise CommError(f"{phase}: a peer failed: {str(e).splitlines()[0]}") from None
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

        threading.Thread(target=wait_all, daemon=True, name=f"wait {phase}").start()
        deadline = time.monotonic() + self.timeout_s
        while not done.wait(0.002):
            if self.abort_event.is_set():
                raise CommError(f"{phase}: aborted, the membership changed mid-exchange")
            if time.monotonic() > deadline:
                raise CommError(f"{phase}: no answer within {self.timeout_s:g} s "
                                "(runtime.collective_timeout_s)")
        if errors:
            raise CommError(f"{phase}: a peer failed: {str(errors[0]).splitlines()[0]}")
