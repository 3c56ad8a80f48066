"""The one round loop: what the simulator and the real runtime both drive.

An :class:`Engine` holds the workers this process drives (all of them in the simulator, one in
the runtime) and runs a round as

    begin_round (the algorithm's; stale workers refreshed)
    ->  inner steps (task batches, the algorithm's per-step sync)
    ->  contribute -> reduce -> apply (the round's sync, through the driver)
    ->  evaluation when due  ->  one metrics.jsonl row per local member  ->  summary.json

A *driver* decides what the engine cannot: which round comes next and with which members,
and how the round's sync is carried out. The simulator's driver takes every round in order
with everyone; the runtime's passes the coordinator's barriers, transfers state to joiners,
and wraps the sync in commit/abort (:mod:`islands.runtime.member`). A communication failure
(:class:`~islands.core.errors.CommError`) anywhere in a round goes to ``driver.abort``.

The same row and summary writers serve both worlds (``metrics.jsonl`` and ``summary.json``
have one schema; the runtime adds its own fields to each).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from safetensors.torch import save as save_safetensors

from islands.algorithms import Algorithm, Contribution, Worker
from islands.algorithms.base import copy_into, persistent_buffers
from islands.codecs import Identity
from islands.collectives.butterfly import Group, Work, rule_of
from islands.collectives.neighbours import start_neighbours
from islands.collectives.verify import verifiers_for
from islands.core.config import RunConfig
from islands.core.errors import CommError
from islands.core.seeding import derive_seed
from islands.engine import consensus
from islands.engine.asynchronous import AsyncFaults, PostDriver, run_async, run_posted
from islands.engine.attacks import Attack
from islands.engine.judge import Judge, worker_rules
from islands.metrics.run_dir import RunDir
from islands.tasks import Partition, Task, checked_loss, to_device
from islands.transports.base import Flight, Transport


class WallClock:
    """The real runtime's clock: seconds since the first inner step, compute time measured."""

    kind = "measured"  # summary.json's "clock" (its virtual_time_s fields are wall seconds)

    def __init__(self, workers: tuple[int, ...]) -> None:
        self.compute_s = dict.fromkeys(workers, 0.0)
        self.comm_s = dict.fromkeys(workers, 0.0)
        self.hidden_s = dict.fromkeys(workers, 0.0)  # a sync in flight while computing
        self._t0: float | None = None

    def compute(self, worker: int, seconds: float) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter() - seconds
        self.compute_s[worker] += seconds

    def time_s(self, worker: int) -> float:
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    @property
    def makespan_s(self) -> float:
        return self.time_s(0)

    def utilization(self) -> float:
        span = self.makespan_s
        return sum(self.compute_s.values()) / (len(self.compute_s) * span) if span > 0 else 1.0


@dataclass
class RoundPlan:
    """One round as the driver sets it.

    Attributes:
        round: the round's index.
        members: the workers of the round (metrics rows are written for the local ones).
        participants: those that train and take part in the sync.
        everyone: the group ``algorithm.begin_round`` runs on.
        info: whatever the driver needs back in :meth:`Driver.sync` / ``abort``.
    """

    round: int
    members: tuple[int, ...]
    participants: tuple[int, ...]
    everyone: Group
    info: dict = field(default_factory=dict)
    marks: dict = field(default_factory=dict)  # bytes at the round's start (Engine.begin)


class Driver(Protocol):
    def next_round(self, engine: Engine) -> RoundPlan | None:
        """The next round to train (None: the run is over)."""

    def sync(self, engine: Engine, plan: RoundPlan, losses: dict[int, list[float]]
             ) -> dict[str, Any]:
        """Carries out the round's sync (``engine.end_round``); returns extra row fields."""

    def abort(self, engine: Engine, plan: RoundPlan, error: CommError) -> None:
        """The round failed: restore what it changed."""

    def committed(self, engine: Engine, plan: RoundPlan, point: dict | None) -> None:
        """The round is done (after its row is written)."""


class Clock(Protocol):
    """What the engine needs of a clock: the simulator's ``VirtualClock`` (modelled time, a
    timeline per worker and link) or the runtime's :class:`WallClock` (measured time).

    ``compute_s``, ``comm_s`` (communication waited for) and ``hidden_s`` (communication
    that crossed the link while the worker computed) are per worker, indexed by worker id."""

    kind: str
    compute_s: Any
    comm_s: Any
    hidden_s: Any

    def compute(self, worker: int, seconds: float) -> None: ...

    def time_s(self, worker: int) -> float: ...

    @property
    def makespan_s(self) -> float: ...

    def utilization(self) -> float: ...


