"""The drop-in: islands under the user's own training loop, one worker per process.

Users keep their model, optimizer, data loader and loop and add a few lines:

    with islands.join("coordinator-host:29400", token_file="secret.txt",
                      config="run.toml") as job:
        optimizer, scheduler = job.optimizer(model)   # the simulator's, or the user's own
        trainer = job.wrap(model, optimizer, scheduler=scheduler)
        for x, y in DataLoader(train, batch_sampler=job.sampler(train)):
            loss_fn(model(x), y).backward()
            trainer.step()                       # inner step; every H steps the outer sync
            if trainer.done:
                break

``trainer.step()`` replaces ``optimizer.step()`` and ``zero_grad()``: it clips (``[inner]
grad_clip``), steps the optimizer (and the scheduler, if given), and at the end of each round
runs the sync with everything ``islands run`` has: coordinator membership, commit/abort,
state transfer to joiners, healing, the per-round hash check, checkpoints. A restarted process
that runs the same script rejoins: before its first forward pass it holds the committed state.
Without a coordinator it runs under ``torchrun`` (a fixed group; the world size must be the
config's ``workers``).

What makes the loop equal the simulator's run of the same config, bit for bit (with nothing
failing, on the CPU with the config's ``threads``): the model built right after
``torch.manual_seed(job.seed)`` as the task builds it, :meth:`Job.optimizer`'s optimizer and
schedule, :meth:`Job.sampler`'s batches (the simulator's dealing of the task's ``Dataset``),
the task's loss, ``trainer.step()`` once per batch. A loop with its own optimizer or loader
trains just as well, but is another run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from islands.collectives.butterfly import Group
from islands.core.config import RunConfig, load_config, parse_overrides
from islands.core.errors import CommError, ConfigError, StorageError, TaskError
from islands.core.sections import SAMPLING_KEYS
from islands.engine import WallClock, assemble, fresh_state, inner_optimizer
from islands.metrics.run_dir import RunDir, check_writable
from islands.runtime import outputs
from islands.runtime.auth import load_token
from islands.runtime.fingerprint import fingerprint
from islands.runtime.gossip import member_class
from islands.runtime.launch import connect, parse_worker_id
from islands.runtime.member import member_transport, refuse_simulator_only
from islands.runtime.membership import Removed, Unauthorized
from islands.runtime.worker import check_worker_id
from islands.tasks import ShareSampler, Task

log = logging.getLogger("islands.worker")


def join(coordinator: str | None = None, *, config: str | Path | RunConfig | None = None,
         overrides: list[str] | None = None, worker_id: int | str | None = None,
         token: str | bytes | None = None, token_file: str | Path | None = None,
         out: str | Path | None = None, checkpoint_dir: str | Path | None = None,
         host: str | None = None, existing: str = "refuse") -> Job:
    """Joins a run as one worker (use as a context manager; see the module's example).

    Args:
        coordinator: ``host:port`` of ``islands coordinator`` (None: under torchrun).
        config: a TOML path or a :class:`RunConfig` (the same on every worker).
        overrides: ``--set``-style dotted overrides (``["algorithm.sync_every=100"]``).
        worker_id: this worker's id (default: ``$RANK``).
        token: the shared secret, or ``token_file`` holding it.
        out: this worker's run directory (default: ``runs/<name>-job/w<id>``, the job's
            folder, which gets the merged ``summary.json``).
        checkpoint_dir: write checkpoints here (``[runtime] checkpoint_every``).
        host: the address peers reach this worker at (default: the route to the coordinator).
        existing: ``"refuse"`` (default) a folder that holds another run or this worker's
            finished one, or ``"overwrite"`` it; an unfinished run of the same config is this
            worker's earlier life, and its rows stay.

    Raises:
        ConfigError: a setting the drop-in cannot honour, a bad worker id, a folder that
            holds another run; before anything connects or trains.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides or [])
    if isinstance(config, RunConfig) and overrides:
        cfg = config.replace(**parse_overrides(overrides))
    for key in SAMPLING_KEYS:
        if getattr(cfg.algorithm, key, 1.0) < 1:
            raise ConfigError(f"algorithm.{key} ({getattr(cfg.algorithm, key)}) below 1 is "
                              "not supported by the drop-in loop (every worker trains every "
                              "round); use islands run")
    if cfg.init.warm_start_steps:
        raise ConfigError(f"init.warm_start_steps ({cfg.init.warm_start_steps}) is not "
                          "supported by the drop-in loop (your code builds the model): load "
                          "your own starting weights before job.wrap, or use islands run")
    raw = worker_id if worker_id is not None else os.environ.get("RANK")
    if raw is None:
        raise ConfigError("join(worker_id=...) is needed (or $RANK, as torchrun sets it)")
    me = parse_worker_id(str(raw))
    check_worker_id(cfg, me)
    refuse_simulator_only(cfg)
    if cfg.algorithm.name == "async_local_sgd":
        raise ConfigError("algorithm.name ('async_local_sgd') has no rounds for the drop-in "
                          "loop to call: run it with islands run or islands launch")
    secret = token.encode() if isinstance(token, str) else token
    if secret is None:
        secret = load_token(token_file)
    folder = Path(out) if out else Path("runs") / f"{cfg.label}-job" / f"w{me}"
    run_dir = RunDir(check_writable(folder, "join(out=...)"), flag="join(out=...)",
                     fix="give join(out=...) another folder, or existing='overwrite'")
    append = outputs.claim(run_dir, cfg, existing)  # before anything connects
    return Job(cfg, me, coordinator=coordinator, token=secret, out=run_dir, append=append,
               checkpoint_dir=checkpoint_dir, host=host)


