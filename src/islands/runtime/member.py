"""One worker's side of the real runtime's round protocol: the engine's driver.

Each round passes the coordinator's three barriers (see :mod:`islands.runtime.coordinator`):

1. ``start``: learn the round and the members; joiners and workers whose state hash disagrees
   receive the committed shared state from a live worker (:func:`state.transfer`); a fresh
   worker may instead heal into the round in flight as a weight-0 observer.
2. the engine's inner steps, then ``ready``: the members of the collective (stragglers past
   the deadline and dead workers left out; a new epoch builds a new process group).
3. the engine's sync (contribute -> reduce -> apply), then ``commit`` with the new state's
   hash. If any member failed, everyone restores the shared state (no partial reduction is
   ever kept) and the survivors retry the collective with their local parameters.

An overlapped algorithm (``algorithm.overlap``): the sync of step 3 lands the previous round's
average, which crossed the wire on a thread while this round trained; after the commit the
engine issues this round's in the background. A failure of the one in flight surfaces where
it lands (the next round's sync, or a start that changes the group first) and loses that
round's update on every member alike; a worker left with a different state is repaired at
the next start, as any hash mismatch.

:class:`Member` implements :class:`islands.engine.Driver`; ``islands run`` drives it through
``Engine.run`` with the task's batches, the drop-in loop (:mod:`islands.runtime.join`) calls
the same methods from the user's own ``trainer.step()``.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from islands.algorithms import Worker
from islands.collectives.butterfly import Group, rule_of
from islands.core.config import RunConfig
from islands.core.errors import (
    CodecError,
    CommError,
    ConfigError,
    PeerRefused,
    Stopping,
    StorageError,
)
from islands.core.files import remove_temp
from islands.engine import Engine, RoundPlan
from islands.engine.attacks import COLLUDING
from islands.runtime import checkpoint, evidence, state
from islands.runtime.auth import derive
from islands.runtime.membership import CoordinatorRestarted, Removed
from islands.transports.dist import DistTransport, new_group, open_store
from islands.transports.streams import Listener

log = logging.getLogger("islands.worker")


class Excluded(CommError):
    """This worker was left out of the round (deadline or dropped); it rejoins at start."""


@dataclass
class Stats:
    """What a worker counts beyond bytes."""

    aborted_attempts: int = 0
    excluded_rounds: int = 0
    state_transfers: int = 0
    state_bytes: int = 0
    state_transfer_s: float = 0.0
    hash_mismatches: int = 0
    first_commit_unix: float | None = None
    joined_round: int | None = None
    rounds_committed: int = 0  # rounds this worker took part in and committed
    excluded_members: list = field(default_factory=list)  # who was excluded, by whom, why


def _keys(res: dict) -> dict[int, str]:
    """The members' public keys a barrier's result names."""
    return {int(k): str(v) for k, v in res.get("keys", {}).items()}


def member_transport(cfg: RunConfig, me: int, membership,
                     stopping: threading.Event) -> DistTransport:
    """A worker process's transport: in an open job with a coordinator, its messages signed
    with the membership's key and, with ``runtime.wire = "streams"`` (the default), carried
    on islands' own streams; otherwise (a trusted cluster, a torchrun group) gloo's pairs."""
    signer = getattr(membership, "signer", None)  # an open job with a coordinator
    streams = (Listener(membership.host, signer)
               if cfg.runtime.wire == "streams" and signer is not None else None)
    return DistTransport(me, cfg.runtime.collective_timeout_s, stopping=stopping,
                         signer=signer, streams=streams)


def refuse_simulator_only(cfg: RunConfig) -> None:
    """Refuses, before anything connects, a setting only the simulator carries out."""
    if cfg.faults:
        raise ConfigError("[[faults]] is the simulator's fault plan (islands sim); real "
                          "processes fail for real: remove it")
    if cfg.attack.name in COLLUDING and cfg.attack.shared_dir is None:
        raise ConfigError(f"attack.name ({cfg.attack.name!r}) reads other workers' updates "
                          f"({COLLUDING[cfg.attack.name]}): with real processes set "
                          "attack.shared_dir to a folder every attacker can read and write "
                          "(islands launch sets one), or run it in the simulator (islands sim)")


class Member:
    """Drives one worker through the runtime's rounds (an :class:`~islands.engine.Driver`).

    Args:
        cfg: the run's config (the same on every worker).
        me: this worker's id.
        membership: a started-on-demand ``CoordinatorClient`` or a ``FixedMembership``.
        store: this worker's rendezvous store.
        transport: its :class:`DistTransport`.
        engine: the engine whose (single) worker :meth:`build` provides.
        build: builds and attaches this worker (the optimizers: ``torch._dynamo`` is imported
            by the first one a process builds, over a second of CPU).
        fresh: the shared state of this worker before any round (its hash is reported while
            the worker is still being built).
        background: build in a background thread while waiting at the coordinator.
        token: the shared secret (derives each epoch's store prefix).
        checkpoint_dir: where checkpoints go (None: none).
        stopping: set on SIGTERM (shared with the membership client and the transport): every
            wait gives up, the round in flight aborts, and the worker leaves.
    """

    def __init__(self, cfg: RunConfig, me: int, membership, store, transport: DistTransport,
                 engine: Engine, build: Callable[[], Worker], fresh: dict[str, torch.Tensor],
                 *, background: bool, token: bytes = b"",
                 checkpoint_dir: str | Path | None = None,
                 stopping: threading.Event | None = None) -> None:
        self.cfg, self.me, self.membership, self.store = cfg, me, membership, store
        self.transport, self.engine, self.token = transport, engine, token
        self.algorithm = engine.algorithm
        if engine.attack is not None and cfg.attack.shared_dir is not None:
            engine.attack.collude(cfg.attack.shared_dir, me)  # an attacker's accomplices
        self.checkpoint_dir = Path(checkpoint_dir) / f"w{me}" if checkpoint_dir else None
        if self.checkpoint_dir is not None and remove_temp(self.checkpoint_dir):
            log.info("worker %d: removed temp files a killed checkpoint write left", me)
        self.stopping = stopping or threading.Event()
        self.stats = Stats()
        self.round = 0
        self.epoch = self._prefix = None
        self.resumed = False
        self._wait_for = cfg.workers
        self._fresh_hash = state.digest(fresh)
        self._snap: dict | None = None
        self._build_fn, self._build_error = build, None
        self._builder = None
        if background:
            self._builder = threading.Thread(target=self._build, daemon=True, name="build")
            self._builder.start()
        else:
            self._build()
            self._built()

    # --- the worker, built in the background ----------------------------------------------

    def _build(self) -> None:
        try:
            self.engine.workers = [self._build_fn()]
        except BaseException as e:  # noqa: BLE001 (re-raised by _built() on the main thread)
            self._build_error = e

    def _built(self) -> None:
        """Waits for the build (a no-op once done)."""
        if self._builder is not None:
            self._builder.join()
            self._builder = None
        if self._build_error is not None:
            raise self._build_error

    @property
    def worker(self) -> Worker:
        return self.engine.workers[0]

    @property
    def finished(self) -> bool:
        """Whether this worker trained its last round (it leaves finished, not gone)."""
        return self.round >= self.engine.rounds

    def hash(self) -> str:
        if self._builder is not None:  # still building: the state is the fresh one
            return self._fresh_hash
        return state.digest(self.algorithm.shared_state(self.worker))

    def resume(self, path) -> dict:
        """Loads a checkpoint of the shared state (and this worker's own state, if it is its);
        returns its facts."""
        tensors, facts = checkpoint.load(path)
        shared = checkpoint.shared_part(tensors)
        checkpoint.verify(path, shared, facts, self._most_rounds(),
                          private=checkpoint.worker_part(tensors))
        try:
            state.check(shared, state.snapshot(self.algorithm, self.worker), src=self.me)
        except CommError as e:
            raise ConfigError(f"checkpoint {str(path)!r} does not fit this run's model: "
                              f"{e}") from None
        state.load(self.algorithm, self.worker, shared)
        if "worker" in facts and facts.get("worker_id") == self.me:
            checkpoint.restore_worker(self.worker, checkpoint.worker_part(tensors),
                                      facts["worker"])
        else:
            self.fast_forward(int(facts["round"]))
        self.round, self.resumed = int(facts["round"]), True
        log.info("worker %d resumed from %s at round %d", self.me, path, self.round)
        return facts

    def _most_rounds(self) -> int:
        """The most a checkpoint's ``round`` can be in this run."""
        return self.engine.rounds

    def fast_forward(self, round: int) -> None:
        """Puts a fresh worker's lr schedule where the run is (a joiner, a resume)."""
        self.engine.fast_forward(self.worker, round)

    # --- epochs and liveness ---------------------------------------------------------------

    def _join_epoch(self, res: dict) -> None:
        """Builds the process group of a new epoch (leader's store, secret-derived prefix)."""
        if res["epoch"] == self.epoch and res["prefix"] == self._prefix:
            return
        members = tuple(sorted(res["members"]))
        if self.engine.in_flight:  # it runs on the old group: it lands first
            if set(self.transport.ranks) - set(members):  # without a member gone it cannot
                self.transport.abort_event.set()  # complete: end it now, not at the timeout
            self._land_early()
        if self.me not in members:
            raise Excluded(f"not a member of epoch {res['epoch']}")
        store = self.store
        if res.get("store") and members[0] != self.me:
            store = open_store(res["store"][0], int(res["store"][1]), is_master=False,
                               timeout_s=self.cfg.runtime.collective_timeout_s)
        prefix = f"{res['prefix']}/{derive(self.token, res['prefix'])}/"
        t0 = time.perf_counter()
        host = getattr(self.membership, "host", None)  # gloo binds where peers reach us
        timeout_s = self.cfg.runtime.collective_timeout_s
        group, peers = self._form(lambda: (
            new_group(store, prefix, members.index(self.me), len(members), timeout_s, host=host),
            self.transport.stream_addresses(store, prefix, members)))
        self.transport.use_group(group, members)
        self.transport.open_streams(store, prefix, members, _keys(res), peers)
        self.epoch, self._prefix = res["epoch"], res["prefix"]
        log.info("worker %d: epoch %d with members %s (group formed in %.3f s)", self.me,
                 res["epoch"], list(members), time.perf_counter() - t0)

    def _form(self, make: Callable):
        """Runs ``make`` (a blocking group formation, the streams' addresses) in a thread; a
        SIGTERM meanwhile gives up at once, and so does a formation that outlasts
        ``runtime.collective_timeout_s`` (gloo's connection to a peer that was stopped after
        it published its address can block past its own timeout); the thread is left to
        end on its own."""
        out: dict = {}
        limit_s = self.cfg.runtime.collective_timeout_s
        deadline = time.monotonic() + limit_s

        def run() -> None:
            try:
                out["group"] = make()
            except BaseException as e:  # noqa: BLE001 (re-raised on this thread below)
                out["error"] = e

        t = threading.Thread(target=run, daemon=True, name="form group")
        t.start()
        while t.is_alive():
            t.join(0.05)
            if self.stopping.is_set():
                raise Stopping("asked to stop while forming a process group")
            if time.monotonic() > deadline:
                raise CommError(f"the process group did not form within {limit_s:g} s "
                                "(runtime.collective_timeout_s): a member is not answering")
        if "error" in out:
            raise out["error"]
        return out["group"]

    def on_live(self, live: set[int], sent_at: float) -> None:
        """Heartbeat thread: a member of the current group is gone, abort its exchanges.

        A reply to a heartbeat sent before the group formed is stale (it may predate a
        joiner's registration) and is ignored.
        """
        if sent_at < self.transport.group_since or self.finished:
            return  # a stale reply, or the run is over (the others leave as they finish)
        gone = set(self.transport.ranks) - live
        if gone and not self.transport.abort_event.is_set():
            # set even between exchanges: the round's next exchange must not wait for them
            self.transport.abort_event.set()
            if self.transport.in_flight:
                log.warning("worker %d: members %s gone; aborting the exchange in flight",
                            self.me, sorted(gone))
            else:
                log.info("worker %d: members %s gone", self.me, sorted(gone))

    # --- the driver ------------------------------------------------------------------------

    def next_round(self, engine: Engine) -> RoundPlan | None:
        """Passes ``start`` (healing, state transfers) until a round is there to train."""
        while self.round < engine.rounds and not self.stopping.is_set():
            t0 = time.perf_counter()
            self._snap = None if self._builder is not None else state.snapshot(
                self.algorithm, self.worker)
            try:
                res = self._start()
                if res.get("heal"):  # a round in flight to join as an observer
                    self._built()  # its row counts this worker's bytes from here
                    return RoundPlan(res["round"], (self.me,), (),
                                     Group(self.transport, tuple(sorted(res["members"]))),
                                     info={"t0": time.perf_counter(),
                                           "heal": tuple(res["members"])})
            except CommError as e:  # Excluded, CoordinatorRestarted, a failed transfer
                self.abort(engine, None, e)
                continue
            r = self.round
            if r >= engine.rounds:
                return None
            self._snap = state.snapshot(self.algorithm, self.worker)
            members = tuple(sorted(res["members"]))
            return RoundPlan(r, (self.me,), self.algorithm.participants(r, members),
                             Group(self.transport, members), info={"t0": t0})
        return None

    def sync(self, engine: Engine, plan: RoundPlan, losses) -> dict:
        """The round's sync under ``ready``/``commit``; returns the row's runtime fields."""
        if "heal" in plan.info:
            return self._heal(plan)
        t_sync = time.perf_counter()
        outcome = (self._sync(plan.round, plan.participants, self._snap)
                   if self.me in plan.participants else {"members": list(plan.participants)})
        self.round = plan.round + 1
        return self._row(plan.round, outcome, plan.info["t0"], t_sync)

    def abort(self, engine: Engine, plan: RoundPlan | None, error: CommError) -> None:
        """Restores the last committed shared state; an exclusion is counted. (A round it
        was healing into as an observer: nothing to restore or count.)"""
        if isinstance(error, Stopping):
            self.stopping.set()
        if plan is not None and "heal" in plan.info:  # still behind: the next start finds it
            log.warning("worker %d: healing into round %d failed (%s); joining at the next "
                        "round instead", self.me, plan.round, error)  # so and sends the state
            return
        if isinstance(error, CoordinatorRestarted):
            self._wait_for = max(1, len(self.transport.ranks))
        if isinstance(error, (Excluded, CoordinatorRestarted)):
            self.stats.excluded_rounds += 1
        self.engine.void_overlap()  # a sync in flight ends before the state is restored
        if self._snap is not None:  # None: failed before this fresh worker was even built
            state.load(self.algorithm, self.worker, self._snap, reset_params=True)
        log.warning("worker %d: round %d aborted (%s); parameters restored to the last "
                    "committed global state", self.me, self.round, error)

    def committed(self, engine: Engine, plan: RoundPlan, point: dict | None) -> None:
        if self.stats.first_commit_unix is None:
            self.stats.first_commit_unix = time.time()
        if self.me in plan.participants or "heal" in plan.info:  # (not: one it sat out)
            self.stats.rounds_committed += 1
        self._maybe_checkpoint(self.round - 1, engine.rounds)

    # --- start: joining, healing, repairs --------------------------------------------------

    def _start(self) -> dict:
        # wait_for only holds a coordinator's very first barrier: the job's start (all
        # workers), or its restart (the members of the last epoch).
        res = self.membership.request("start", round=self.round, hash=self.hash(),
                                      wait_for=self._wait_for, heal=self._may_heal(),
                                      **self._start_extra())
        self._wait_for = 1
        if res.get("finished"):
            raise Removed(f"the job finished (last round committed: {res['last_round']}) "
                          f"without this worker, which holds round {self.round} of "
                          f"{self.engine.rounds}; nothing is left to do")
        if res.get("heal"):
            return res
        self._built()
        if self.engine.in_flight and res["need_state"]:
            self._land_early()
        self._join_epoch(res)
        self.transport.set_context(f"{res['round']}/start", _keys(res))
        if res["need_state"]:
            self._receive_or_send(res)
        if self.stats.joined_round is None:
            self.stats.joined_round = res["round"]
        return res

    def _start_retrying(self, run: str) -> dict:
        """The coordinator's ``start`` for a (re)grouping without rounds to repeat (gossip,
        asynchronous): a coordinator restarted meanwhile (it forgot the members; this client
        has registered again) is asked again, up to three times; any other failure removes
        this worker from ``run`` (e.g. "the gossip run")."""
        for _ in range(3):
            try:
                return self._start()
            except Stopping:
                raise
            except CoordinatorRestarted as e:
                log.warning("worker %d: %s; asking the new coordinator", self.me, e)
            except CommError as e:
                raise Removed(f"worker {self.me} could not (re)join {run}: {e}") from None
        raise Removed(f"worker {self.me} could not (re)join {run}: the coordinator kept "
                      "restarting")

    def _start_extra(self) -> dict:
        """What else this driver tells the coordinator at ``start`` (nothing)."""
        return {}

    def _land_early(self) -> None:
        """The sync in flight (an overlapped round's) lands before anything else uses the
        transport (a new group, a state transfer). If it failed, its round's update is lost
        here; a worker whose state then differs from the majority's is repaired at the next
        start."""
        try:
            self.engine.land()
        except Stopping:
            raise
        except CommError as e:
            log.warning("worker %d: the update of round %d, in flight, is lost (%s)", self.me,
                        self.round - 1, e)

    def _may_heal(self) -> bool:
        """Whether to ask to join the round in flight as an observer: a fresh worker (not
        resumed, never committed) whose algorithm can take a weight-0 member."""
        return (self.stats.first_commit_unix is None and not self.resumed
                and self.algorithm.can_observe())

    def _heal(self, plan: RoundPlan) -> dict:
        """The sync of a round joined in flight as an observer (a round the engine's loop
        drives like any other, trained by others only): receives the committed state at its
        ``ready``, contributes nothing (weight 0) to its collective, and commits it; returns
        the row's runtime fields. A failure (Excluded, CoordinatorRestarted, a failed
        collective) aborts it as a round: this worker joins at the next start instead."""
        r = plan.round
        outcome = self._sync(r, plan.info["heal"], None, observer=True)
        self.fast_forward(r + 1)
        self.round = r + 1
        self.stats.joined_round = r
        return self._row(r, outcome, plan.info["t0"], time.perf_counter(), observer=True)

    def _receive_heal(self, r: int, ready: dict, snap: dict, local: torch.Tensor
                      ) -> tuple[dict, torch.Tensor]:
        """At a ``ready`` that heals observers: the source sends the committed state (the
        round has not changed it yet), each observer installs it. Returns (snap, local)."""
        heal = ready["heal"]
        if not self._exchange_state(ready["members"], heal["src"], heal["dsts"], r,
                                    " while healing"):
            return snap, local
        return state.snapshot(self.algorithm, self.worker), self.worker.flat_params().clone()

    def _receive_or_send(self, res: dict) -> None:
        """At ``start``: joiners, workers left behind and hash mismatches get the state."""
        repair = self.round == res["round"]  # same round, different hash
        if not self._exchange_state(res["members"], res["src"], res["need_state"],
                                    res["round"], ""):
            return
        if repair:
            self.stats.hash_mismatches += 1
            log.warning("worker %d: shared state differed from the majority; repaired from "
                        "worker %d", self.me, res["src"])
        self.round = res["round"]

    def _exchange_state(self, members, src: int, dsts, r: int, why: str) -> bool:
        """``src`` streams its shared state (of committed round ``r``) to ``dsts``; a receiver
        checks and installs it and puts its lr schedule at round ``r``. Returns whether this
        worker received it."""
        if self.me != src and self.me not in dsts:
            return False
        mine = None
        if self.me == src:  # the shared state, and the inner moments a fresh joiner adopts
            mine = {**self.algorithm.handover(self.worker), **state.inner_state(self.worker)}
        before, t0 = self.transport.bytes_received, time.perf_counter()
        got = state.transfer(self.transport, tuple(members), src, list(dsts), mine)
        dt = time.perf_counter() - t0  # the exchange only (includes waiting for the source)
        if got is None:
            return False
        inner = {k: v for k, v in got.items() if k.startswith("inner/")}
        shared = {k: v for k, v in got.items() if not k.startswith("inner/")}
        state.check(shared, self.algorithm.handover(self.worker), src)
        state.load(self.algorithm, self.worker, shared)
        if state.adopt_inner(self.worker, inner):
            log.info("worker %d: adopted worker %d's inner optimizer moments", self.me, src)
        if (self.cfg.algorithm.wire_codec(self.cfg.codec).error_feedback
                and not self.worker.codec.state_dict()):
            # per-worker state, never handed over (SparseLoCo's accumulator): zeros
            log.info("worker %d: its error-feedback accumulator starts empty (a joiner owes "
                     "nothing it did not train)", self.me)
        self.fast_forward(r)
        self.stats.state_transfers += 1
        self.stats.state_bytes += self.transport.bytes_received - before
        self.stats.state_transfer_s += dt
        log.info("worker %d: received the shared state of round %d from worker %d%s "
                 "(%d bytes in %.3f s)", self.me, r, src, why,
                 self.transport.bytes_received - before, dt)
        return True

    # --- ready, the collective, commit -----------------------------------------------------

    def _sync(self, r: int, ids: tuple[int, ...], snap: dict | None,
              observer: bool = False) -> dict:
        """The round's collective with commit/abort; retries with the survivors.

        Args:
            observer: this worker heals into the round: it must receive the committed state
                at ``ready`` and contributes with weight 0.
        """
        members, attempt, ready = list(ids), 0, None
        if observer:  # wait for the members' inner steps while the optimizers are built
            ready = self._ready(r, 0, members, None)
            self._built()
            snap = state.snapshot(self.algorithm, self.worker)
        local = self.worker.flat_params().clone()
        samples, codec_state = self.worker.samples, copy.deepcopy(self.worker.codec.state_dict())
        while True:
            if ready is None:
                weight, attack = self.algorithm.weight(self.worker), self.engine.attack
                if attack is not None:  # a forger reports the weight its headers claim
                    weight = attack.claims(self.me, r, weight)
                ready = self._ready(r, attempt, members, weight)
            if self.me not in ready["members"]:
                raise Excluded(f"round {r}: left out ({ready.get('left_out')})")
            if observer and self.me not in ready.get("heal", {}).get("dsts", []):
                raise Excluded(f"round {r}: no member left to heal from")
            self._join_epoch(ready)
            # the attempt's signed context, the members' keys and the weights recorded
            self.transport.set_context(f"{r}/{attempt}", _keys(ready))
            self.engine.round_weights = {int(k): float(w)
                                         for k, w in ready.get("weights", {}).items()}
            log.info("worker %d: round %d collective starts with %s%s", self.me, r,
                     ready["members"], f" (observers {ready['observers']})"
                     if ready.get("observers") else "")
            ok, why, blame = True, "", None
            try:
                if ready.get("heal"):
                    snap, local = self._receive_heal(r, ready, snap, local)
                self.engine.end_round(Group(self.transport, tuple(ready["members"])),
                                      [self.worker], tuple(ready.get("observers", ())))
            except Stopping:
                raise
            except PeerRefused as e:  # a peer's contribution (or our own, unsendable)
                ok, why, blame = False, str(e), {"worker": e.sender, "why": str(e)}
                proof = evidence.gather(self.transport.kept, e.sender,
                                        self.engine.round_weights, e.exhibit,
                                        rule_of(self.engine.aggregators, self.me))
                if proof is not None:
                    blame["evidence"] = proof
            except CodecError as e:  # our own contribution cannot be encoded (NaN, range)
                ok, why = False, str(e)
                blame = {"worker": self.me, "why": f"its own contribution: {e}"}
            except CommError as e:
                ok, why = False, str(e)
            h = self.hash() if ok else None
            if self.engine.attack is not None and self.engine.attack.accuses(self.me, r):
                ok, h, why = False, None, "an accusation"
                blame = self._false_accusation(ready, r)
            judge = self.engine.judge
            said = {"stats": {str(w): v for w, v in judge.latest.items()},
                    "judged": judge.take_verdicts()} if ok else {}
            res = self.membership.request("commit", round=r, attempt=attempt, ok=ok, hash=h,
                                          members=ready["members"], why=why, blame=blame,
                                          **said)
            self._note_exclusions(res)
            if res.get("fatal"):
                raise Removed(res["fatal"])
            if res["commit"]:
                if self.me in res["mismatched"]:
                    log.warning("worker %d: round %d hash %s differs from the majority %s; "
                                "repair at the next round", self.me, r, h, res["hash"])
                return {**res, "attempts": attempt + 1, "left_out": ready.get("left_out", []),
                        "observers": ready.get("observers", [])}
            self.stats.aborted_attempts += 1
            log.warning("worker %d: round %d attempt %d aborted%s; restored, retrying with %s",
                        self.me, r, attempt, f" ({why})" if why else "", res["members"])
            if self.me not in res["members"]:  # one side of a dispute no evidence settled
                raise Excluded(f"round {r}: sits out the retry (a dispute without evidence)")
            state.load(self.algorithm, self.worker, snap, reset_params=False)
            self.worker.load_flat(local)
            self.worker.samples = samples
            self.worker.codec.load_state_dict(copy.deepcopy(codec_state))
            members, attempt, ready = res["members"], attempt + 1, None

    def _ready(self, r: int, attempt: int, members: list[int], weight: float | None) -> dict:
        """The ``ready`` barrier, with this worker's aggregation weight for the round (the
        algorithm's rule, recorded by the coordinator and held against every header)."""
        fields = {} if weight is None else {"weight": float(weight)}
        return self.membership.request("ready", round=r, attempt=attempt, members=members,
                                       **fields)

    def _false_accusation(self, ready: dict, r: int) -> dict:
        """What a false accuser says at commit about another member (each in turn, the
        lowest first): where the round records weights, that it sent a forged one, with its
        own signed header as the "evidence" (it shows no such thing); otherwise that its
        payload does not decode, which no evidence can settle (its word alone)."""
        victim = self.engine.attack.victim(self.me, ready["members"], r)
        claims = [m for m in evidence.signed_by(self.transport.kept, victim) if m.claim]
        if not (claims and self.engine.round_weights):
            return {"worker": victim, "why": f"worker {victim}'s payload does not decode"}
        return {"worker": victim, "why": f"worker {victim} claims a forged weight",
                "evidence": {"rule": "weight", **claims[0].proof}}

    def _note_exclusions(self, res: dict) -> None:
        """Records the members the coordinator excluded; this one, if it is among them,
        leaves the run (``Removed``: it may come back only as a new process)."""
        for e in res.get("excluded", []):
            self.stats.excluded_members.append(e)
            by = "the coordinator" if e["by"] == "coordinator" else f"worker {e['by']}"
            log.warning("worker %d: worker %s excluded at round %s by %s: %s", self.me,
                        e["worker"], e["round"], by, e["why"])
            if e["worker"] == self.me:
                raise Removed(f"excluded from the run at round {e['round']} by {by}: "
                              f"{e['why']}")

    def _row(self, r: int, outcome: dict, r0: float, t_sync: float,
             observer: bool = False) -> dict:
        """The runtime's fields of a committed round's ``metrics.jsonl`` row."""
        now = time.perf_counter()
        hash_ok = self.me not in outcome.get("mismatched", [])
        log.info("round %d | worker %d | members %s | committed | sent %d B | inner %.2f s | "
                 "sync %.3f s | attempts %d | hash %s%s", r, self.me, outcome["members"],
                 self.transport.bytes_sent, t_sync - r0, now - t_sync,
                 outcome.get("attempts", 1), (outcome.get("hash") or "-")[:12],
                 "" if hash_ok else " MISMATCH")
        excluded, self.stats.excluded_members = self.stats.excluded_members, []
        return {"participants": outcome["members"], "committed": True, "excluded": excluded,
                "attempts": outcome.get("attempts", 1), "hash": outcome.get("hash"),
                "hash_ok": hash_ok, "left_out": outcome.get("left_out", []),
                "epoch": self.epoch, "observers": outcome.get("observers", []),
                "observer": observer, "inner_s": t_sync - r0, "sync_s": now - t_sync,
                "round_s": now - r0, "commit_unix": time.time()}

    # --- checkpoints and the summary -------------------------------------------------------

    def _maybe_checkpoint(self, r: int, rounds: int) -> None:
        every = self.cfg.runtime.checkpoint_every
        if self.checkpoint_dir is None:
            return
        if (every and (r + 1) % every == 0) or r == rounds - 1:
            self._write_checkpoint(r + 1)

    def _write_checkpoint(self, r: int, **facts) -> None:
        """``round-<r>.safetensors``: the shared state and this worker's own, with ``facts``."""
        facts = {"round": r, "hash": self.hash(), "worker_id": self.me, "seed": self.cfg.seed,
                 **facts}
        try:
            checkpoint.save_round(self.checkpoint_dir, r,
                                  self.algorithm.shared_state(self.worker), facts,
                                  self.worker, self.cfg.runtime.keep_checkpoints)
        except StorageError as e:
            last = checkpoint.latest(self.checkpoint_dir)
            raise StorageError(f"{e}; the last good checkpoint is "
                               f"{str(last) if last else 'none'}", path=e.path,
                               needed=e.needed, free=e.free) from None

    def summary_fields(self) -> dict:
        """The runtime's fields of ``summary.json`` (beside the engine's)."""
        s, t = self.stats, self.transport
        return {"worker": self.me, "rounds_committed": s.rounds_committed,
                "last_round": self.round - 1,
                "wire_bytes_sent": t.wire_bytes_sent,
                "aborted_attempts": s.aborted_attempts, "excluded_rounds": s.excluded_rounds,
                "state_transfers": s.state_transfers, "state_bytes": s.state_bytes,
                "state_transfer_s": s.state_transfer_s, "hash_mismatches": s.hash_mismatches,
                "joined_round": s.joined_round, "first_commit_unix": s.first_commit_unix,
                "final_hash": self.hash()}
