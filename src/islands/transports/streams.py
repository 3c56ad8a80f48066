"""Framed streams: an open job's point-to-point messages over TCP connections islands reads
itself, so that no peer can make a receiver's process abort.

gloo's pairs trust their peer: a message longer than the buffer the receiver posted for it
fails an assertion on gloo's I/O thread (``op.preamble.length <= op.nbytes``) and the
receiving process aborts, whoever sent it. Here each message travels as a frame, ``u32 tag |
u64 length | bytes``, on a connection of its own per direction (``sender -> receiver``); the
receiving thread reads the frame's length first and refuses a message longer than the buffer
posted for it (:class:`~islands.core.errors.PeerRefused` naming the sender, the connection
closed), so an oversized or mislabelled message ends an exchange, never a process. Messages
of one sender and tag are matched to the receives posted for them in order, as gloo's are; a
shorter message is accepted (headers are received into buffers of
:data:`~islands.transports.wire.MAX_HEADER_BYTES`).

Each worker process listens on one port at its advertised host. For an epoch (a store prefix)
every member publishes its address in the store and connects to every other member; the
first line on a connection names the epoch and the sender, signed with the sender's key, and
a connection whose signature does not check is closed unread. A new epoch closes the old
connections, which ends any transfer still pending on them (:meth:`Epoch.close`).

Bytes per message on the wire: 12 more than gloo's (the frame), besides the handshake line per
connection and epoch.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from collections import deque

import torch

from islands.core.errors import CommError, PeerRefused
from islands.core.signing import Signer, check_signature

log = logging.getLogger("islands.streams")

FRAME = struct.Struct("<IQ")  # tag, length
HELLO_BYTES = 4096


class Work:
    """One posted send or receive; :meth:`wait` returns once it completed, or raises."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


class Listener:
    """This process's listening socket; accepted connections go to the epoch they name."""

    def __init__(self, host: str, signer: Signer) -> None:
        self.host, self.signer = host, signer
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.epochs: dict[str, Epoch] = {}
        self.lock = threading.Condition()  # an epoch registered: notified
        threading.Thread(target=self._accept, daemon=True, name="streams").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._greet, args=(conn,), daemon=True,
                             name="streams hello").start()

    def _greet(self, conn: socket.socket) -> None:
        """Reads the hello line; hands the connection to its epoch, or closes it."""
        try:
            conn.settimeout(10.0)
            line = b""  # a byte at a time: the frames that follow stay in the socket
            while not line.endswith(b"\n") and len(line) < HELLO_BYTES:
                line += _read_exactly(conn, 1)
            hello = json.loads(line)
            prefix, src = str(hello["epoch"]), int(hello["from"])
            with self.lock:  # a fast peer may connect before this member opened the epoch
                self.lock.wait_for(lambda: prefix in self.epochs, timeout=30.0)
                epoch = self.epochs.get(prefix)
            if epoch is None or src not in epoch.keys or not check_signature(
                    epoch.keys[src], _hello_text(prefix, src, epoch.me).encode(),
                    bytes.fromhex(str(hello["sig"]))):
                raise OSError("unknown epoch or sender, or a signature that does not check")
            conn.settimeout(None)
            epoch.incoming(src, conn)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("streams: a connection refused at its hello (%s)", e)
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _hello_text(prefix: str, src: int, dst: int) -> str:
    return f"islands streams {prefix} {src}>{dst}"