class Job:
    """A worker's membership in a run; :meth:`wrap` the model and optimizer to train.

    Construct with :func:`join`. Entering connects to the coordinator (or the torchrun
    group); leaving writes the run directory (``metrics.jsonl``, ``summary.json``,
    ``final.safetensors``) and leaves the membership, so the others go on without it.
    """

    def __init__(self, cfg: RunConfig, me: int, *, coordinator: str | None, token: bytes,
                 out: RunDir, append: bool, checkpoint_dir, host: str | None) -> None:
        self.cfg, self.me, self.coordinator, self.token = cfg, me, coordinator, token
        self.out, self.append, self.checkpoint_dir, self.host = out, append, checkpoint_dir, host
        self.trainer: Trainer | None = None
        self.membership = self.store = None
        self.data_size = 1  # this worker's share (FedAvg's n_k), once sampler() knows it
        self.stopping = threading.Event()  # SIGTERM: leave from any wait

    def __enter__(self) -> Job:
        self.started = time.perf_counter()
        self.membership, self.store = connect(self.cfg, self.me, coordinator=self.coordinator,
                                              token=self.token, host=self.host,
                                              stopping=self.stopping)
        self.out.start(self.cfg, append=self.append)
        return self

    @property
    def seed(self) -> int:
        """The run's seed: build the model right after ``torch.manual_seed(job.seed)``, as the
        simulator does, so every worker starts alike (and like the simulated run)."""
        return self.cfg.seed

    @property
    def inner_step(self) -> int:
        """The run's inner step this worker trains next (0 before :meth:`wrap`; a joiner's
        starts where the run is once wrapped)."""
        return self.trainer.inner_step if self.trainer is not None else 0

    def optimizer(self, model: nn.Module):
        """The inner optimizer and lr schedule the simulator builds for this config
        (:func:`islands.inner_optimizer`): pass both to :meth:`wrap`.

        Returns:
            ``(optimizer, scheduler)``.
        """
        return inner_optimizer(model, self.cfg)

    def sampler(self, dataset, *, labels=None, batch_size: int | None = None) -> ShareSampler:
        """This worker's share of ``dataset``, batch by batch, as the simulator deals it (see
        :class:`islands.ShareSampler`): ``DataLoader(dataset, batch_sampler=job.sampler(ds))``.
        Iteration starts at :attr:`inner_step` (a joiner where the run is) and ends with the
        run's last step; the share's size becomes this worker's FedAvg weight (``weighting =
        "dataset"``).

        Args:
            labels: the training labels, for ``data.partition = "dirichlet"``.
            batch_size: samples per batch (default: ``data.batch_size``), as the task's.
        """
        sampler = ShareSampler(dataset, self.cfg, self.me, start=lambda: self.inner_step,
                               labels=labels, batch_size=batch_size)
        self.data_size = sampler.size
        if self.trainer is not None:
            self.trainer.member.worker.data_size = sampler.size
        return sampler

    def batches(self, task: Task) -> Iterator:
        """The batches the simulator gives this worker with ``task``, from :attr:`inner_step`
        on (each read when it is asked for, so a round that aborts does not skip any)."""
        data = task.data(self.cfg.workers, self.cfg.seed, self.cfg.data)
        self.data_size = data.size(self.me)
        while self.trainer is None or not self.trainer.done:
            yield data.batch(self.me, self.inner_step)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, scheduler=None,
             evaluate: Callable[[nn.Module], dict] | None = None) -> Trainer:
        """The trainer of this worker: ``trainer.step()`` after each backward.

        Args:
            model: the user's model; every worker must build it identically (same seed).
            optimizer: its inner optimizer (state kept across rounds, never synchronized).
            scheduler: an lr scheduler stepped once per inner step.
            evaluate: ``evaluate(model) -> {"eval_loss": ..., ...}`` on held-out data, run
                on the global state when ``eval_every`` says (in ``metrics.jsonl``).
        """
        if self.trainer is not None:
            raise RuntimeError("this job already wraps a model; one trainer per worker")
        if self.membership is None:
            raise RuntimeError("use join(...) as a context manager: with islands.join(...) "
                               "as job: trainer = job.wrap(model, optimizer)")
        self.trainer = Trainer(self, model, optimizer, scheduler, evaluate)
        return self.trainer

    def __exit__(self, exc_type, exc, tb) -> None:
        # a clean end, a file that did not fit (a full checkpoint folder) or a token the
        # coordinator refuses: the run's own files are written either way (the final
        # parameters and summary first)
        ends = exc_type is None or issubclass(exc_type, (StorageError, Unauthorized))
        try:
            if self.trainer is not None and ends:
                job = self.membership.leave(finished=self.trainer.member.finished)
                self.trainer.finish(time.perf_counter() - self.started,
                                    {"coordinator": job} if job else {},
                                    error=None if exc is None else str(exc))
        finally:
            self.membership.close()
        if exc_type is None and self.trainer is not None and self.trainer.removed is not None:
            raise self.trainer.removed


