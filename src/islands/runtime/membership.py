"""A worker's view of the membership: the coordinator client, or a fixed group (torchrun).

:class:`CoordinatorClient` keeps two authenticated connections to the coordinator: one for
heartbeats (a thread, every ``heartbeat_s``; the coordinator drops the worker when it closes
or falls silent) and one for the blocking round barriers. A lost coordinator is reconnected to
for up to ``reconnect_s``; if it came back as a new instance (a restart), the request raises
:class:`CoordinatorRestarted` so the worker aborts the round and re-enters at ``start``. A
coordinator unreachable for ``coordinator_timeout_s`` is gone for good (:class:`CoordinatorLost`:
the worker stops, exit 3); one that refuses the token is :class:`Unauthorized` at once (exit
2), never retried in a loop.

:class:`FixedMembership` is the same interface for a fixed group (``torchrun``): every barrier
returns everyone at once; a failure is fatal.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Callable

from islands.core.errors import AuthError, CommError, IslandsError, Stopping
from islands.core.signing import Signer
from islands.runtime.auth import Channel, client_connect


class CoordinatorRestarted(CommError):
    """The coordinator came back as a new instance: the round in flight is void."""


class Removed(IslandsError):
    """This worker cannot go on in the run: excluded (its contribution was refused), the
    job finished without it, or a round failed for good. Not a ``CommError``: no retry."""


class CoordinatorLost(Removed):
    """The coordinator could not be reached for ``runtime.coordinator_timeout_s``."""


class Unauthorized(IslandsError):
    """The coordinator refuses this worker's token: fatal at once (a retry cannot fix it)."""