class Epoch:
    """The streams of one epoch's members: outgoing connections this member opened to each
    peer, incoming ones each peer opened to it, and the receives posted per (peer, tag)."""

    def __init__(self, listener: Listener, prefix: str, me: int, peers: dict[int, str],
                 keys: dict[int, str], timeout_s: float) -> None:
        self.listener, self.prefix, self.me, self.keys = listener, prefix, me, dict(keys)
        self.lock = threading.Condition()
        self.closed = False
        self.posted: dict[tuple[int, int], deque] = {}  # (peer, tag) -> [(tensor, Work)]
        self.broken: dict[int, BaseException] = {}  # peer -> why its incoming stream ended
        self.sockets: list[socket.socket] = []
        self.senders: dict[int, _Sender] = {}
        with listener.lock:
            listener.epochs[prefix] = self
            listener.lock.notify_all()
        for peer, addr in peers.items():
            self.senders[peer] = _Sender(self, peer, addr, timeout_s)

    def incoming(self, peer: int, conn: socket.socket) -> None:
        with self.lock:
            if self.closed:
                conn.close()
                return
            self.sockets.append(conn)
        threading.Thread(target=self._read, args=(peer, conn), daemon=True,
                         name=f"streams from {peer}").start()

    def post(self, sends: list, recvs: list, tag: int) -> list[Work]:
        """Posts ``(tensor, peer)`` sends and receives; their works, sends first."""
        works = []
        for t, peer in sends:
            work = Work()
            self.senders[peer].queue(tag, t, work)
            works.append(work)
        with self.lock:
            for t, peer in recvs:
                work = Work()
                if peer in self.broken:
                    work.finish(self.broken[peer])
                else:
                    self.posted.setdefault((peer, tag), deque()).append((t, work))
                works.append(work)
            self.lock.notify_all()
        return works

    def _read(self, peer: int, conn: socket.socket) -> None:
        work = None  # the receive in progress, failed with the stream if it ends mid-way
        try:
            while True:
                tag, length = FRAME.unpack(_read_exactly(conn, FRAME.size))
                with self.lock:
                    while not self.closed and not self.posted.get((peer, tag)):
                        self.lock.wait(0.5)
                    if self.closed:
                        return
                    t, work = self.posted[(peer, tag)].popleft()
                into = memoryview(t.numpy()).cast("B")
                if length > len(into):
                    raise PeerRefused(f"worker {peer} sent a message of {length} bytes where "
                                      f"{len(into)} were posted for it (longer than its "
                                      "header said); refused", peer)
                _read_into(conn, into[:length])
                work.finish()
                work = None
        except PeerRefused as e:  # nothing more is read from it
            conn.close()
            self._break(peer, e, work)
        except (OSError, CommError) as e:
            self._break(peer, CommError(f"the stream from worker {peer} ended: {e}"), work)

    def _break(self, peer: int, error: BaseException, work: Work | None) -> None:
        """Fails the receive in progress and every one posted from ``peer``; later ones
        fail at once."""
        if work is not None:
            work.finish(error)
        with self.lock:
            self.broken.setdefault(peer, error)
            for (p, _), queue in self.posted.items():
                while p == peer and queue:
                    queue.popleft()[1].finish(self.broken[peer])
            self.lock.notify_all()

    def close(self) -> None:
        """Closes every connection of the epoch; pending works fail."""
        with self.listener.lock:
            self.listener.epochs.pop(self.prefix, None)
        with self.lock:
            self.closed = True
            socks = list(self.sockets)
            self.lock.notify_all()
        for s in self.senders.values():
            s.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        closing = CommError("the epoch's streams were closed")
        with self.lock:
            for queue in self.posted.values():
                while queue:
                    queue.popleft()[1].finish(closing)


class _Sender:
    """The outgoing connection to one peer and the thread that writes its frames in order."""

    def __init__(self, epoch: Epoch, peer: int, addr: str, timeout_s: float) -> None:
        self.epoch, self.peer, self.addr, self.timeout_s = epoch, peer, addr, timeout_s
        self.jobs: deque = deque()
        self.ready = threading.Condition()
        self.sock: socket.socket | None = None
        self.closed = False
        threading.Thread(target=self._run, daemon=True, name=f"streams to {peer}").start()

    def queue(self, tag: int, t: torch.Tensor, work: Work) -> None:
        with self.ready:
            if self.closed:
                work.finish(CommError(f"the stream to worker {self.peer} is closed"))
                return
            self.jobs.append((tag, t, work))
            self.ready.notify()

    def _connect(self) -> socket.socket:
        host, _, port = self.addr.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        e = self.epoch
        sig = e.listener.signer.sign(_hello_text(e.prefix, e.me, self.peer).encode()).hex()
        sock.sendall(json.dumps({"epoch": e.prefix, "from": e.me, "sig": sig}).encode() + b"\n")
        sock.settimeout(None)
        return sock

    def _run(self) -> None:
        error: BaseException | None = None
        while True:
            with self.ready:
                while not self.jobs and not self.closed:
                    self.ready.wait()
                if self.closed:
                    break
                tag, t, work = self.jobs.popleft()
            if error is not None:
                work.finish(error)
                continue
            try:
                if self.sock is None:
                    self.sock = self._connect()
                    with self.epoch.lock:
                        self.epoch.sockets.append(self.sock)
                data = memoryview(t.numpy()).cast("B")
                self.sock.sendall(FRAME.pack(tag, len(data)))
                self.sock.sendall(data)
                work.finish()
            except OSError as e:
                error = CommError(f"the stream to worker {self.peer} failed: {e}")
                work.finish(error)
        closing = CommError(f"the stream to worker {self.peer} was closed")
        with self.ready:
            while self.jobs:
                self.jobs.popleft()[2].finish(closing)

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _read_into(conn, memoryview(buf))
    return bytes(buf)


def _read_into(conn: socket.socket, view: memoryview) -> None:
    while len(view):
        got = conn.recv_into(view)
        if not got:
            raise OSError("connection closed")
        view = view[got:]
