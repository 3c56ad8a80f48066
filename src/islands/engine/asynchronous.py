"""The engine's asynchronous loop: no rounds, one update after another in the order they are
posted (an algorithm with ``asynchronous = True``; :mod:`islands.algorithms.asynchronous`).

Each worker trains the inner steps the algorithm gives it from the global parameters it last
pulled; the worker that finishes first (on its own clock) posts next:

    inner steps  ->  staleness check  ->  post the pseudo-gradient to every worker (one-way;
    every replica applies it after those posted before it)  ->  wait for the updates posted
    before it to arrive  ->  the worker pulls the global parameters  ->  its next inner steps

Every replica applies the same updates in the same order, so they stay identical; a worker
sends its own at once and waits only for the posts that must reach it before it can pull.
The budget is the synchronous run's data: ``workers × steps`` inner steps in all. Each update
writes one ``metrics.jsonl`` row (its worker's); the evaluation runs when the mean inner steps
per worker cross a multiple of ``eval_every``, and after the last update.

The order "first to finish" needs each worker's step time before it trains: the simulator's
modelled step times (:func:`run_async`). Real processes post in the order they finish, which
the coordinator numbers (:func:`run_posted`, driven by
:class:`islands.runtime.asynchronous.AsyncMember`): the same steps, one worker per process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from islands.collectives.butterfly import Group
from islands.core.errors import CommError, ConfigError, Stopping

if TYPE_CHECKING:
    from islands.engine.loop import Engine


class AsyncFaults(Protocol):
    """A fault plan the asynchronous loop carries out (the simulator's
    :class:`islands.sim.faults.AsyncFaultPlan`)."""

    alive: set[int]  # the workers taking part now

    def timing(self) -> None:
        """Applies the slowdowns and link changes due by the live workers' clocks."""

    def membership(self, before_s: float, update: int) -> list[tuple[str, int, float]]:
        """``(kind, worker, at_s)`` of the crashes and joins before ``before_s``, in time
        order, carried out in ``alive``."""

    def join(self, worker, at_s: float) -> None:
        """Brings a joiner's replica up to date from ``at_s`` on (its bytes and time)."""

    def leaves(self, worker: int, by_s: float, update: int) -> bool:
        """Whether ``worker`` has left by ``by_s`` (gone now if so)."""


@runtime_checkable
class PostDriver(Protocol):
    """What :func:`run_posted` needs of a real process's driver: the order of the updates
    and their delivery (:class:`islands.runtime.asynchronous.AsyncMember`)."""

    def regroup(self, engine: Engine, error: CommError | None) -> int:
        """Joins (or, after ``error``, rejoins) the members: this worker's replica is the
        members' latest; returns the inner steps of its next update (0: none left)."""

    def post(self, engine: Engine, worker, steps: int) -> dict:
        """``worker``'s update after ``steps`` inner steps: sent to the others in its place,
        or dropped as too stale; the updates before it applied to its replica, then its own.
        Returns ``{"kept", "stale", "seq", "next"}`` (``next``: its next update's steps)."""

    def end(self, engine: Engine, worker) -> None:
        """No steps left: applies every update the others post until the last."""


