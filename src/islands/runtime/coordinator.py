"""The coordinator: membership, epochs and the round barriers of the real runtime.

Run it: ``islands coordinator --port 29400 --token-file secret.txt``.

It never touches a tensor. Workers connect over TCP (authenticated, see
:mod:`islands.runtime.auth`), send heartbeats on one connection and block on barriers on
another. Each round passes three barriers, as torchft's quorum and ``should_commit``:

* ``start``: every live worker arrives with its committed round and state hash. Released when
  all live workers are there (the first round also waits for ``wait_for`` workers or
  ``join_timeout_s``). The result names the round, the members, and who must receive the
  committed state from whom (joiners, workers left behind, hash mismatches: repaired from
  the majority).
  A joiner that asks to ``heal`` while a round is in flight (its ``ready`` not yet released)
  is answered at once and joins *that* round as an observer, as torchft's healing replicas
  do: at ``ready`` it receives the committed state from a member, then takes part in the
  collective with weight 0 and commits the round with the others. One that asks at a round
  boundary observes the round that starts (``healing`` in the result), the same way.
* ``ready``: after the inner steps. Released when every member is there, or when
  ``deadline_s`` has passed since the first arrival (stragglers are left out of the round).
  The result names the round's observers and who sends them the state (``heal``).
* ``commit``: after the collective. The round commits only if every member reported success;
  otherwise the survivors retry the collective in a new epoch. Reported hashes are compared.

Whenever a result's members differ from the current ones the epoch advances; workers build a
fresh process group per epoch (store prefix ``instance/epoch``). A worker is dropped when its
heartbeat connection closes (a crash) or stays silent ``heartbeat_timeout_s`` (a hang, a lost
network), which releases any barrier waiting on it.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from islands.core.errors import AuthError, CommError
from islands.runtime.auth import Channel, server_handshake

log = logging.getLogger("islands.coordinator")


@dataclass
class Member:
    incarnation: str
    store: list
    last_seen: float
    alive: bool = True


@dataclass
class Barrier:
    kind: str
    key: tuple
    expected: frozenset | None  # None: every live worker (start)
    opened: float = field(default_factory=time.monotonic)
    arrivals: dict = field(default_factory=dict)
    result: dict | None = None


class Coordinator:
    """The membership service. Construct, then :meth:`start` (or use as a context manager).

    Args:
        host: interface to bind.
        port: TCP port (0 picks a free one; see :attr:`port` after start).
        token: the shared secret.
        heartbeat_timeout_s: drop a worker silent this long.
        deadline_s: the ``ready`` barrier's straggler deadline (None: wait for all).
        join_timeout_s: how long ``wait_for`` may hold a start barrier.
        handshake_timeout_s: a new connection that has not authenticated by then is closed.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 29400, *, token: bytes = b"",
                 heartbeat_timeout_s: float = 1.0, deadline_s: float | None = None,
                 join_timeout_s: float = 60.0, handshake_timeout_s: float = 2.0) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s ({heartbeat_timeout_s}) must be > 0")
        self.host, self.port, self.token = host, port, token
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.deadline_s = deadline_s
        self.join_timeout_s = join_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.instance = secrets.token_hex(4)
        self.members: dict[int, Member] = {}
        self.epoch = 0
        self.current: tuple[int, ...] = ()
        self.last_round = -1
        self.refused = 0
        self.hash_mismatches = 0
        self._barriers: dict[tuple, Barrier] = {}
        self._open_start: Barrier | None = None
        # the round between its start and its commit: {"round", "members", "src", "joiners"}
        self._in_flight: dict | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None

    def start(self) -> Coordinator:
        """Binds the port and starts the accept and liveness threads."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, self.port))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="accept").start()
        threading.Thread(target=self._tick, daemon=True, name="liveness").start()
        log.info("coordinator %s listening on %s:%d", self.instance, self.host, self.port)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def status(self) -> dict:
        with self._cond:
            return {"instance": self.instance, "epoch": self.epoch,
                    "members": sorted(self.current),
                    "live": sorted(i for i, m in self.members.items() if m.alive),
                    "last_round": self.last_round,
                    "round_in_flight": self._in_flight["round"] if self._in_flight else None,
                    "refused_connections": self.refused,
                    "hash_mismatches": self.hash_mismatches}

    # --- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True).start()

    def _serve(self, conn: socket.socket, addr) -> None:
        ch = Channel(conn, timeout_s=self.handshake_timeout_s)  # the handshake must be quick
        try:
            hello = server_handshake(ch, self.token)
            wid = hello.get("id")
            if hello.get("role") == "worker":
                store = hello.get("store")
                if not isinstance(wid, int) or isinstance(wid, bool) or wid < 0:
                    raise CommError(f"hello without a worker id >= 0 ({wid!r})")
                if not (isinstance(store, list) and len(store) == 2
                        and isinstance(store[0], str) and isinstance(store[1], int)):
                    raise CommError(f"hello with a malformed store address ({store!r})")
        except (AuthError, CommError) as e:
            with self._cond:
                self.refused += 1
            log.warning("refused connection from %s:%d: %s", addr[0], addr[1], e)
            try:
                ch.send({"error": str(e)})
            except CommError:
                pass
            ch.close()
            return
        ch.send({"ok": True, "instance": self.instance})
        ch.sock.settimeout(None)
        try:
            if hello.get("role") == "worker":
                self._register(wid, hello)
            while True:
                req = ch.recv()
                ch.send(self._handle(hello, req))
        except CommError:
            pass
        finally:
            ch.close()
            if hello.get("role") == "worker" and hello.get("channel") == "heartbeat":
                self._drop(wid, hello.get("incarnation"), "connection closed")

    def _register(self, wid: int, hello: dict) -> None:
        with self._cond:
            m = self.members.get(wid)
            if m is None or m.incarnation != hello.get("incarnation"):
                if m is not None and m.alive:
                    log.info("worker %d restarted (new incarnation)", wid)
                self.members[wid] = Member(str(hello.get("incarnation")),
                                           list(hello.get("store", [])), time.monotonic())
                log.info("worker %d joined from store %s", wid, hello.get("store"))
            else:
                m.last_seen = time.monotonic()
            self._cond.notify_all()

    def _drop(self, wid: int, incarnation, why: str) -> None:
        with self._cond:
            m = self.members.get(wid)
            if m is not None and m.alive and m.incarnation == incarnation:
                m.alive = False
                log.warning("worker %d dropped: %s", wid, why)
                self._check()
                self._cond.notify_all()

    def _tick(self) -> None:
        while not self._stop.wait(0.02):
            now = time.monotonic()
            with self._cond:
                for wid, m in self.members.items():
                    if m.alive and now - m.last_seen > self.heartbeat_timeout_s:
                        m.alive = False
                        log.warning("worker %d dropped: no heartbeat for %.2f s", wid,
                                    now - m.last_seen)
                self._check()
                self._cond.notify_all()

    # --- requests ------------------------------------------------------------------------

    def _handle(self, hello: dict, req: dict) -> dict:
        op, wid = req.get("op"), hello.get("id")
        if op == "status":
            return self.status()
        if hello.get("role") != "worker":
            return {"error": f"op {op!r} needs a worker connection"}
        with self._cond:
            m = self.members.get(wid)
            if m is None or m.incarnation != hello.get("incarnation"):
                return {"error": "superseded by a newer incarnation of this worker"}
            m.last_seen = time.monotonic()
            if not m.alive and op != "leave":
                return {"error": "dropped from the membership; restart to rejoin"}
            if op == "hb":
                return {"live": sorted(i for i, x in self.members.items() if x.alive),
                        "epoch": self.epoch, "instance": self.instance}
            if op == "leave":
                m.alive = False
                log.info("worker %d left", wid)
                self._check()
                self._cond.notify_all()
                return {"ok": True}
            if op in ("start", "ready", "commit"):
                return self._arrive(op, wid, req)
        return {"error": f"unknown op {op!r}"}

    @staticmethod
    def _malformed(op: str, req: dict) -> str | None:
        """Why a barrier request cannot be used (None: it can)."""
        ints = {"start": ("round", "wait_for"), "ready": ("round", "attempt"),
                "commit": ("round", "attempt")}[op]
        for k in ints:
            if not isinstance(req.get(k), int) or isinstance(req.get(k), bool) or req[k] < 0:
                return f"{op}: {k} must be an integer >= 0"
        if op == "start" and not isinstance(req.get("hash"), str):
            return "start: hash must be a string"
        members = req.get("members", [])
        if op != "start" and (not isinstance(members, list)
                              or not all(isinstance(i, int) for i in members)):
            return f"{op}: members must be a list of worker ids"
        return None

    def _arrive(self, op: str, wid: int, req: dict) -> dict:
        """Adds ``wid`` to its barrier and waits (lock held, released while waiting)."""
        why = self._malformed(op, req)
        if why is not None:
            log.warning("worker %d: malformed request refused: %s", wid, why)
            return {"error": why}
        if op == "start":
            healed = self._heal_into_round(wid, req)
            if healed is not None:
                return healed
            if self._open_start is None:
                self._open_start = Barrier("start", ("start", time.monotonic()), None)
            b = self._open_start
        else:
            key = (op, int(req["round"]), int(req["attempt"]))
            b = self._barriers.get(key)
            if b is None:
                # the first arrival declares the members it expects (its epoch's, or the
                # ready barrier's result): this survives a coordinator restart.
                expected = frozenset(int(i) for i in req.get("members", ()))
                f = self._in_flight
                if op == "ready" and f is not None and f["round"] == key[1]:
                    expected |= f["joiners"]  # observers admitted before the first arrival
                b = self._barriers[key] = Barrier(op, key, expected)
                self._gc()
        b.arrivals[wid] = req
        self._check()
        while b.result is None and not self._stop.is_set():
            self._cond.wait(0.05)
        if b.result is not None and wid in b.result.get("healing", ()):
            return self._heal_reply(b.result["round"], b.result["src"],
                                    set(b.result["members"]) | set(b.result["healing"]))
        return b.result or {"error": "coordinator stopping"}

    def _gc(self) -> None:
        while len(self._barriers) > 64:
            self._barriers.pop(next(iter(self._barriers)))

    def _check(self) -> None:
        live = {i for i, m in self.members.items() if m.alive}
        now = time.monotonic()
        b = self._open_start
        if b is not None and b.result is None:
            here = live & set(b.arrivals)
            need = max((int(r.get("wait_for", 1)) for i, r in b.arrivals.items() if i in here),
                       default=1) if self.epoch == 0 else 1  # only this instance's first
            waited = now - b.opened
            if here and live <= here and (len(here) >= need or waited > self.join_timeout_s):
                b.result = self._release_start(b, here)
                self._open_start = None
        # a worker back at `start` (it aborted its round) is no longer awaited elsewhere
        at_start = set(self._open_start.arrivals) if self._open_start is not None else set()
        for b in list(self._barriers.values()):
            if b.result is not None:
                continue
            here = live & set(b.arrivals)
            waiting = (b.expected & live) - here - at_start
            late = (b.kind == "ready" and self.deadline_s is not None and here
                    and now - b.opened > self.deadline_s)
            if not waiting or late:
                b.result = (self._release_ready(b, here) if b.kind == "ready"
                            else self._release_commit(b, here))

    def _new_epoch(self, members: tuple[int, ...]) -> dict:
        if members != self.current:
            self.epoch += 1
            self.current = members
        leader = self.members[members[0]] if members else None
        return {"epoch": self.epoch, "members": list(members),
                "prefix": f"{self.instance}/{self.epoch}",
                "store": leader.store if leader else None}

    def _heal_into_round(self, wid: int, req: dict) -> dict | None:
        """Admits a healing joiner into the round in flight (None: it waits for the next)."""
        f = self._in_flight
        if not req.get("heal") or f is None or wid in f["members"]:
            return None
        ready = self._barriers.get(("ready", f["round"], 0))
        if ready is not None and ready.result is not None:
            return None  # its collective is formed: too late to take part
        f["joiners"].add(wid)
        if ready is not None:
            ready.expected = ready.expected | {wid}
        log.info("worker %d heals into round %d (in flight, members %s)", wid, f["round"],
                 sorted(f["members"]))
        return self._heal_reply(f["round"], f["src"], f["members"] | f["joiners"])

    @staticmethod
    def _heal_reply(round: int, src: int, members) -> dict:
        """What a healing joiner hears: the round it observes, its source, the members."""
        return {"heal": True, "round": round, "src": src, "members": sorted(members)}

    def _release_start(self, b: Barrier, here: set[int]) -> dict:
        reports = {i: b.arrivals[i] for i in here}
        top = max(int(r["round"]) for r in reports.values())
        hashes = Counter(r["hash"] for r in reports.values() if int(r["round"]) == top)
        majority = hashes.most_common(1)[0][0]
        good = sorted(i for i, r in reports.items()
                      if int(r["round"]) == top and r["hash"] == majority)
        stale = sorted(set(here) - set(good))
        for i in stale:
            if int(reports[i]["round"]) == top:
                self.hash_mismatches += 1
                log.warning("worker %d: shared-state hash mismatch at round %d; repairing "
                            "from worker %d (majority)", i, top, good[0])
        # joiners behind that asked to heal observe this round, as if they came mid-round:
        # they receive the state at its ready, so the members need not wait for them now
        healing = sorted(i for i in stale if reports[i].get("heal")
                         and int(reports[i]["round"]) < top)
        members = set(here) - set(healing)
        out = self._new_epoch(tuple(sorted(members)))
        self._in_flight = {"round": top, "members": frozenset(members), "src": good[0],
                           "joiners": set(healing)}
        return {**out, "round": top, "src": good[0], "hash": majority, "healing": healing,
                "need_state": [i for i in stale if i not in healing]}

    def _release_ready(self, b: Barrier, here: set[int]) -> dict:
        members = tuple(sorted(here))
        left_out = sorted(b.expected - here)
        if left_out:
            log.warning("round %d: committing without %s (deadline or gone)", b.key[1], left_out)
        out = {**self._new_epoch(members), "left_out": left_out}
        f = self._in_flight
        if f is not None and f["round"] == b.key[1]:
            observers = sorted(f["joiners"] & here)
            senders = sorted(here - f["joiners"])
            if observers and senders:
                src = f["src"] if f["src"] in senders else senders[0]
                out.update(observers=observers, heal={"src": src, "dsts": observers})
        return out

    def _release_commit(self, b: Barrier, here: set[int]) -> dict:
        ok = here == set(b.expected) and all(b.arrivals[i].get("ok") for i in here)
        hashes = Counter(b.arrivals[i].get("hash") for i in here if b.arrivals[i].get("ok"))
        majority = hashes.most_common(1)[0][0] if hashes else None
        mismatched = sorted(i for i in here if b.arrivals[i].get("ok")
                            and b.arrivals[i].get("hash") != majority)
        if ok:
            self.last_round = max(self.last_round, b.key[1])
            if self._in_flight is not None and self._in_flight["round"] == b.key[1]:
                self._in_flight = None
            if mismatched:
                self.hash_mismatches += len(mismatched)
                log.warning("round %d: hash mismatch on %s", b.key[1], mismatched)
            return {"commit": True, "hash": majority, "mismatched": mismatched,
                    "epoch": self.epoch, "members": sorted(here)}
        log.warning("round %d attempt %d aborted (members %s, arrived %s)", b.key[1], b.key[2],
                    sorted(b.expected), sorted(here))
        return {"commit": False, "hash": majority, "mismatched": mismatched,
                "epoch": self.epoch, "members": sorted(here)}