class Trainer:
    """Drives one worker from the user's loop (see :meth:`step`). Built by :meth:`Job.wrap`."""

    def __init__(self, job: Job, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, evaluate) -> None:
        cfg, me = job.cfg, job.me
        self.job, self.cfg = job, cfg
        run = assemble(cfg, model=model)
        worker = run.user_worker(me, optimizer, scheduler, data_size=job.data_size)
        if isinstance(cfg.threads, int):  # the user's process: only a count changes it
            torch.set_num_threads(int(cfg.threads))
        self.transport = member_transport(cfg, me, job.membership, job.stopping)
        self.engine = run.engine(self.transport, [worker], WallClock((me,)), out=job.out,
                                 evaluate=evaluate)
        self.member = member_class(run.algorithm)(
            cfg, me, job.membership, job.store, self.transport, self.engine, lambda: worker,
            fresh_state(model), background=False, token=job.token,
            checkpoint_dir=job.checkpoint_dir, stopping=job.stopping)
        job.membership.on_live = self.member.on_live
        signal.signal(signal.SIGTERM, lambda *_: job.stopping.set())
        if hasattr(job.membership, "start"):  # the coordinator checks the model's fingerprint
            job.membership.fingerprint = fingerprint(cfg, model, rounds=self.engine.rounds)
            job.membership.start()
        self.done = False
        self.removed: Removed | None = None
        self._plan = None
        self._begin()

    @property
    def round(self) -> int:
        """The round this worker is in (the next to commit)."""
        return self.member.round

    @property
    def inner_step(self) -> int:
        """The run's inner step this worker takes next (a joiner starts where the run is)."""
        return self.member.worker.steps

    def _begin(self) -> None:
        """Passes the next round's ``start`` (a joiner receives the state here, before its
        first forward pass; a round it joins in flight as an observer, trained by the others,
        is synced and committed here too); sets :attr:`done` when the run is over."""
        try:
            while (plan := self.engine.begin(self.member)) is not None:
                if self.member.me in plan.participants:
                    break
                self.engine.finish(self.member, plan, {})  # no steps of its own in it
            self._plan = plan
        except Removed as e:
            self._remove(e)
            return
        if self._plan is None:
            self.done = True
            return
        self._losses, self._steps = [], 0
        self._since = time.perf_counter()

    def step(self, loss: float | torch.Tensor | None = None, samples: int = 1) -> None:
        """One inner step with the gradients in ``.grad``: clip, optimizer (and scheduler)
        step, zero the gradients; at the round's end, the sync (commit or abort).

        Args:
            loss: this step's training loss, for ``metrics.jsonl`` (optional).
            samples: samples in this step's batch (``local_sgd``'s sample weights).
        """
        if self.done:
            return
        value = None if loss is None else _loss_value(loss)  # refused before anything moves
        plan, engine, worker = self._plan, self.engine, self.member.worker
        # compute: the caller's batch, forward and backward since the last step (the engine
        # adds the optimizer step; a per-step collective is communication, not compute)
        engine.clock.compute(worker.id, time.perf_counter() - self._since)
        worker.samples += samples
        try:
            engine.step(Group(self.transport, plan.participants), [worker])
            engine.land_due(worker.steps)  # before the next step's forward, as engine.train
        except CommError as e:  # a per-step collective (DDP), or a sync landing, failed:
            self.member.abort(engine, plan, e)  # the round is void
            self._begin()
            return
        finally:
            worker.inner.zero_grad(set_to_none=True)
        if value is not None:
            self._losses.append(value)
        self._steps += 1
        if self._steps < len(engine.steps_of(plan.round)):
            self._since = time.perf_counter()
            return
        try:
            engine.finish(self.member, plan, {worker.id: self._losses})
        except Removed as e:
            self._remove(e)
            return
        self._begin()

    def _remove(self, why: Removed) -> None:
        """This worker cannot go on (excluded, or the job finished without it): the loop
        ends (:attr:`done`), and leaving the ``with`` block raises ``why`` once the run
        directory is written."""
        log.error("worker %d stops: %s", self.member.me, why)
        self.removed, self.done = why, True

    def finish(self, wall_s: float, extra: dict, *, error: str | None = None) -> dict:
        """Writes this worker's run directory (and merges its job's); returns its summary."""
        return outputs.finish(self.job.out, self.engine, self.member, wall_s,
                              {**extra, "error": error,
                               "removed": None if self.removed is None else str(self.removed)})


def _loss_value(loss) -> float:
    """``trainer.step(loss)``'s loss as a number, refusing one that is not a scalar."""
    if torch.is_tensor(loss):
        if loss.numel() != 1:
            raise TaskError(f"trainer.step(loss): loss must be a scalar (one value); it has "
                            f"shape {tuple(loss.shape)}: reduce it (e.g. .mean()) before "
                            "backward()")
        return float(loss.detach())
    return float(loss)
