"""``islands run``: one worker process of the real runtime, training the config's task.

Run it: ``islands run CONFIG --coordinator HOST:PORT --worker-id 2`` (or under ``torchrun``
without ``--coordinator``, for a fixed group).

A thin driver over the engine, like the simulator: the same task, initial parameters from
the seed, batches per (worker, inner step), inner optimizer and schedule, and algorithm calls,
so a run where nothing fails gives the simulator's global parameters. The rounds pass the
coordinator's barriers through :class:`~islands.runtime.member.Member` (joins, healing,
commit/abort, hash repair, checkpoints).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import torch

from islands.core.config import RunConfig
from islands.core.errors import ConfigError, Stopping, StorageError
from islands.engine import (
    WallClock,
    assemble,
    check_config,
    fresh_state,
    resolve_device,
    resolve_threads,
)
from islands.metrics.run_dir import RunDir
from islands.runtime import outputs
from islands.runtime.fingerprint import fingerprint
from islands.runtime.gossip import member_class
from islands.runtime.member import Member, member_transport, refuse_simulator_only
from islands.runtime.membership import Removed, Unauthorized
from islands.tasks import Task

log = logging.getLogger("islands.worker")


def check_worker_id(cfg: RunConfig, worker_id: int) -> None:
    if not 0 <= worker_id < cfg.workers:
        raise ConfigError(f"--worker-id ({worker_id}) must be in [0, {cfg.workers - 1}] "
                          f"(workers = {cfg.workers}); raise workers in the config to add "
                          "more")


class RuntimeWorker:
    """Drives one worker through the rounds of a run.

    Args:
        cfg: the run's config (the same file on every worker).
        worker_id: this worker's id, in ``[0, cfg.workers)``.
        membership: a :class:`~islands.runtime.membership.CoordinatorClient` (not yet
            started) or a :class:`~islands.runtime.membership.FixedMembership`.
        store: this worker's rendezvous store (the server it hosts, or the fixed group's).
        token: the shared secret (derives the store key prefix of each epoch).
        out_dir: this worker's run directory (None: nowhere), already claimed
            (:func:`islands.runtime.outputs.claim`).
        append: keep the rows already in ``out_dir`` (an earlier life of this worker).
        checkpoint_dir: where to write checkpoints (None: none).
        resume: a checkpoint to resume from.
    """

    def __init__(self, cfg: RunConfig, worker_id: int, membership, store, *, token: bytes = b"",
                 out_dir: str | Path | None = None, append: bool = False,
                 checkpoint_dir: str | Path | None = None, resume: str | Path | None = None,
                 stopping: threading.Event | None = None) -> None:
        check_worker_id(cfg, worker_id)
        refuse_simulator_only(cfg)
        self.cfg, self.me, self.membership, self.store = cfg, worker_id, membership, store
        self.token, self.checkpoint_dir, self.resume = token, checkpoint_dir, resume
        self.out = RunDir(out_dir) if out_dir is not None else None
        self.append = append
        self.error: str | None = None  # a file it could not write (exit status 2)
        self.stopping = stopping or threading.Event()
        self.transport = member_transport(cfg, worker_id, membership, self.stopping)
        self.member: Member | None = None
        self.removed: str | None = None  # why this worker could not go on (exit status 3)
        self.final_params: torch.Tensor | None = None

    def setup(self) -> None:
        """Everything but the optimizers, which the member builds in a background thread
        unless resuming (a joiner does it while it waits for the coordinator)."""
        cfg, me = self.cfg, self.me
        task = check_config(cfg)
        if (count := resolve_threads(cfg, resolve_device(cfg.device))) is not None:
            torch.set_num_threads(count)  # one worker per process (before the warm start)
        run = assemble(cfg, task)
        if getattr(run.algorithm, "remember", False):
            # MoDeST: a process that joins mid-run has not seen the earlier draws, so every
            # process recomputes the last round's draw over the current members instead
            run.algorithm.remember = False
        self.engine = run.engine(self.transport, [], WallClock((me,)), out=self.out)
        if hasattr(self.membership, "fingerprint"):  # checked by the coordinator at join
            # samples a step, where the data fixes it and the task counts them as usual (the
            # leading dimension of a batch: Task.batch_size)
            fixed = (getattr(run.partition, "samples_per_step", None)
                     if type(task).batch_size is Task.batch_size else None)
            self.membership.fingerprint = fingerprint(
                cfg, run.base, rounds=self.engine.rounds,
                data_sizes=[run.partition.size(w) for w in range(cfg.workers)],
                samples_per_step=fixed)
        self.member = member_class(run.algorithm)(
            cfg, me, self.membership, self.store, self.transport, self.engine,
            lambda: run.worker(me), fresh_state(run.base), background=not self.resume,
            token=self.token,
            checkpoint_dir=self.checkpoint_dir, stopping=self.stopping)
        if self.resume:
            self.member.resume(self.resume)

    def on_live(self, live: set[int], sent_at: float) -> None:
        """Heartbeat thread: forwards the live set to the member (see ``Member.on_live``)."""
        if self.member is not None:
            self.member.on_live(live, sent_at)

    def run(self) -> dict:
        """Runs to the last round (or a graceful leave); returns this worker's summary."""
        started, started_unix = time.perf_counter(), time.time()
        self.setup()
        member = self.member
        if self.out:
            self.out.reserve(self.engine.final_nbytes())
            self.out.start(self.cfg, append=self.append)
        log.info("worker %d set up in %.2f s; joining", self.me, time.perf_counter() - started)
        try:
            if hasattr(self.membership, "start"):
                self.membership.start()
            self.engine.run(member)
            if self.stopping.is_set():
                log.info("worker %d leaves at round %d (asked to stop)", self.me, member.round)
        except Removed as e:
            self.removed = str(e)
            log.error("worker %d stops: %s", self.me, e)
        except Stopping:
            log.info("worker %d asked to stop before joining", self.me)
        except (StorageError, Unauthorized) as e:  # a checkpoint that does not fit, a token
            # the coordinator refuses: stop at once (exit 2), this worker's files written
            self.error = str(e)
            log.error("worker %d stops: %s", self.me, e)
        finally:
            job = self.membership.leave(finished=member.finished)
            self.membership.close()
        member._built()
        extra = {"started_unix": started_unix, "removed": self.removed, "error": self.error,
                 **({"coordinator": job} if job else {})}
        self.final_params = self.engine.algorithm.global_state(member.worker).clone()
        if self.out:
            return outputs.finish(self.out, self.engine, member,
                                  time.perf_counter() - started, extra)
        return {**self.engine.summary(time.perf_counter() - started),
                **member.summary_fields(), **extra}


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
