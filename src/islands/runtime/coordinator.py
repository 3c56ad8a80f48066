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

The coordinator refuses, at the handshake, a worker whose config fingerprint differs from the
job's (:mod:`islands.runtime.fingerprint`) and a second process claiming the id of a worker
that is alive (heartbeat within ``heartbeat_timeout_s``). In an open job each worker registers
its public key in its hello, and ``ready`` records each member's aggregation weight; barrier
results give both to the members. A member whose contribution another member refused
(``PeerRefused``) is *excluded* when the refusal holds up (:mod:`islands.runtime.evidence`:
signed evidence the coordinator checks, or a majority of accusers, or its own contribution
failed to encode); evidence that proves nothing excludes the accuser; a lone accusation
without evidence has both sides sit out the retry (``disputes``), and a worker at odds in
such disputes, over the run, with at least two and more than half of its fellow members is
excluded (an honest majority is at odds only with the dishonest). A worker named by a
majority of the members' judges (the engine's influence rule) is excluded after the commit.
The round is retried without the excluded, the exclusion is recorded (``status()``,
``metrics.jsonl``), and the excluded process is told why; it can come back only as a new
process (a clean restart). A round that fails ``max_attempts`` times without a change
of members fails the run instead of looping. With ``deadline_s`` the ``start`` barrier too
releases that long after its first arrival, so a straggler holds nobody back; once the job's
last round is committed, a worker still behind is told the job finished without it.