def run_posted(engine: Engine, driver: PostDriver,
               on_round: Callable[[dict], None] | None = None) -> dict:
    """The asynchronous loop of one real process (its one worker): inner steps, the update
    posted in its place (:meth:`PostDriver.post`), the pull, until no inner steps are left;
    then the others' last updates (:meth:`PostDriver.end`). A failure (a peer gone, a joiner
    waiting) regroups the members, and the worker goes on from their latest replica."""
    started = time.perf_counter()
    alg, cfg = engine.algorithm, engine.cfg
    error: CommError | None = None
    staleness, dropped, k, steps = [], 0, 0, None
    while True:
        try:
            if steps is None:
                steps = driver.regroup(engine, error)
            [w] = engine.workers
            if engine.evaluator is not None and not engine.curve:
                engine.curve.append(engine.evaluate(w, 0))
            while steps:
                marks = engine.marks()
                losses = engine.inner_steps([w], range(w.steps, w.steps + steps),
                                            Group(engine.transport, (w.id,)))
                out = driver.post(engine, w, steps)
                alg.restart(w)
                if out["kept"]:
                    staleness.append(out["stale"])
                else:
                    dropped += 1
                done = w.steps
                engine.record(k, (w.id,), losses, marks,
                              {"staleness": out["stale"], "dropped": not out["kept"],
                               "inner_steps": steps, "seq": out["seq"]},
                              step=done, at_s=engine.clock.time_s(w.id),
                              due=done // cfg.eval_every > (done - steps) // cfg.eval_every)
                k += 1
                if on_round is not None:
                    on_round({"round": k, "rounds": engine.rounds, "step": done,
                              "train_loss": engine.last_loss, "eval_loss": None,
                              "bytes_sent_per_worker": engine.sent_per_worker()})
                steps = out["next"]
            driver.end(engine, w)
            break
        except Stopping:  # asked to stop (SIGTERM): it leaves, the others regroup
            break
        except CommError as e:
            error, steps = e, None
    if not engine.workers:  # stopped before it joined
        return engine.summary(time.perf_counter() - started)  # (nothing of its own)
    [w] = engine.workers
    alg.restart(w)  # the final global parameters (every update applied, unless stopped)
    if engine.evaluator is not None:
        engine.curve.append({**engine.evaluate(w, w.steps),
                             "virtual_time_s": engine.clock.time_s(w.id)})
    engine.async_summary = _updates_summary(k, staleness, dropped, {str(w.id): w.steps})
    return engine.summary(time.perf_counter() - started)


def _updates_summary(updates: int, staleness: list[int], dropped: int, steps) -> dict:
    """An asynchronous run's own ``summary.json`` fields (``rounds``: its updates)."""
    return {"rounds": updates, "async_updates": len(staleness),
            "async_dropped_updates": dropped,
            "staleness_mean": statistics.mean(staleness) if staleness else None,
            "staleness_max": max(staleness, default=None), "inner_steps_by_worker": steps}


def run_async(engine: Engine, on_round: Callable[[dict], None] | None = None,
              faults: AsyncFaults | None = None, order: list[dict] | None = None) -> dict:
    """Runs an asynchronous algorithm's updates until the budget is spent; returns the summary
    figures (:meth:`Engine.summary` with the updates' own fields). ``faults``: workers that
    crash, leave, join or slow down on the way (the unspent inner steps of the gone go to
    the live). ``order``: the updates to post, ``{"worker", "steps"}`` each, in this order
    (a real run's, replayed), in place of the budget and the modelled step times."""
    if engine.step_time_s is None:
        raise ConfigError(f"algorithm.name ({engine.cfg.algorithm.name!r}) needs modelled step "
                          "times to order its updates (the simulator), or a driver that "
                          "orders them (run_posted: real processes)")
    started = time.perf_counter()
    alg, clock, cfg, workers = engine.algorithm, engine.clock, engine.cfg, engine.workers
    alive = faults.alive if faults is not None else {w.id for w in workers}
    budget = _Budget(cfg.workers * cfg.steps, alg, clock, workers, alive)
    every = cfg.eval_every * cfg.workers  # inner steps in all between two evaluations
    if engine.evaluator is not None:
        engine.curve.append(engine.evaluate(workers[0], 0))
    done, staleness, dropped, k = 0, [], 0, 0
    while True:
        if faults is not None:
            faults.timing()
        if order is not None:  # a given order: the next update's worker and steps
            if k == len(order):
                break
            w, steps = engine.local([int(order[k]["worker"])])[0], int(order[k]["steps"])
        else:
            if (w := budget.next_to_post(engine.step_time_s)) is None:
                break
            if faults is not None and _membership(engine, faults, budget, w, k):
                continue
            steps = budget.planned[w.id]
        marks = engine.marks()
        losses = engine.inner_steps([w], range(w.steps, w.steps + steps),
                                    Group(engine.transport, (w.id,)))
        # its place in the order is now: the updates before it are those already applied
        stale = alg.staleness(w)
        kept = stale <= alg.max_staleness
        if kept:  # sent at once, while it waits for the earlier ones
            _post(engine, Group(engine.transport, tuple(sorted(alive))), w)
            staleness.append(stale)
        else:
            dropped += 1
        posted_s = clock.time_s(w.id)
        clock.await_posts(w.id)  # the updates posted before its own reach it: it pulls
        alg.restart(w)
        if order is None:
            budget.allot(w)
        if faults is not None and faults.leaves(w.id, posted_s, k + 1):
            budget.give_back(w.id)  # it posted the update it was computing, and is gone
            budget.reallot()
        done += steps
        point = engine.record(
            k, (w.id,), losses, marks,
            {"staleness": stale, "dropped": not kept, "inner_steps": steps},
            step=done // cfg.workers, at_s=clock.time_s(w.id),
            due=(budget.spent if order is None else k + 1 == len(order))
            or done // every > (done - steps) // every)
        k += 1
        if on_round is not None:
            on_round({"round": done * engine.rounds // budget.total, "rounds": engine.rounds,
                      "step": done // cfg.workers, "train_loss": engine.last_loss,
                      "eval_loss": point["eval_loss"] if point else None,
                      "bytes_sent_per_worker": engine.sent_per_worker()})
    for w in sorted(alive):  # the run ends once every replica holds every update
        clock.await_posts(w)
    engine.async_summary = _updates_summary(k, staleness, dropped, [w.steps for w in workers])
    return engine.summary(time.perf_counter() - started)


def _membership(engine: Engine, faults: AsyncFaults, budget: _Budget, w, k: int) -> bool:
    """Before ``w`` trains its next update (post number ``k``): the workers that crash or
    join before it would post, in time order (a crashed one computes until its crash, and
    its update is lost; a joiner is brought up to date), and whether ``w`` itself has left.
    The inner steps the gone will not spend go back to the budget, and from it to the live
    workers with none planned (joiners included). True: the live set changed, the next
    poster is chosen again."""
    clock = engine.clock
    start = clock.time_s(w.id)
    events = faults.membership(start + budget.planned[w.id] * engine.step_time_s[w.id], k)
    for kind, v, at_s in events:
        if kind == "crash":
            if budget.planned[v]:  # it was computing an update: lost, computed to the crash
                clock.compute(v, max(0.0, at_s - clock.time_s(v)))
            budget.give_back(v)
        else:  # a join: its replica brought up to date, then it pulls
            joiner = engine.local([v])[0]
            faults.join(joiner, at_s)
            engine.algorithm.restart(joiner)
    if w.id in faults.alive and faults.leaves(w.id, start, k):  # before its next update
        budget.give_back(w.id)
        events.append(("leave", w.id, start))
    if not events:
        return False
    budget.reallot()
    return True


def _post(engine: Engine, everyone: Group, w) -> None:
    """``w``'s update to every worker (through its codec; buffers exact fp32, the poster's
    taken as the global ones), applied to every replica in the same order."""
    [c] = engine.algorithm.contribute(w)
    flat = w.flat_buffers()
    with engine.transport.posting():
        got = everyone.broadcast(w.id, c.tensor, w.codec, everyone.others(w.id), tag=c.tag,
                                 echo=True)
        buffers = (everyone.broadcast(w.id, flat, engine._exact, everyone.others(w.id),
                                      tag="buffers", echo=True)
                   if flat is not None else None)
    for v in engine.local(everyone.members):  # the live replicas
        engine.algorithm.apply(v, [got[v.id]])
        if buffers is not None:
            v.global_buffers = buffers[v.id]
    if buffers is not None:
        w.load_flat_buffers(w.global_buffers)


class _Budget:
    """The inner steps left to hand out, and each worker's current share of them."""

    def __init__(self, total: int, alg, clock, workers, alive: set[int]) -> None:
        self.total, self.left, self.alg, self.clock = total, total, alg, clock
        self.everyone, self.alive = workers, alive  # alive: the fault plan's, kept current
        self.planned: dict[int, int] = {w.id: 0 for w in workers}
        for w in self.workers:
            self.allot(w)

    @property
    def workers(self) -> list:
        return [w for w in self.everyone if w.id in self.alive]

    def give_back(self, worker: int) -> None:
        """A gone worker's unspent inner steps return to the budget."""
        self.left += self.planned[worker]
        self.planned[worker] = 0

    def reallot(self) -> None:
        """Live workers with nothing left to do take their share of what is left."""
        for w in self.workers:
            if not self.planned[w.id]:
                self.allot(w)

    @property
    def spent(self) -> bool:
        return not any(self.planned.values())

    def allot(self, w) -> None:
        """``w``'s next inner steps: the algorithm's count for its measured speed (inner
        steps per second of compute so far), within what is left."""
        c = self.clock.compute_s
        rates = {v.id: v.steps / c[v.id] if c[v.id] else 0.0 for v in self.workers}
        steps = min(self.alg.local_steps(w.id, rates), self.left)
        self.left -= steps
        self.planned[w.id] = steps

    def next_to_post(self, step_time_s: dict[int, float]):
        """The worker whose inner steps end first (ties: the lower id); None: all done."""
        busy = [w for w in self.workers if self.planned[w.id]]
        if not busy:
            return None
        return min(busy, key=lambda w: (self.clock.time_s(w.id)
                                        + self.planned[w.id] * step_time_s[w.id], w.id))
