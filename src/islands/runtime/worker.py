"""One worker process of the real runtime: the simulator's round loop over a real group.

Run it: ``islands run CONFIG --coordinator HOST:PORT --worker-id 2`` (or under ``torchrun``
without ``--coordinator``, for a fixed group).

The loop is the simulator's (same initial parameters from the seed, same batches per
(worker, inner step), same inner optimizer and schedule, same algorithm calls, members in
sorted order), so a run where nothing fails gives the simulator's global parameters. Each round
passes the coordinator's three barriers (see :mod:`islands.runtime.coordinator`):

1. ``start``: learn the round and the members; joiners and workers whose state hash disagrees
   receive the committed shared state from a live worker (:func:`state.transfer`).
2. inner steps, then ``ready``: the members of the collective (stragglers past the deadline
   and dead workers left out; a new epoch builds a new process group).
3. the algorithm's ``sync``, then ``commit`` with the new state's hash. If any member failed,
   everyone restores the shared state (no partial reduction is ever kept) and the survivors
   retry the collective with their local parameters of this round.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from islands.algorithms import build_algorithm
from islands.collectives.butterfly import Group
from islands.core.config import RunConfig
from islands.core.errors import CommError, ConfigError
from islands.data import ByteData
from islands.runtime import checkpoint, state
from islands.runtime.auth import derive
from islands.runtime.membership import CoordinatorRestarted
from islands.runtime.report import RoundLog
from islands.sim.runner import build_worker, evaluate, initial_model, resolve_device
from islands.transports.dist import DistTransport, new_group, open_store

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
    compute_s: float = 0.0
    first_commit_unix: float | None = None
    joined_round: int | None = None
    events: list = field(default_factory=list)


class RuntimeWorker:
    """Drives one worker through the rounds of a run.

    Args:
        cfg: the run's config (the same file on every worker).
        worker_id: this worker's id, in ``[0, cfg.workers)``.
        membership: a :class:`~islands.runtime.membership.CoordinatorClient` (not yet
            started) or a :class:`~islands.runtime.membership.FixedMembership`.
        store: this worker's rendezvous store (the server it hosts, or the fixed group's).
        token: the shared secret (derives the store key prefix of each epoch).
        out_dir: this worker's run directory (None: nowhere).
        checkpoint_dir: where to write checkpoints (None: none).
        resume: a checkpoint to resume from.
    """

    def __init__(self, cfg: RunConfig, worker_id: int, membership, store, *, token: bytes = b"",
                 out_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                 resume: str | Path | None = None) -> None:
        if not 0 <= worker_id < cfg.workers:
            raise ConfigError(f"--worker-id ({worker_id}) must be in [0, {cfg.workers - 1}] "
                              f"(workers = {cfg.workers}); raise workers in the config to add "
                              "more")
        self.cfg, self.me, self.membership, self.store = cfg, worker_id, membership, store
        self.token = token
        self.out = RoundLog(out_dir, worker_id) if out_dir is not None else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resume = resume
        self.transport = DistTransport(worker_id, cfg.runtime.collective_timeout_s)
        self.epoch = None
        self.stats = Stats()
        self.leaving = False
        self._wait_for = cfg.workers
        self.final_params: torch.Tensor | None = None

    # --- setup -----------------------------------------------------------------------------

    def _setup(self) -> None:
        """Everything but the optimizers; :meth:`_build` makes those, in a background thread
        unless resuming. Building the first ``torch.optim`` optimizer of a process imports
        ``torch._dynamo`` (over a second of CPU), so a joiner does it while it waits for the
        coordinator and for the round in flight, not before."""
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        self.data = ByteData(cfg.data, workers=cfg.workers, block_size=cfg.model.block_size,
                             seed=cfg.seed)
        self._base = initial_model(cfg, self.device)
        self.algorithm = build_algorithm(cfg)
        self.eval_model = copy.deepcopy(self._base)
        self.val = self.data.val_batches()
        self.round = 0
        # the shared state of a fresh worker is its initial parameters (no outer state yet)
        self._fresh_hash = state.digest({"global_params": torch.cat(
            [p.detach().reshape(-1) for p in self._base.parameters()])})
        self._builder, self._build_error = None, None
        if self.resume:
            self._build()
            self._resume(self.resume)
        else:
            self._builder = threading.Thread(target=self._build, daemon=True, name="build")
            self._builder.start()

    def _build(self) -> None:
        try:
            self.worker = build_worker(self.cfg, self.data, self.me, self._base)
            self.algorithm.attach(self.worker)
        except BaseException as e:  # noqa: BLE001 (re-raised by _built() on the main thread)
            self._build_error = e

    def _built(self) -> None:
        """Waits for :meth:`_build` (a no-op once done)."""
        if self._builder is not None:
            self._builder.join()
            self._builder = None
        if self._build_error is not None:
            raise self._build_error

    def _resume(self, path) -> None:
        tensors, facts = checkpoint.load(path)
        shared = checkpoint.shared_part(tensors)
        state.check(shared, state.snapshot(self.algorithm, self.worker), src=self.me)
        state.load(self.algorithm, self.worker, shared)
        if "worker" in facts and facts.get("worker_id") == self.me:
            checkpoint.restore_worker(self.worker, checkpoint.worker_part(tensors),
                                      facts["worker"])
        else:
            self._fast_forward(int(facts["round"]))
        self.round = int(facts["round"])
        log.info("worker %d resumed from %s at round %d", self.me, path, self.round)

    def _fast_forward(self, round: int) -> None:
        """Puts a fresh worker's lr schedule where the run is (a joiner, a resume)."""
        H = self.algorithm.sync_every
        while self.worker.steps < min(self.cfg.steps, round * H):
            if self.worker.scheduler is not None:
                self.worker.scheduler.step()
            self.worker.steps += 1

    def _join_epoch(self, res: dict) -> None:
        """Builds the process group of a new epoch (leader's store, secret-derived prefix)."""
        if res["epoch"] == self.epoch and res["prefix"] == getattr(self, "_prefix", None):
            return
        members = tuple(sorted(res["members"]))
        if self.me not in members:
            raise Excluded(f"not a member of epoch {res['epoch']}")
        store = self.store
        if res.get("store") and members[0] != self.me:
            store = open_store(res["store"][0], int(res["store"][1]), is_master=False,
                               timeout_s=self.cfg.runtime.collective_timeout_s)
        prefix = f"{res['prefix']}/{derive(self.token, res['prefix'])}/"
        t0 = time.perf_counter()
        group = new_group(store, prefix, members.index(self.me), len(members),
                          self.cfg.runtime.collective_timeout_s)
        self.transport.use_group(group, members)
        self.epoch, self._prefix = res["epoch"], res["prefix"]
        log.info("worker %d: epoch %d with members %s (group formed in %.3f s)", self.me,
                 res["epoch"], list(members), time.perf_counter() - t0)

    def on_live(self, live: set[int], sent_at: float) -> None:
        """Heartbeat thread: a member of the current group is gone, abort its exchanges.

        A reply to a heartbeat sent before the group formed is stale (it may predate a
        joiner's registration) and is ignored.
        """
        if sent_at < self.transport.group_since:
            return
        gone = set(self.transport.ranks) - live
        if gone and not self.transport.abort_event.is_set():
            log.warning("worker %d: members %s gone; aborting the exchange in flight", self.me,
                        sorted(gone))
            self.transport.abort_event.set()

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> dict:
        """Runs to the last round (or a graceful leave); returns this worker's summary."""
        started = time.perf_counter()
        self.started_unix = time.time()
        self._setup()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.membership.start() if hasattr(self.membership, "start") else None
        if self.out:
            self.out.start(self.cfg)
        rounds = math.ceil(self.cfg.steps / self.algorithm.sync_every)
        self.curve = []  # the step-0 point is taken by workers that start at round 0
        log.info("worker %d set up in %.2f s; joining", self.me, time.perf_counter() - started)
        try:
            while self.round < rounds and not self.leaving:
                self._round(rounds)
            if self.leaving:
                log.info("worker %d leaves at round %d", self.me, self.round)
            self.membership.leave()
        finally:
            self.membership.close()
        self._built()
        summary = self._summary(rounds, time.perf_counter() - started)
        self.final_params = self.algorithm.global_state(self.worker).clone()
        if self.out:
            self.out.finish(summary, self.algorithm.shared_state(self.worker), self.round)
        return summary

    def _on_sigterm(self, *_) -> None:
        self.leaving = True

    def _hash(self) -> str:
        if self._builder is not None:  # still building: the state is the fresh one
            return self._fresh_hash
        return state.digest(self.algorithm.shared_state(self.worker))

    def _start(self) -> dict:
        # wait_for only holds a coordinator's very first barrier: the job's start (all
        # workers), or its restart (the members of the last epoch).
        res = self.membership.request("start", round=self.round, hash=self._hash(),
                                      wait_for=self._wait_for, heal=self._may_heal())
        self._wait_for = 1
        if res.get("heal"):
            return res
        self._built()
        self._join_epoch(res)
        if res["need_state"]:
            self._receive_or_send(res)
        if self.stats.joined_round is None:
            self.stats.joined_round = res["round"]
            if res["round"] == 0:
                self.curve.append(self._eval_point(0))
        return res

    def _may_heal(self) -> bool:
        """Whether to ask to join the round in flight as an observer: a fresh worker (not
        resumed, never committed) whose algorithm can take a weight-0 member."""
        return (self.stats.first_commit_unix is None and not self.resume
                and self.algorithm.can_observe())

    def _heal(self, res: dict, rounds: int) -> None:
        """Joins the round in flight as an observer: receives the committed state at its
        ``ready``, contributes nothing (weight 0) to its collective, and commits it."""
        r, r0 = res["round"], time.perf_counter()
        if not hasattr(self, "_t0"):
            self._t0 = r0
        sent0, recv0 = self.transport.bytes_sent, self.transport.bytes_received
        try:
            outcome = self._sync(r, tuple(res["members"]), None, observer=True)
        except (Excluded, CoordinatorRestarted, CommError) as e:
            # still at round 0: the next start finds this worker behind and sends the state
            log.warning("worker %d: healing into round %d failed (%s); joining at the next "
                        "round instead", self.me, r, e)
            return
        self._fast_forward(r + 1)
        self.round = r + 1
        self.stats.joined_round = r
        self._committed(r, rounds, outcome, [], r0, time.perf_counter(), sent0, recv0,
                        observer=True)

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
        mine = self.algorithm.shared_state(self.worker) if self.me == src else None
        before, t0 = self.transport.bytes_received, time.perf_counter()
        got = state.transfer(self.transport, tuple(members), src, list(dsts), mine)
        dt = time.perf_counter() - t0  # the exchange only (includes waiting for the source)
        if got is None:
            return False
        state.check(got, self.algorithm.shared_state(self.worker), src)
        state.load(self.algorithm, self.worker, got)
        self._fast_forward(r)
        self.stats.state_transfers += 1
        self.stats.state_bytes += self.transport.bytes_received - before
        self.stats.state_transfer_s += dt
        log.info("worker %d: received the shared state of round %d from worker %d%s "
                 "(%d bytes in %.3f s)", self.me, r, src, why,
                 self.transport.bytes_received - before, dt)
        return True

    def _round(self, rounds: int) -> None:
        r0 = time.perf_counter()
        snap = None if self._builder is not None else state.snapshot(self.algorithm, self.worker)
        try:
            res = self._start()
            if res.get("heal"):
                return self._heal(res, rounds)
            r = self.round
            if r >= rounds:
                return
            snap = state.snapshot(self.algorithm, self.worker)
            sent0, recv0 = self.transport.bytes_sent, self.transport.bytes_received
            members = tuple(sorted(res["members"]))
            ids = self.algorithm.participants(r, members)
            self.algorithm.begin_round(Group(self.transport, members), [self.worker], r)
            losses = self._inner_steps(r, ids)
            t_sync = time.perf_counter()
            outcome = self._sync(r, ids, snap) if self.me in ids else {"members": list(ids)}
        except (Excluded, CoordinatorRestarted) as e:
            if isinstance(e, CoordinatorRestarted):
                self._wait_for = max(1, len(self.transport.ranks))
            self._abort(snap, reset_params=True, why=str(e))
            self.stats.excluded_rounds += 1
            return
        except CommError as e:
            self._abort(snap, reset_params=True, why=str(e))
            return
        self.round = r + 1
        self._committed(r, rounds, outcome, losses, r0, t_sync, sent0, recv0)

    def _committed(self, r: int, rounds: int, outcome: dict, losses: list[float], r0: float,
                   t_sync: float, sent0: int, recv0: int, observer: bool = False) -> None:
        """Records a committed round: metrics row, evaluation, checkpoint."""
        now = time.perf_counter()
        if self.stats.first_commit_unix is None:
            self.stats.first_commit_unix = time.time()
        point = self._maybe_eval(r, rounds)
        row = {"round": r, "participants": outcome["members"], "committed": True,
               "attempts": outcome.get("attempts", 1), "hash": outcome.get("hash"),
               "hash_ok": self.me not in outcome.get("mismatched", []),
               "left_out": outcome.get("left_out", []), "epoch": self.epoch,
               "observers": outcome.get("observers", []), "observer": observer,
               "inner_s": t_sync - r0, "sync_s": now - t_sync, "round_s": now - r0,
               "commit_unix": time.time()}
        if self.out:
            self.out.log_round(row, self.worker.steps, losses, self.transport, sent0, recv0,
                               time.perf_counter() - self._t0, point)
        self._maybe_checkpoint(r, rounds)

    def _inner_steps(self, r: int, ids: tuple[int, ...]) -> list[float]:
        if not hasattr(self, "_t0"):
            self._t0 = time.perf_counter()
        H, losses = self.algorithm.sync_every, []
        if self.me not in ids:
            return losses
        group = Group(self.transport, ids)
        t0 = time.perf_counter()
        for step in range(r * H, min(self.cfg.steps, (r + 1) * H)):
            x, y = self.data.train_batch(self.me, step)
            losses.append(self.worker.backward(x.to(self.device), y.to(self.device)))
            self.algorithm.after_backward(group, [self.worker])
            self.worker.apply()
        self.stats.compute_s += time.perf_counter() - t0
        return losses

    def _sync(self, r: int, ids: tuple[int, ...], snap: dict, observer: bool = False) -> dict:
        """The round's collective with commit/abort; retries with the survivors.

        Args:
            observer: this worker heals into the round: it must receive the committed state
                at ``ready`` and contributes with weight 0.
        """
        members, attempt, ready = list(ids), 0, None
        if observer:  # wait for the members' inner steps while the optimizers are built
            ready = self.membership.request("ready", round=r, attempt=0, members=members)
            self._built()
            snap = state.snapshot(self.algorithm, self.worker)
        local = self.worker.flat_params().clone()
        samples, codec_state = self.worker.samples, copy.deepcopy(self.worker.codec.state_dict())
        while True:
            if ready is None:
                ready = self.membership.request("ready", round=r, attempt=attempt,
                                                members=members)
            if self.me not in ready["members"]:
                raise Excluded(f"round {r}: left out ({ready.get('left_out')})")
            if observer and self.me not in ready.get("heal", {}).get("dsts", []):
                raise Excluded(f"round {r}: no member left to heal from")
            self._join_epoch(ready)
            log.info("worker %d: round %d collective starts with %s%s", self.me, r,
                     ready["members"], f" (observers {ready['observers']})"
                     if ready.get("observers") else "")
            ok, why = True, ""
            try:
                if ready.get("heal"):
                    snap, local = self._receive_heal(r, ready, snap, local)
                self.algorithm.sync(Group(self.transport, tuple(ready["members"])),
                                    [self.worker], r,
                                    observers=tuple(ready.get("observers", ())))
            except CommError as e:
                ok, why = False, str(e)
            h = self._hash() if ok else None
            res = self.membership.request("commit", round=r, attempt=attempt, ok=ok, hash=h,
                                          members=ready["members"])
            if res["commit"]:
                if self.me in res["mismatched"]:
                    log.warning("worker %d: round %d hash %s differs from the majority %s; "
                                "repair at the next round", self.me, r, h, res["hash"])
                return {**res, "attempts": attempt + 1, "left_out": ready.get("left_out", []),
                        "observers": ready.get("observers", [])}
            self.stats.aborted_attempts += 1
            log.warning("worker %d: round %d attempt %d aborted%s; restored, retrying with %s",
                        self.me, r, attempt, f" ({why})" if why else "", res["members"])
            state.load(self.algorithm, self.worker, snap, reset_params=False)
            self.worker.load_flat(local)
            self.worker.samples = samples
            self.worker.codec.load_state_dict(copy.deepcopy(codec_state))
            members, attempt, ready = res["members"], attempt + 1, None

    def _abort(self, snap: dict | None, *, reset_params: bool, why: str) -> None:
        if snap is not None:  # None: failed before this fresh worker was even built
            state.load(self.algorithm, self.worker, snap, reset_params=reset_params)
        log.warning("worker %d: round %d aborted (%s); parameters restored to the last "
                    "committed global state", self.me, self.round, why)

    # --- evaluation, checkpoints, summary --------------------------------------------------

    def _eval_point(self, step: int) -> dict:
        flat = self.algorithm.global_state(self.worker)
        return {"step": step, "worker": self.me,
                "eval_loss": evaluate(self.eval_model, flat, self.val, self.device),
                "bytes_sent_per_worker": self.transport.bytes_sent}

    def _maybe_eval(self, r: int, rounds: int) -> dict | None:
        H, every = self.algorithm.sync_every, self.cfg.eval_every
        first, last = r * H, min(self.cfg.steps, (r + 1) * H)
        if last // every > first // every or r == rounds - 1:
            point = self._eval_point(last)
            self.curve.append(point)
            return point
        return None

    def _maybe_checkpoint(self, r: int, rounds: int) -> None:
        every = self.cfg.runtime.checkpoint_every
        if self.checkpoint_dir is None:
            return
        if (every and (r + 1) % every == 0) or r == rounds - 1:
            facts = {"round": r + 1, "hash": self._hash(), "worker_id": self.me,
                     "seed": self.cfg.seed}
            checkpoint.save(self.checkpoint_dir / f"w{self.me}" / f"round-{r + 1}.safetensors",
                            self.algorithm.shared_state(self.worker), facts, self.worker)

    def _summary(self, rounds: int, wall: float) -> dict:
        cfg, t = self.cfg, self.transport
        train_s = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        s = self.stats
        return {
            "name": cfg.label, "algorithm": cfg.algorithm.name, "workers": cfg.workers,
            "worker": self.me, "steps": cfg.steps, "rounds": rounds,
            "rounds_committed": self.round,
            "sync_every": 1 if cfg.algorithm.name == "ddp" else cfg.algorithm.sync_every,
            "codec": cfg.codec.name, "params": sum(p.numel() for p in self.worker.params),
            "final_eval_loss": self.curve[-1]["eval_loss"] if self.curve else None,
            "bytes_sent_per_worker": t.bytes_sent, "bytes_received_per_worker": t.bytes_received,
            "bytes_sent_total": t.bytes_sent, "wire_bytes_sent": t.wire_bytes_sent,
            "virtual_time_s": train_s, "compute_utilization": s.compute_s / max(train_s, 1e-9),
            "eval_curve": self.curve, "wall_time_s": wall, "seed": cfg.seed,
            "aborted_attempts": s.aborted_attempts, "excluded_rounds": s.excluded_rounds,
            "state_transfers": s.state_transfers, "state_bytes": s.state_bytes,
            "state_transfer_s": s.state_transfer_s, "hash_mismatches": s.hash_mismatches,
            "joined_round": s.joined_round, "started_unix": self.started_unix,
            "first_commit_unix": s.first_commit_unix, "final_hash": self._hash(),
        }


def advertised_host(coordinator: str) -> str:
    """The local address peers can reach: the one this host routes to the coordinator by.

    (A UDP ``connect`` sends no packet; it only picks the route.)
    """
    host, _, port = coordinator.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host or "127.0.0.1", int(port)))
            return s.getsockname()[0]
    except (OSError, ValueError):
        return "127.0.0.1"