Whenever a result's members differ from the current ones the epoch advances; workers build a
fresh process group per epoch (store prefix ``instance/epoch``). A worker is dropped when its
heartbeat connection closes (a crash) or stays silent ``heartbeat_timeout_s`` (a hang, a lost
network), which releases any barrier waiting on it.
"""

from __future__ import annotations

import logging
import math
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from statistics import median

from islands.core.errors import AuthError, CommError
from islands.core.sections import SAMPLING_KEYS
from islands.runtime.auth import MAX_MEMBER_LINE_BYTES, Channel, server_handshake
from islands.runtime.fingerprint import COORDINATOR_READS, refusal
from islands.runtime.posts import PostOrder
from islands.runtime.rounds import Barrier, RoundRules

log = logging.getLogger("islands.coordinator")

# the config keys a coordinator started without a config takes from the first worker: its
# [runtime] keys, and the straggler policy (job-wide algorithm keys, in every fingerprint)
ADOPTED = {"runtime.heartbeat_timeout_s": "heartbeat_timeout_s",
           "runtime.join_timeout_s": "join_timeout_s", "runtime.round_deadline_s": "deadline_s",
           "runtime.max_attempts": "max_attempts", "algorithm.min_quorum": "min_quorum",
           "algorithm.grace_s": "grace_s"}
assert set(COORDINATOR_READS) <= set(ADOPTED)

# How often liveness is checked (heartbeats, deadlines), and the longest a request waiting at
# a barrier sleeps without a wake-up; a release wakes its waiters at once (notify_all).
TICK_S = 0.02
WAIT_S = 0.05


@dataclass
class Member:
    incarnation: str
    store: list
    last_seen: float
    alive: bool = True
    finished: bool = False  # it left having trained its last round (its exchanges are done)
    key: str = ""  # its Ed25519 public key (hex; an open job's members sign their messages)


class Coordinator(RoundRules):
    """The membership service. Construct, then :meth:`start` (or use as a context manager).

    Args:
        host: interface to bind.
        port: TCP port (0 picks a free one; see :attr:`port` after start).
        token: the shared secret.
        heartbeat_timeout_s: drop a worker silent this long.
        deadline_s: the ``ready`` barrier's straggler deadline (None: wait for all).
        min_quorum, grace_s: the straggler policy (``algorithm.min_quorum``, ``grace_s``): a
            ``ready`` barrier goes ahead once ``min_quorum`` members are there and ``grace_s``
            more seconds have passed (0: wait for all, or for the deadline).
        join_timeout_s: how long ``wait_for`` may hold a start barrier.
        handshake_timeout_s: a new connection that has not authenticated by then is closed.
        fingerprint: the job's config fingerprint (None: the first worker's).
        max_attempts: attempts of one round without a change of members before the run
            fails (it never loops).
        adopt_settings: take ``heartbeat_timeout_s``, ``join_timeout_s``, ``deadline_s`` and
            ``max_attempts`` from the first worker's config (its ``[runtime]`` keys the
            coordinator reads), as a coordinator started without a config does.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 29400, *, token: bytes = b"",
                 heartbeat_timeout_s: float = 1.0, deadline_s: float | None = None,
                 join_timeout_s: float = 60.0, handshake_timeout_s: float = 2.0,
                 fingerprint: dict | None = None, max_attempts: int = 5,
                 min_quorum: int = 0, grace_s: float = 0.0,
                 adopt_settings: bool = False) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s ({heartbeat_timeout_s}) must be > 0")
        self.host, self.port, self.token = host, port, token
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.deadline_s = deadline_s
        self.min_quorum, self.grace_s = min_quorum, grace_s
        self.join_timeout_s = join_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.fingerprint = dict(fingerprint or {})
        self.max_attempts = max_attempts
        self.adopt_settings = adopt_settings
        self.excluded: dict[int, dict] = {}  # worker -> {"by", "why", "round"}
        self.disputes: list[dict] = []  # accusations no evidence settled (both sides sat out)
        self.at_odds: dict[int, set[int]] = {}  # {worker: the others it disputed, over the run}
        self.statistics: dict[int, dict] = {}  # worker -> its latest committed statistics
        self.refusals: deque = deque(maxlen=20)  # the latest refused joins, with why
        self._commits: deque = deque(maxlen=50)  # (unix time, seconds the round took)
        self._behind: set[int] = set()  # left out of a round, still computing it
        self.instance = secrets.token_hex(4)
        self.members: dict[int, Member] = {}
        self.epochs: deque = deque(maxlen=1024)  # the members over time, epoch by epoch
        self.rounds_committed = 0
        self.aborted_attempts = 0
        self.epoch = 0
        self.current: tuple[int, ...] = ()
        self.last_round = -1
        self._last_committers: frozenset[int] = frozenset()  # of the last round committed
        self.refused = 0
        self.hash_mismatches = 0
        self._barriers: dict[tuple, Barrier] = {}
        self._open_start: Barrier | None = None
        # the round between its start and its commit: {"round", "members", "src", "joiners"}
        self._in_flight: dict | None = None
        self._posts: PostOrder | None = None  # an asynchronous job's order (async_posts)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None

    def start(self) -> Coordinator:
        """Binds the port and starts the accept and liveness threads."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((self.host, self.port))
        except OSError as e:
            self._sock.close()
            raise CommError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e} "
                            "(another coordinator on that port? choose --port)") from None
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

    def job_view(self) -> dict:
        """The job as this coordinator saw it (the merged ``summary.json``'s
        ``coordinator``): the members of every epoch from the round it started at, rounds
        committed, aborted attempts, exclusions, refused joins and hash mismatches."""
        with self._cond:
            return {"instance": self.instance, "epochs": list(self.epochs),
                    "rounds_committed": self.rounds_committed,
                    "aborted_attempts": self.aborted_attempts, "last_round": self.last_round,
                    "excluded": {str(w): e for w, e in sorted(self.excluded.items())},
                    "disputes": list(self.disputes),
                    "refused_joins": list(self.refusals),
                    "hash_mismatches": self.hash_mismatches,
                    **({"async_posts": list(self._posts.log)} if self._posts else {})}

    def status(self) -> dict:
        """Members, epoch, the round in flight and for how long, the last commit, the
        median round time, exclusions and refused joins."""
        with self._cond:
            f, now = self._in_flight, time.monotonic()
            last = self._commits[-1] if self._commits else None
            return {"instance": self.instance, "epoch": self.epoch,
                    "members": sorted(self.current),
                    "live": sorted(i for i, m in self.members.items() if m.alive),
                    "last_round": self.last_round,
                    "round_in_flight": f["round"] if f else None,
                    # joiners healing into the round in flight (observers of it)
                    "healing": sorted(f["joiners"]) if f else [],
                    "round_in_flight_s": now - f["since"] if f else None,
                    "last_commit_unix": last[0] if last else None,
                    "median_round_s": median(c[1] for c in self._commits) if self._commits
                    else None,
                    "excluded": {str(w): e for w, e in sorted(self.excluded.items())},
                    "disputes": list(self.disputes),
                    # distance/cosine to the aggregate, influence (robust rules), per worker
                    "workers": {str(w): s for w, s in sorted(self.statistics.items())},
                    "refused_joins": list(self.refusals),
                    "refused_connections": self.refused,
                    "hash_mismatches": self.hash_mismatches,
                    **({"async": self._posts.progress()} if self._posts else {})}

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
            if hello.get("role") == "worker":
                why = self._register(wid, hello)
                if why is not None:
                    raise CommError(why)
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
        if hello.get("role") == "worker":  # a commit may carry a verifier's evidence
            ch.max_line_bytes = MAX_MEMBER_LINE_BYTES
        try:
            while True:
                req = ch.recv()
                ch.send(self._handle(hello, req))
        except CommError:
            pass
        finally:
            ch.close()
            if hello.get("role") == "worker" and hello.get("channel") == "heartbeat":
                self._drop(wid, hello.get("incarnation"), "connection closed")

    def _register(self, wid: int, hello: dict) -> str | None:
        """Registers a worker's connection; returns why it is refused (None: accepted)."""
        with self._cond:
            m, now = self.members.get(wid), time.monotonic()
            incarnation = str(hello.get("incarnation"))
            if m is not None and m.incarnation == incarnation:
                m.last_seen = now
                return None
            if m is not None and m.alive and now - m.last_seen <= self.heartbeat_timeout_s:
                why = (f"worker id {wid} is held by a live process (its last heartbeat "
                       f"{now - m.last_seen:.2f} s ago); give this one another --worker-id, "
                       "or stop that one first")
                self.refusals.append({"worker": wid, "why": why})
                return why
            why = self._check_fingerprint(hello.get("fingerprint"))
            key = hello.get("key") or ""
            if why is None and not _is_key(key):
                why = "hello with a malformed public key (64 hex digits expected)"
            if why is not None:
                self.refusals.append({"worker": wid, "why": why})
                return why
            if m is not None and m.alive:
                log.info("worker %d restarted (new incarnation)", wid)
            self.excluded.pop(wid, None)  # a clean restart may come back
            self.members[wid] = Member(incarnation, list(hello.get("store", [])), now, key=key)
            log.info("worker %d joined from store %s", wid, hello.get("store"))
            self._cond.notify_all()
            return None

    def _check_fingerprint(self, fp) -> str | None:
        """Refuses a fingerprint that differs from the job's; learns the job's keys it lacks
        (the first worker's, or the derived ones a coordinator's own config cannot give)."""
        if not isinstance(fp, dict):
            return "hello without a config fingerprint (an older islands?); upgrade the worker"
        why = refusal(self.fingerprint, fp)
        if why is None:
            learned = {k: v for k, v in fp.items() if k not in self.fingerprint}
            self.fingerprint.update(learned)
            if self.adopt_settings:
                self._adopt({k: v for k, v in learned.items() if k in ADOPTED})
        return why

    def _adopt(self, settings: dict) -> None:
        """The keys this coordinator reads, from the first worker's config."""
        for key, value in settings.items():
            setattr(self, ADOPTED[key], value)
        if settings:
            log.info("coordinator: adopted the first worker's %s", ", ".join(
                f"{k}={v}" for k, v in sorted(settings.items())))

    def _drop(self, wid: int, incarnation, why: str) -> None:
        with self._cond:
            m = self.members.get(wid)
            if m is not None and m.alive and m.incarnation == incarnation:
                m.alive = False
                log.warning("worker %d dropped: %s", wid, why)
                self._check()
                self._cond.notify_all()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
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
            if wid in self.excluded:
                e = self.excluded[wid]
                who = "the coordinator" if e["by"] == "coordinator" else f"worker {e['by']}"
                return {"error": f"excluded from the run at round {e['round']} by {who}: "
                                 f"{e['why']}; fix the cause and restart it to rejoin",
                        "removed": True}
            if not m.alive and op != "leave":
                return {"error": "dropped from the membership; restart to rejoin"}
            if op == "hb":
                return {"live": sorted(i for i, x in self.members.items() if x.alive),
                        "finished": sorted(i for i, x in self.members.items() if x.finished),
                        "epoch": self.epoch, "instance": self.instance}
            if op == "leave":
                m.alive = False
                m.finished = req.get("finished") is True
                log.info("worker %d left%s", wid, " after its last round" if m.finished else "")
                self._check()
                self._cond.notify_all()
                return {"ok": True, "job": self.job_view()}  # for the worker's summary
            if op in ("start", "ready", "commit"):
                return self._arrive(op, wid, req)
            if op == "post":
                return self._post(wid, req)
            if op == "posts_end":
                return self._posts_end(wid, req)
        return {"error": f"unknown op {op!r}"}

    # --- an asynchronous job's updates (islands.runtime.posts) ----------------------------

    def async_posts(self) -> PostOrder | None:
        """The order of an asynchronous job's updates (None: the job has rounds)."""
        if self.fingerprint.get("algorithm.name") != "async_local_sgd":
            return None
        if self._posts is None:
            self._posts = PostOrder(self.fingerprint)
        return self._posts

    def _regroup_due(self) -> bool:
        """An asynchronous job's members must regroup: one of them is gone (not having
        finished), or a worker waits at ``start`` (a joiner, or a member that failed)."""
        gone = [i for i in self.current
                if i not in self.members or not (self.members[i].alive
                                                 or self.members[i].finished)]
        return bool(gone) or (self._open_start is not None and bool(self._open_start.arrivals))

    def _post(self, wid: int, req: dict) -> dict:
        """A member's update is done: its place in the order (:meth:`PostOrder.post`), the
        posters of the updates before it that it has not applied, its next inner steps; or
        ``regroup``."""
        posts = self.async_posts()
        if posts is None:
            return {"error": "post: this job has rounds (algorithm.name is not "
                             "async_local_sgd)"}
        ints = [req.get(k) for k in ("steps", "pulled", "applied")]
        rate = req.get("rate")
        if (not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints)
                or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0):
            return {"error": "post: steps, pulled and applied must be integers >= 0, rate a "
                             "number >= 0"}
        if wid not in self.current or self._regroup_due():
            return {"regroup": True}
        out = posts.post(wid, req["steps"], req["pulled"], float(rate), self.current)
        if "error" in out:
            return out
        upto = out["seq"] if out["kept"] else len(posts.posters)
        self._cond.notify_all()  # a member waiting for the end
        return {**out, "posters": posts.posters[req["applied"]:upto], "spent": posts.spent}

    def _posts_end(self, wid: int, req: dict) -> dict:
        """A member with no inner steps left: held until every member has posted its last
        update, then the posters of those it has not applied; or ``regroup``."""
        posts, applied = self.async_posts(), req.get("applied")
        if posts is None or not isinstance(applied, int) or applied < 0:
            return {"error": "posts_end: an asynchronous job's member, with applied >= 0"}
        while not posts.done and not self._regroup_due() and not self._stop.is_set():
            self._cond.wait(WAIT_S)
        if not posts.done or wid not in self.current:
            return {"regroup": True}
        return {"posters": posts.posters[applied:], "spent": posts.spent}

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
            self._behind.discard(wid)
            rounds = self.fingerprint.get("rounds")
            if isinstance(rounds, int) and self.last_round >= rounds - 1:
                return {"finished": True, "last_round": self.last_round}
            healed = self._heal_into_round(wid, req)
            if healed is not None:
                return healed
            if self._open_start is None:
                self._open_start = Barrier("start", ("start", time.monotonic()), None)
            b = self._open_start
        else:
            key = (op, int(req["round"]), int(req["attempt"]))
            declared = frozenset(int(i) for i in req.get("members", ()))
            known = self._known_members(key)
            if known is not None and not known[0] <= declared <= known[1]:
                return self._misreported(wid, key, declared, known)
            if known is not None and wid not in known[1]:
                return {"error": f"worker {wid} is not a member of round {key[1]} attempt "
                                 f"{key[2]} (it sits out the retry)"}
            b = self._barriers.get(key)
            if b is None:
                # the members the coordinator released the round or attempt with; where it
                # cannot tell (restarted, or a partial participation it does not draw), the
                # first arrival's: this survives a coordinator restart.
                expected = known[1] if known is not None else declared
                f = self._in_flight
                if op == "ready" and f is not None and f["round"] == key[1]:
                    expected |= f["joiners"]  # observers admitted before the first arrival
                b = self._barriers[key] = Barrier(op, key, expected)
                self._gc()
        b.arrivals[wid] = req
        self._check()
        self._cond.notify_all()  # a release wakes its waiters now, not at the next tick
        member = self.members[wid]
        while b.result is None and not self._stop.is_set() and member.alive:
            self._cond.wait(WAIT_S)
        if b.result is None and not member.alive:  # it left or was dropped meanwhile
            return {"error": "dropped from the membership while waiting; restart to rejoin"}
        if b.result is not None and wid in b.result.get("healing", ()):
            return self._heal_reply(b.result["round"], b.result["src"],
                                    set(b.result["members"]) | set(b.result["healing"]))
        return b.result or {"error": "coordinator stopping"}

    def _known_members(self, key: tuple) -> tuple[frozenset, frozenset] | None:
        """The members a ``ready`` or ``commit`` of ``key`` must declare, as the coordinator
        released them (the least and the most: observers admitted mid-round may or may not be
        in a declaration); None where it cannot tell."""
        op, r, attempt = key
        if op == "commit":
            ready = self._barriers.get(("ready", r, attempt))
            got = None if ready is None or ready.result is None else ready.result["members"]
        elif attempt > 0:
            commit = self._barriers.get(("commit", r, attempt - 1))
            got = None if commit is None or commit.result is None else commit.result["members"]
        else:
            f = self._in_flight
            if f is None or f["round"] != r or self.sampled:
                return None
            return f["members"], f["members"] | f["joiners"]
        return None if got is None else (frozenset(got), frozenset(got))

    @property
    def sampled(self) -> bool:
        """Whether the algorithm draws a sample of the members each round (FedAvg's
        ``participation``, MoDeST's ``sample_fraction``): then only the last round's
        participants hold its state."""
        return any(float(self.fingerprint.get(f"algorithm.{k}", 1.0)) < 1.0
                   for k in SAMPLING_KEYS)

    def _misreported(self, wid: int, key: tuple, declared: frozenset, known) -> dict:
        """A member declared other members than the coordinator released: it is excluded
        (its declaration would leave the others out of the round)."""
        why = (f"it declared members {sorted(declared)} at {key[0]} of round {key[1]}, the "
               f"coordinator released {sorted(known[1])}")
        self._exclude(wid, {"by": "coordinator", "round": key[1], "why": why})
        self._check()
        self._cond.notify_all()
        return {"error": f"excluded from the run at round {key[1]}: {why}", "removed": True}

    def _keys(self, members) -> dict[str, str]:
        """The registered public keys of ``members`` (for a barrier's result)."""
        return {str(i): self.members[i].key for i in members
                if i in self.members and self.members[i].key}

    def _gc(self) -> None:
        while len(self._barriers) > 64:
            self._barriers.pop(next(iter(self._barriers)))


def _is_key(key) -> bool:
    if not isinstance(key, str) or len(key) not in (0, 64):
        return False
    try:
        bytes.fromhex(key)
    except ValueError:
        return False
    return True