class Sync:
    """A sync issued: :meth:`wait` waits for its results (collectives issued in the
    background: for their flight) and applies them; :meth:`discard` only waits.

    ``joiners``: ``(worker, member)`` pairs of workers that joined while it was in flight
    (they hold the committed state it does not include yet): each applies ``member``'s
    result too, so every replica takes the same outer step."""

    def __init__(self, results: Callable[[], list[dict]],
                 apply: Callable[[list[dict], list], None], flight: Flight | None = None
                 ) -> None:
        self._results, self._apply, self.flight = results, apply, flight
        self.joiners: list[tuple[Worker, int]] = []

    def wait(self) -> None:
        self._apply(self._results(), self.joiners)

    def discard(self) -> None:
        with contextlib.suppress(CommError):
            self._results()


class Engine:
    """The round loop of one run over the workers this process drives.

    Args:
        cfg: the run's config.
        algorithm: the algorithm (workers already attached with :func:`engine.attach`).
        transport: moves the collectives' messages (and counts their bytes).
        workers: the local workers, built from the same initial model.
        task: trains and evaluates (None: the user's own loop; no :meth:`train`).
        partition: the task's training data for ``cfg.workers`` workers.
        device: where batches go.
        clock: a ``VirtualClock`` (simulator) or :class:`WallClock` (runtime).
        step_time_s: virtual seconds per inner step of each worker (None: measured).
        eval_model: a copy of the model the evaluation loads the global state into.
        out: the run directory to write (None: nowhere).
        evaluate: ``evaluate(model) -> {"eval_loss": ...}`` (default: the task's; None
            without a task: no evaluation).
    """

    def __init__(self, cfg: RunConfig, algorithm: Algorithm, transport: Transport,
                 workers: list[Worker], *, task: Task | None, partition: Partition | None,
                 device: torch.device, clock, step_time_s: dict[int, float] | None = None,
                 eval_model: torch.nn.Module | None = None, out: RunDir | None = None,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None) -> None:
        self.cfg, self.algorithm, self.transport = cfg, algorithm, transport
        self.evaluator = evaluate or (task.evaluate if task is not None else None)
        self.workers, self.task, self.partition = workers, task, partition
        self.device, self.clock, self.step_time_s = device, clock, step_time_s
        self.eval_model, self.out = eval_model, out
        self._loss = checked_loss(task.loss) if task is not None else None
        # where each round starts (an H schedule, a data-parallel phase), computed once
        self.bounds = algorithm.round_bounds(cfg.steps)
        self.rounds = len(self.bounds) - 1
        self.curve: list[dict] = []  # evaluations of the global state
        # a real gossip worker's parameters at each evaluation ({step: count sketch}), for
        # the job's consensus distance
        self.sketches: dict[int, torch.Tensor] = {}
        # the mean train loss per round trained here, every ``_curve_every``-th round: at most
        # TRAIN_CURVE_POINTS points however long the run (metrics.jsonl has every round)
        self.train_curve: list[dict] = []
        self._curve_every = 1
        self._last_point: dict | None = None  # the latest round's, kept or not
        self._exact = Identity()  # buffers travel as exact fp32
        # a trusted job: lossless plain means through the transport's own all_reduce
        self._native = cfg.runtime.trust == "cluster"
        # an overlapped algorithm: the previous round's sync, still crossing the wire, and
        # the inner step it lands at (None: at the next round's sync)
        self._pending: Sync | None = None
        self._due: int | None = None
        self._to_issue: tuple[Group, list[Worker]] | None = None  # committed, not yet issued
        self.peak_round_sent = 0  # the most bytes a local worker sent in one round
        self.round = 0  # the round in progress (Engine.begin)
        self.attack = (None if cfg.attack.name == "none" else
                       Attack(cfg.attack, cfg.workers, classes=getattr(task, "classes", None)))
        self.aggregators = worker_rules(cfg, algorithm, workers)
        probe = (cfg.aggregator.build() if isinstance(self.aggregators, dict)
                 else self.aggregators)
        self.whole_vector = getattr(probe, "whole_vector", False)
        self.judge = Judge(cfg.aggregator)
        # {member: its aggregation weight this round, as the coordinator recorded it} (the
        # real runtime's other members; the simulator knows every worker's own)
        self.round_weights: dict[int, float] = {}
        self.async_summary: dict = {}  # an asynchronous run's own summary fields (its loop's)
        self._members = tuple(w.id for w in workers)  # the last recorded round's

    # --- a round's pieces ------------------------------------------------------------------

    def steps_of(self, r: int) -> range:
        return range(self.bounds[r], self.bounds[r + 1])

    def start_of(self, r: int) -> int:
        """The inner step round ``r`` starts at (``steps`` from the end of the run on)."""
        return self.bounds[min(r, self.rounds)]

    def fast_forward(self, worker: Worker, r: int) -> None:
        """Puts a worker's step count and lr schedule at the start of round ``r`` (a joiner,
        a resume), as if it had trained every step before."""
        with warnings.catch_warnings():  # stepping a schedule alone is the point here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                    category=UserWarning)
            while worker.steps < self.start_of(r):
                if worker.scheduler is not None:
                    worker.scheduler.step()
                worker.steps += 1

    def begin_round(self, everyone: Group, workers: list[Worker], r: int) -> None:
        """Before a round's inner steps: the algorithm's own preparation, then the workers it
        names stale receive the global parameters (and buffers) from its source, broadcast
        as exact fp32 (``Group.broadcast``)."""
        self.algorithm.begin_round(everyone, workers, r)
        refresh = self.algorithm.refresh(r, everyone.members)
        if refresh is None:
            return
        src, stale = refresh
        sub = Group(self.transport, (src, *stale))
        if not sub.local:  # a process whose worker neither sends nor receives the state
            return
        by_id = {w.id: w for w in workers}
        have = by_id.get(src)
        got = sub.broadcast(src, have.global_params if have else None, self._exact, stale,
                            tag="state-sync")
        for wid, flat in got.items():
            by_id[wid].global_params = flat
            by_id[wid].load_flat(flat)
        if workers and workers[0].global_buffers is not None:  # BatchNorm statistics
            got = sub.broadcast(src, have.global_buffers if have else None, self._exact,
                                stale, tag="state-sync/buffers")
            for wid, flat in got.items():
                by_id[wid].global_buffers = flat
                by_id[wid].load_flat_buffers(flat)

    def local(self, ids) -> list[Worker]:
        """The local workers among ``ids``, in id order."""
        return [w for w in self.workers if w.id in ids]

    def train(self, r: int, participants: tuple[int, ...]) -> dict[int, list[float]]:
        """The round's inner steps for the local participants; returns their losses (none:
        a process whose worker sits the round out)."""
        active = self.local(participants)
        if not active:
            return {}
        return self.inner_steps(active, self.steps_of(r), Group(self.transport, participants))

    def inner_steps(self, active: list[Worker], steps: range, group: Group
                    ) -> dict[int, list[float]]:
        """Inner steps ``steps`` of the workers ``active`` (the step index picks each batch);
        returns their losses."""
        losses: dict[int, list[float]] = {w.id: [] for w in active}
        for step in steps:
            self.land_due(step)
            for w in active:
                t0 = time.perf_counter()
                batch = to_device(self.partition.batch(w.id, step), self.device)
                if self.attack is not None:
                    batch = self.attack.batch(w.id, self.round, batch)
                losses[w.id].append(w.backward(self._loss, batch, self.task.batch_size(batch)))
                self.clock.compute(w.id, time.perf_counter() - t0 if self.step_time_s is None
                                   else self.step_time_s[w.id])
            self.step(group, active)
        return losses

    def step(self, group: Group, workers: list[Worker]) -> None:
        """The end of an inner step: the per-step sync (DDP), then each optimizer step."""
        if self.algorithm.syncs_gradients_at(workers[0].steps):
            self.start_sync(group, workers).wait()
        for w in workers:
            t0 = time.perf_counter()
            w.apply()
            if self.step_time_s is None:  # measured compute: the optimizer step is in it
                self.clock.compute(w.id, time.perf_counter() - t0)

    def end_round(self, group: Group, workers: list[Worker], observers: tuple[int, ...] = ()
                  ) -> None:
        """The round's sync (none for a round whose step synced gradients). An overlapped
        algorithm's: the previous round's sync lands (its outer step), and this round's is
        issued by :meth:`issue_overlapped` once the round is committed; the run's last round
        waits for its own, so the run ends on the complete global state."""
        self._to_issue = None
        if self.step_time_s is not None and self.cfg.compute.commit_time_s:
            for w in workers:  # modelled compute: the round's commit is modelled too
                self.clock.commit(w.id, self.cfg.compute.commit_time_s)
        if self.algorithm.syncs_gradients_at(workers[0].steps - 1):
            self.land()  # an overlapped round before a data-parallel one
            for w in workers:
                self.algorithm.after_gradient_round(w)
        elif self.algorithm.overlaps:
            self.land()
            if workers[0].steps < self.bounds[-1] and self.algorithm.overlap_steps != 0:
                self._to_issue = (group, workers)
                return
            self._wait(self._in_background(group, workers))
            for w in workers:
                self.algorithm.restart(w, settled=True)
        else:
            self.start_sync(group, workers, observers).wait()
            while self.algorithm.syncs_again(workers[0]):  # a second exchange of the round
                self.start_sync(group, workers, observers).wait()
            if self.algorithm.final_merge and workers[0].steps >= self.bounds[-1]:
                self.merge(group, workers)

    def merge(self, group: Group, workers: list[Worker]) -> None:
        """The single final merge of a gossip run: every member's global parameters
        averaged exactly (fp32, the all-reduce's bytes counted), loaded by every member."""
        state = {w.id: self.algorithm.global_state(w) for w in workers}
        merged = group.start_all_reduce(state, codecs={w.id: self._exact for w in workers},
                                        tag="final-merge", native=self._native).wait()
        with torch.no_grad():
            for w in workers:
                w.global_params.copy_(merged[w.id])
                w.load_flat(w.global_params.detach())

    def issue_overlapped(self) -> None:
        """After a committed round of an overlapped algorithm: its sync is issued in the
        background (in the runtime, on a thread: it crosses the wire while the next round
        trains) and the workers start the next round without its result
        (``algorithm.restart``); it lands at the next round's sync (or ``overlap_steps`` inner
        steps on). Nothing for a blocking algorithm."""
        if self._to_issue is None:
            return
        (group, workers), self._to_issue = self._to_issue, None
        self._pending = self._in_background(group, workers)
        for w in workers:
            self.algorithm.restart(w, settled=False, averaged=len(group.members))
        delay = self.algorithm.overlap_steps
        self._due = None if delay is None else workers[0].steps + delay

    def _in_background(self, group: Group, workers: list[Worker]) -> Sync:
        """The workers' sync, issued through ``transport.in_background``."""
        with self.transport.in_background() as flight:
            return self.start_sync(group, workers, flight=flight)

    def land_due(self, step: int) -> None:
        """Before inner step ``step``: the sync in flight lands if it is due by then (an
        algorithm whose sync lands ``overlap_steps`` inner steps after it was issued)."""
        if self._due is not None and step >= self._due:
            self.land()

    def land(self) -> None:
        """The sync in flight lands: waited for (what is left of it) and applied. It is gone
        either way: a failure (``CommError``) loses its round's update."""
        sync, self._pending, self._due = self._pending, None, None
        if sync is not None:
            self._wait(sync)

    def adopt_in_flight(self, joiner: Worker, member: Worker) -> None:
        """A worker that joined with ``member``'s committed state while a sync is in flight
        (an overlapped algorithm's) applies that sync's result too, ``member``'s, when it
        lands (the simulator's fault plan: the joiner's replica stays everyone's)."""
        if self._pending is not None:
            self.algorithm.adopt_in_flight(joiner, member)
            self._pending.joiners.append((joiner, member.id))

    @property
    def in_flight(self) -> bool:
        """Whether a sync is crossing the wire in the background."""
        return self._pending is not None

    def void_overlap(self) -> None:
        """A round aborted: the sync in flight (if any) is waited for and discarded, and
        the round's own is not issued."""
        sync, self._pending, self._due, self._to_issue = self._pending, None, None, None
        if sync is not None:
            sync.discard()

    def _wait(self, sync: Sync) -> None:
        """Waits for and applies a sync; a flight measured on the wall clock (a real
        transport's thread) counts as communication hidden behind compute, but for the
        part waited for."""
        try:
            sync.wait()
        finally:
            timing = sync.flight.timing() if sync.flight is not None else None
            if timing is not None:
                ran_s, waited_s = timing
                for w in self.workers:
                    self.clock.comm_s[w.id] += waited_s
                    self.clock.hidden_s[w.id] += max(0.0, ran_s - waited_s)

    def start_sync(self, group: Group, workers: list[Worker], observers: tuple[int, ...] = (),
                   *, flight: Flight | None = None) -> Sync:
        """Contribute -> reduce: issues one collective per contribution (and one for the
        model's buffers, averaged with the first contribution's weights, exact fp32).

        Args:
            flight: issue the collectives in the background (``transport.in_background``);
                the contributions are taken here, at once."""
        plans = {w.id: self.algorithm.contribute(w, observers) for w in workers}
        for w in workers:
            flat = w.flat_buffers()
            if flat is not None:
                first = plans[w.id][0]
                plans[w.id].append(
                    dataclasses.replace(first, tensor=flat, tag="buffers", segments=(),
                                        out=None)
                    if first.collective == "neighbours"
                    else Contribution(flat, first.weight, tag="buffers"))
        count = len(plans[workers[0].id])
        r, attack = self.round, self.attack
        claims = [None] * count
        if attack is not None:  # what the Byzantine among the local workers send instead
            attack.corrupt(r, plans, tuple(group.members))
            claims = [{w.id: c for w in workers
                       if (c := attack.claims(w.id, r, plans[w.id][k].weight))
                       != plans[w.id][k].weight} or None for k in range(count)]
        sent = {wid: p[0].tensor for wid, p in plans.items()}

        def issue() -> list[Work]:
            works = []
            for k in range(count):
                items = {wid: p[k] for wid, p in plans.items()}
                first = items[workers[0].id]
                exact = first.tag == "buffers"
                # the weights the coordinator recorded (the runtime), a local worker's own
                # included: where the job's config fixes it, the recorded one is what counts
                weights = (None if first.weight is None
                           else {**{wid: c.weight for wid, c in items.items()},
                                 **{m: 0.0 if m in observers else w
                                    for m, w in self.round_weights.items()
                                    if m in group.members}})
                tensors = {wid: c.tensor for wid, c in items.items()}
                codecs = {w.id: self._exact if exact else w.codec for w in workers}
                if attack is not None:
                    codecs = {wid: attack.codec(wid, r, c) for wid, c in codecs.items()}
                rules = self.aggregators
                if attack is not None:  # a lying shard owner
                    rules = {w.id: attack.rule(w.id, r, rule_of(rules, w.id)) for w in workers}
                if first.collective == "neighbours":
                    works.append(start_neighbours(
                        group, tensors, codecs=codecs, tag=first.tag, steps=first.steps,
                        segments=first.segments,
                        rows={wid: c.mixing for wid, c in items.items()},
                        send_to={wid: c.send_to for wid, c in items.items()}))
                elif first.collective == "all_gather" or self.whole_vector:
                    works.append(group.start_all_gather(
                        tensors, codecs=codecs, aggregator=rules, weights=weights,
                        tag=first.tag, claims=claims[k]))
                else:
                    out = {wid: c.out for wid, c in items.items()}
                    works.append(group.start_all_reduce(
                        tensors, codecs=codecs, aggregator=rules, weights=weights,
                        tag=first.tag, native=self._native, claims=claims[k],
                        verifiers=self._verifiers(r, first.tag, group.members),
                        out=None if any(o is None for o in out.values()) else out))
            return works

        has_buffers = workers[0].buffers != []

        def apply(results: list[dict], joiners: list) -> None:
            mine = results[:-1] if has_buffers else results
            # (the native all-reduce overwrites the contribution with the mean: nothing to say)
            self.judge.observe(r, group.members, {} if self._native else sent, mine[0],
                               self.aggregators)
            for w, member in [*((w, w.id) for w in workers), *joiners]:
                self.algorithm.apply(w, [res[member] for res in mine])
                if has_buffers:
                    w.global_buffers = results[-1][member]
                    w.load_flat_buffers(w.global_buffers)

        if flight is not None:
            flight.run(lambda: [w.wait() for w in issue()])
            return Sync(flight.settle, apply, flight)
        works = issue()
        return Sync(lambda: [w.wait() for w in works], apply)

    def _verifiers(self, r: int, tag: str, members: tuple[int, ...]) -> dict[int, int] | None:
        """Who verifies whose shard in this sync (None: not verified), drawn alike on every
        member from the seed, the round and the stream (``aggregator.verify``)."""
        p = self.cfg.aggregator.verify
        if not p or len(members) < 2:
            return None
        draw = random.Random(derive_seed(self.cfg.seed, "verify", r, tag))
        if draw.random() >= p:
            return None
        return verifiers_for(members, draw.randrange(1, len(members)))

    # --- evaluation and metrics ------------------------------------------------------------

    def eval_due(self, r: int) -> bool:
        steps, every = self.steps_of(r), self.cfg.eval_every
        return steps.stop // every > steps.start // every or r == self.rounds - 1

    @torch.no_grad()
    def evaluate(self, worker: Worker, step: int, members: tuple[int, ...] | None = None
                 ) -> dict:
        """The task's metrics of ``worker``'s global state (parameters and buffers). Without
        shared parameters (gossip): of the average of the ``members``' global states (default:
        every local worker), with ``loss_own``, the mean eval loss of a fixed sample of the
        workers' own (:func:`~islands.engine.consensus.own_sample`), and the
        ``consensus_distance``."""
        if self.algorithm.shares_parameters:
            metrics = self._metrics(self.algorithm.global_state(worker), worker.global_buffers)
        else:
            metrics = self._gossip_metrics(members or tuple(w.id for w in self.workers), step)
        return {"step": step, "worker": worker.id, **metrics,
                "bytes_sent_per_worker": self.sent_per_worker(),
                "virtual_time_s": self.clock.makespan_s}

    def _metrics(self, params: torch.Tensor, buffers: torch.Tensor | None) -> dict:
        m = self.eval_model
        copy_into(params, [p for p in m.parameters() if p.requires_grad])
        if buffers is not None:
            copy_into(buffers, persistent_buffers(m))
        m.eval()
        metrics = self.evaluator(m)
        if "eval_loss" not in metrics:
            raise ValueError(f"evaluate() must return 'eval_loss' (got {sorted(metrics)})")
        return {k: float(v) for k, v in metrics.items()}

    def _gossip_metrics(self, members: tuple[int, ...], step: int) -> dict:
        """The members' average model evaluated, its own models' sampled, the consensus
        distance; where this engine holds only some members (a real process holds its own),
        its own models' average and no distance (the others' parameters are not here): a
        real process keeps a sketch of its parameters in ``sketches`` instead (see
        :func:`~islands.engine.consensus.sketch`)."""
        alg, workers = self.algorithm, self.local(members)
        mean = consensus.average(alg, workers)
        metrics = self._metrics(mean, _mean_buffers(workers))
        if len(workers) < len(members):
            if len(workers) == 1:
                self.sketches[step] = consensus.sketch(mean, self.cfg.seed)
            return {**metrics, "loss_own": metrics["eval_loss"]}
        sample = consensus.own_sample(self.cfg.seed, self.cfg.workers,
                                      tuple(w.id for w in workers))
        own = [self._metrics(alg.global_state(w), w.global_buffers)["eval_loss"]
               for w in self.local(sample)]
        return {**metrics, "loss_own": sum(own) / len(own),
                "consensus_distance": consensus.distance(alg, workers, mean)}

    @torch.no_grad()
    def evaluate_states(self, states: dict[int, dict[str, torch.Tensor]],
                        mean: dict[str, torch.Tensor]) -> dict:
        """A gossip job's end from its workers' ``final.safetensors`` ({worker: state_dict})
        and their average (``mean``), as the simulator reports it: the average's metrics
        (``final_eval_*``), the mean eval loss of the same sample of own models
        (``final_eval_loss_own``) and the consensus distance over the trainable parameters."""
        model = self.eval_model
        names = [n for n, p in model.named_parameters() if p.requires_grad]

        def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([state[n].reshape(-1).float() for n in names])

        def metrics(state: dict[str, torch.Tensor]) -> dict:
            model.load_state_dict(state)
            model.eval()
            return {k: float(v) for k, v in self.evaluator(model).items()}

        avg = metrics(mean)
        sample = consensus.own_sample(self.cfg.seed, self.cfg.workers, tuple(sorted(states)))
        own = [metrics(states[i])["eval_loss"] for i in sample]
        return {"final_eval_loss": avg["eval_loss"],
                **{f"final_eval_{k}": v for k, v in avg.items() if k != "eval_loss"},
                "final_eval_loss_own": sum(own) / len(own),
                "final_eval_consensus_distance": consensus.distance_of(
                    [flat(states[i]) for i in sorted(states)], flat(mean))}

    def final_params(self, worker: Worker) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The run's result: ``worker``'s global parameters and buffers (flat), or, without
        shared parameters (gossip), the average of the last round's members'."""
        if self.algorithm.shares_parameters:
            return self.algorithm.global_state(worker), worker.global_buffers
        members = self.local(self._members) or [worker]  # (no round recorded here yet)
        return consensus.average(self.algorithm, members), _mean_buffers(members)

    @torch.no_grad()
    def final_state(self, worker: Worker) -> dict[str, torch.Tensor]:
        """The global parameters and buffers ``worker`` holds, as the model's ``state_dict``
        (every name, frozen parameters included; on the CPU; no two entries share memory, so
        tied weights appear under each name)."""
        model = copy.deepcopy(self.eval_model if self.eval_model is not None else worker.model)
        params, buffers = self.final_params(worker)
        copy_into(params, [p for p in model.parameters() if p.requires_grad])
        if buffers is not None:
            copy_into(buffers, persistent_buffers(model))
        return {k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in model.state_dict().items()}

    def final_bytes(self, worker: Worker) -> bytes:
        """``final.safetensors``: :meth:`final_state` with the run's facts in its metadata
        (``torch.load``-free: ``safetensors.torch.load_file`` reads it into a state_dict)."""
        facts = {"algorithm": self.cfg.algorithm.name, "seed": self.cfg.seed,
                 "rounds": self.rounds, "worker": worker.id}
        return save_safetensors(self.final_state(worker), metadata={"islands": json.dumps(facts)})

    def final_nbytes(self) -> int:
        """An upper bound of ``final.safetensors`` and ``summary.json`` together: the room a
        run directory keeps for them (the tensors, safetensors' header, and the summary's
        curves: at most :data:`TRAIN_CURVE_POINTS` train points, and the evaluations)."""
        model = self.eval_model if self.eval_model is not None else self.workers[0].model
        tensors = sum(v.numel() * v.element_size() + 160 for v in model.state_dict().values())
        evals = 1 + sum(self.eval_due(r) for r in range(self.rounds))
        points = 200 * min(self.rounds, TRAIN_CURVE_POINTS) + 300 * evals  # indented JSON
        return tensors + points + 128 * self.cfg.workers + 16_384

    def sent_per_worker(self) -> float:
        return sum(self.transport.sent(w.id) for w in self.workers) / len(self.workers)

    def marks(self) -> dict[int, tuple[int, int]]:
        """Bytes sent and received so far by each local worker (a row's starting point)."""
        return {w.id: (self.transport.sent(w.id), self.transport.received(w.id))
                for w in self.workers}

    def record(self, r: int, members: tuple[int, ...], losses: dict[int, list[float]],
               marks: dict[int, tuple[int, int]], extra: dict | None = None,
               evaluate: bool = True, *, step: int | None = None, due: bool | None = None,
               at_s: float | None = None) -> dict | None:
        """After a committed round: the evaluation when due, one row per local member.

        Args:
            step, due, at_s: the round's last step (default: where the round schedule ends
                it), whether an evaluation is due (default: :meth:`eval_due`) and the
                virtual time of its points (default: the clock's makespan); an
                asynchronous update sets them itself.
        """
        step = self.steps_of(r).stop if step is None else step
        at_s = self.clock.makespan_s if at_s is None else at_s
        trained = [sum(v) / len(v) for v in losses.values() if v]
        if trained:
            self._last_point = {"round": r, "step": step,
                                "train_loss": sum(trained) / len(trained),
                                "bytes_sent_per_worker": self.sent_per_worker(),
                                "virtual_time_s": at_s}
            self._keep_train_point(self._last_point)
        point = None
        local = self.local(members)
        self._members = tuple(members) or self._members  # a lost round keeps the last
        if not self.algorithm.shares_parameters and local and len(local) == len(members):
            extra = {"consensus_distance": consensus.distance(self.algorithm, local),
                     **(extra or {})}
        due = self.eval_due(r) if due is None else due
        if evaluate and self.evaluator is not None and local and due:
            fresh = next((w for w in local if losses.get(w.id)), local[0])
            point = {**self.evaluate(fresh, step, tuple(members)), "virtual_time_s": at_s}
            self.curve.append(point)
        for w in local:
            self.peak_round_sent = max(self.peak_round_sent,
                                       self.transport.sent(w.id) - marks[w.id][0])
        if self.out is not None:
            for w in local:
                self.out.log(self.row(r, w, losses.get(w.id, []), marks[w.id], point, extra))
        return point

    @property
    def last_loss(self) -> float:
        """The mean train loss of the latest round trained here (NaN before one)."""
        return self._last_point["train_loss"] if self._last_point else float("nan")

    def _keep_train_point(self, point: dict) -> None:
        if point["round"] % self._curve_every:
            return
        self.train_curve.append(point)
        if len(self.train_curve) > TRAIN_CURVE_POINTS:  # halve: every other kept point goes
            self._curve_every *= 2
            self.train_curve = [p for p in self.train_curve
                                if p["round"] % self._curve_every == 0]

    def train_points(self) -> list[dict]:
        """The kept train-loss points, ending with the last round's."""
        last, kept = self._last_point, self.train_curve
        return kept + [last] if last is not None and (not kept or kept[-1] is not last) else kept

    def row(self, r: int, worker: Worker, losses: list[float], mark: tuple[int, int],
            point: dict | None, extra: dict | None) -> dict:
        """One ``metrics.jsonl`` line (the runtime adds its fields in ``extra``)."""
        sent, received = self.transport.sent(worker.id), self.transport.received(worker.id)
        row = {"round": r, "step": worker.steps, "worker": worker.id,
               "train_loss": sum(losses) / len(losses) if losses else None,
               "bytes_sent": sent - mark[0], "bytes_received": received - mark[1],
               "bytes_sent_cum": sent, "virtual_time_s": self.clock.time_s(worker.id)}
        if point is not None:
            row.update({k: v for k, v in point.items() if k not in _POINT_FACTS})
        return {**row, **self.judge.row(worker.id), **(extra or {})}

    def summary(self, wall_s: float) -> dict:
        """The ``summary.json`` figures of the local workers."""
        cfg, t, clock = self.cfg, self.transport, self.clock
        ids = [w.id for w in self.workers]
        sent = [t.sent(i) for i in ids]
        final = self.curve[-1] if self.curve else {}
        span = clock.makespan_s
        return {
            "name": cfg.label, "task": self.task.name if self.task else "own loop",
            "algorithm": cfg.algorithm.name, "workers": cfg.workers, "steps": cfg.steps,
            "rounds": self.rounds, "sync_every": _plain(self.algorithm.sync_every),
            **({"ddp_steps": ddp} if (ddp := getattr(cfg.algorithm, "ddp_steps", 0)) else {}),
            "codec": cfg.algorithm.wire_codec(cfg.codec).name,
            "codec_detail": repr(self.workers[0].codec), "aggregator": cfg.aggregator.name,
            "params": sum(p.numel() for p in self.workers[0].params),
            "final_eval_loss": final.get("eval_loss"),
            **{f"final_eval_{k}": v for k, v in final.items()
               if k not in _POINT_FACTS and k != "eval_loss"},
            "final_train_loss": self.last_loss,
            "bytes_sent_per_worker": sum(sent) / len(ids),
            "bytes_received_per_worker": sum(t.received(i) for i in ids) / len(ids),
            "bytes_sent_by_worker": sent, "bytes_sent_total": sum(sent),
            "clock": clock.kind, "virtual_time_s": span,
            "compute_utilization": clock.utilization(),
            "compute_s_by_worker": [clock.compute_s[i] for i in ids],
            "idle_s_by_worker": [max(0.0, span - clock.compute_s[i] - clock.comm_s[i])
                                 for i in ids],
            "peak_round_bytes_sent": self.peak_round_sent,
            **({"busiest_link_bytes": max(links.values(), default=0)}
               if (links := getattr(t, "link_bytes", None)) is not None else {}),
            "comm_exposed_s_by_worker": [clock.comm_s[i] for i in ids],
            "comm_hidden_s_by_worker": [clock.hidden_s[i] for i in ids],
            "eval_curve": self.curve,
            "train_curve": self.train_points(),
            **self.judge.summary(),
            **({"topology": describe()}
               if (describe := getattr(self.algorithm, "describe", None)) else {}),
            "wall_time_s": wall_s, "seed": cfg.seed,
            "threads": torch.get_num_threads(),
            **self.async_summary,
        }

    # --- the loop --------------------------------------------------------------------------

    def run(self, driver: Driver, on_round: Callable[[dict], None] | None = None, *,
            async_faults: AsyncFaults | None = None,
            async_order: list[dict] | None = None) -> dict:
        """Runs rounds while the driver hands them out; returns the summary figures (the
        caller writes them, with its own fields). An asynchronous algorithm has no rounds:
        its loop runs instead (:func:`~islands.engine.asynchronous.run_async`), with
        ``async_faults`` (the simulator's fault plan for it) or ``async_order`` (the updates
        in a given order); a real process's (:func:`~islands.engine.asynchronous.run_posted`)
        when the driver is a :class:`~islands.engine.asynchronous.PostDriver`."""
        if self.algorithm.asynchronous:  # no rounds: updates in the order they are posted
            if isinstance(driver, PostDriver):  # a real process: the coordinator's order
                return run_posted(self, driver, on_round)
            return run_async(self, on_round, async_faults, async_order)
        started = time.perf_counter()
        while (plan := self.begin(driver)) is not None:
            try:
                losses = self.train(plan.round, plan.participants)
            except CommError as e:
                driver.abort(self, plan, e)
                continue
            self.finish(driver, plan, losses, on_round)
        return self.summary(time.perf_counter() - started)

    # --- a round's steps: Engine.run, the runtime's member and the drop-in call these -------

    def begin(self, driver: Driver) -> RoundPlan | None:
        """Starts the next round the driver hands out: the first evaluation (before round
        0), the byte marks of its rows, :meth:`begin_round` (a failure aborts the round
        through the driver and asks for the next). None: the run is over.

        The round's inner steps follow (:meth:`train`, or the user's own loop calling
        :meth:`step`), then :meth:`finish`."""
        while (plan := driver.next_round(self)) is not None:
            local = self.local(plan.members)
            self.round = plan.round
            if plan.round == 0 and not self.curve and self.evaluator is not None and local:
                self.curve.append(self.evaluate(local[0], 0))
            plan.marks = self.marks()
            try:
                self.begin_round(plan.everyone, self.local(plan.everyone.members), plan.round)
            except CommError as e:
                driver.abort(self, plan, e)
                continue
            return plan
        return None

    def finish(self, driver: Driver, plan: RoundPlan, losses: dict[int, list[float]],
               on_round: Callable[[dict], None] | None = None) -> dict | None:
        """Ends a round after its inner steps: its sync through the driver (a failure aborts
        it), then its evaluation when due, rows and commit. Returns the evaluation point (None:
        none due, or aborted)."""
        try:
            extra = driver.sync(self, plan, losses)
        except CommError as e:
            driver.abort(self, plan, e)
            return None
        self.issue_overlapped()
        r = plan.round
        point = self.record(r, plan.members, losses, plan.marks, extra)
        driver.committed(self, plan, point)
        if on_round is not None:
            on_round({"round": r + 1, "rounds": self.rounds, "step": self.steps_of(r).stop,
                      "train_loss": self.last_loss,
                      "eval_loss": self.curve[-1]["eval_loss"] if self.curve else None,
                      "bytes_sent_per_worker": self.sent_per_worker()})
        return point


def _mean_buffers(workers: list[Worker]) -> torch.Tensor | None:
    """The mean of the workers' committed buffers (None: the model has none)."""
    if workers[0].global_buffers is None:
        return None
    return torch.stack([w.global_buffers.float() for w in workers]).mean(0)


def _plain(sync_every):
    """H as ``summary.json`` records it: the int, or the schedule's ``[[step, H], ...]``."""
    return sync_every if isinstance(sync_every, int) else [list(p) for p in sync_every]


# the most points ``summary.json``'s train_curve keeps; beyond, every other one is dropped
TRAIN_CURVE_POINTS = 2048

# facts of an evaluation point that are not metrics
_POINT_FACTS = ("step", "worker", "bytes_sent_per_worker", "virtual_time_s")