class CoordinatorClient:
    """Talks to the coordinator for one worker.

    Args:
        addr: ``host:port`` of the coordinator.
        token: the shared secret.
        worker: this worker's id.
        store: ``[host, port]`` of this worker's rendezvous store (used when it leads an epoch).
        heartbeat_s: seconds between heartbeats.
        reconnect_s: how long to keep trying a lost coordinator.
        on_live: called from the heartbeat thread with the set of workers present (alive, or
            gone having trained their last round: a worker leaves only once its sends are
            done, so its peers' exchanges with it end on their own) and the
            ``time.monotonic()`` at which that heartbeat was sent.
        fingerprint: this worker's config fingerprint (:mod:`islands.runtime.fingerprint`).
        stopping: set by SIGTERM: a request waiting on the coordinator gives up at once
            (:class:`Stopping`) instead of holding the process.
        coordinator_timeout_s: unreachable this long, the coordinator is gone for good.
        signer: this process's key (an open job): its public half is registered at join, and
            every message this worker sends its peers is signed with it.
    """

    def __init__(self, addr: str, token: bytes, worker: int, store: list, *,
                 heartbeat_s: float = 0.1, reconnect_s: float = 30.0,
                 on_live: Callable[[set[int], float], None] | None = None,
                 fingerprint: dict | None = None,
                 stopping: threading.Event | None = None,
                 coordinator_timeout_s: float = 60.0, signer: Signer | None = None) -> None:
        self.addr, self.token, self.worker, self.store = addr, token, worker, store
        self.signer = signer
        self.host = store[0]  # the address peers reach this worker at (gloo binds there)
        self.coordinator_timeout_s = coordinator_timeout_s
        self._lost_since: float | None = None  # since when no request has gone through
        self.heartbeat_s = heartbeat_s
        self.reconnect_s = reconnect_s
        self.on_live = on_live
        self.fingerprint = fingerprint or {}
        self.stopping = stopping or threading.Event()
        self.incarnation = secrets.token_hex(8)
        self.instance: str | None = None
        self._control: Channel | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _connect(self, channel: str) -> Channel:
        deadline = time.monotonic() + self.reconnect_s
        if self._lost_since is not None:  # no longer than the coordinator may be gone
            deadline = min(deadline, self._lost_since + self.coordinator_timeout_s)
        while True:
            try:
                ch = client_connect(self.addr, self.token,
                                    {"role": "worker", "id": self.worker, "channel": channel,
                                     "incarnation": self.incarnation, "store": self.store,
                                     "fingerprint": self.fingerprint,
                                     "key": self.signer.public if self.signer else ""})
                ch.sock.settimeout(None)
                return ch
            except AuthError as e:
                raise Unauthorized(f"{e}: every worker needs the coordinator's token "
                                   "(--token-file); stopping") from None
            except CommError:
                if self.stopping.is_set():
                    raise Stopping("asked to stop while connecting to the coordinator") \
                        from None
                if time.monotonic() > deadline or self._stop.is_set():
                    raise
                time.sleep(0.1)

    def start(self) -> CoordinatorClient:
        """Connects both channels and starts the heartbeat thread."""
        self._control = self._connect("control")
        self.instance = self._control_instance()
        threading.Thread(target=self._heartbeats, daemon=True, name="heartbeat").start()
        return self

    def _control_instance(self) -> str | None:
        return self.request_raw({"op": "hb"}).get("instance")

    def request_raw(self, req: dict) -> dict:
        with self._lock:
            self._control.send(req)
            reply = self._control.recv(stop=self.stopping)
        self._lost_since = None
        if reply.get("removed"):
            raise Removed(reply["error"])
        if reply.get("error"):
            raise CommError(f"coordinator refused {req.get('op')}: {reply['error']}")
        return reply

    def request(self, op: str, **fields) -> dict:
        """Sends one barrier request and waits for its result (reconnecting if needed).

        Raises:
            CoordinatorRestarted: the coordinator is a new instance, or it had dropped this
                worker (a hang, a lost network); either way this worker re-registers under a
                new incarnation and must re-enter at ``start`` as a joiner.
        """
        try:
            return self.request_raw({"op": op, **fields})
        except Stopping:
            raise
        except CommError as e:
            if "dropped" in str(e) or "superseded" in str(e):
                self.incarnation = secrets.token_hex(8)
                self._control.close()
                self._reconnect()
                raise CoordinatorRestarted(f"this worker was dropped ({e}); rejoining") \
                    from None
            if "refused" in str(e):
                raise
        self._control.close()
        self._reconnect()
        instance = self._control_instance()
        if instance != self.instance:
            self.instance = instance
            raise CoordinatorRestarted(f"coordinator restarted (instance {instance}); "
                                       "the round in flight is aborted")
        return self.request_raw({"op": op, **fields})

    def _reconnect(self) -> None:
        """A new control connection; gives up for good once the coordinator has been
        unreachable for ``coordinator_timeout_s``."""
        if self._lost_since is None:
            self._lost_since = time.monotonic()
        try:
            self._control = self._connect("control")
        except Stopping:
            raise
        except CommError as e:
            lost = time.monotonic() - self._lost_since
            if lost >= self.coordinator_timeout_s:
                raise CoordinatorLost(
                    f"the coordinator at {self.addr} has been unreachable for {lost:.0f} s "
                    f"(runtime.coordinator_timeout_s = {self.coordinator_timeout_s:g}): it is "
                    f"gone; this worker stops ({e})") from None
            raise

    def _heartbeats(self) -> None:
        ch = None
        while not self._stop.is_set():
            try:
                if ch is None:
                    ch = self._connect("heartbeat")
                    ch.incarnation = self.incarnation
                sent_at = time.monotonic()
                ch.send({"op": "hb"})
                reply = ch.recv()
                if reply.get("error") or ch.incarnation != self.incarnation:
                    raise CommError(reply.get("error", "re-registered"))
                if self.on_live is not None and "live" in reply:
                    self.on_live(set(reply["live"]) | set(reply.get("finished", ())), sent_at)
            except (CommError, Unauthorized):  # the main thread reports what is fatal
                if ch is not None:
                    ch.close()
                ch = None
            self._stop.wait(self.heartbeat_s)
        if ch is not None:
            ch.close()

    def leave(self, finished: bool = False) -> dict | None:
        """Leaves the membership gracefully (the others continue without this worker);
        returns the coordinator's view of the job (``Coordinator.job_view``), None if it
        could not be reached.

        ``finished``: this worker trained its last round. Its peers do not take its departure
        for a failure: a sampled run's last round may still be receiving the state it sent.

        On a connection of its own: the control connection may still be held by a barrier
        this worker gave up waiting on (SIGTERM).
        """
        if self._control is None:  # never joined
            return None
        try:
            ch = client_connect(self.addr, self.token,
                                {"role": "worker", "id": self.worker, "channel": "leave",
                                 "incarnation": self.incarnation, "store": self.store,
                                 "fingerprint": self.fingerprint}, timeout_s=2.0)
            try:
                ch.send({"op": "leave", "finished": finished})
                return ch.recv().get("job")
            finally:
                ch.close()
        except CommError:
            return None

    def close(self) -> None:
        self._stop.set()
        if self._control is not None:
            self._control.close()


class FixedMembership:
    """A fixed group (``torchrun``): all ``world`` workers, one epoch, no failures tolerated."""

    def __init__(self, world: int) -> None:
        self.members = list(range(world))

    def request(self, op: str, **fields) -> dict:
        base = {"epoch": 1, "members": self.members, "prefix": "fixed/1", "store": None}
        if op == "start":
            return {**base, "round": fields["round"], "src": 0, "need_state": [],
                    "hash": fields["hash"]}
        if op == "ready":
            return {**base, "left_out": []}
        return {**base, "commit": bool(fields["ok"]), "hash": fields["hash"], "mismatched": []}

    def leave(self, finished: bool = False) -> None:
        """No coordinator: nothing to tell."""

    def close(self) -> None:
        pass
