"""The scenario runner: many workers in one process, a network model and a virtual clock.

``simulate(cfg)`` is a pure function of the config (and its seed) and the task: same losses,
same bytes, same virtual time on every run. It writes the run directory when given one. It is
a thin driver over :class:`islands.engine.Engine`: every round in order, with every worker
the algorithm draws, and a sync that cannot fail.

Run it: ``islands sim CONFIG.toml --out runs/x`` or ``islands.simulate(cfg, out_dir="runs/x")``
(``task=`` runs the user's own :class:`~islands.tasks.Task`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from islands.collectives.butterfly import Group
from islands.core.config import RunConfig
from islands.core.errors import ConfigError, PeerRefused
from islands.engine import (
    Engine,
    RoundPlan,
    assemble,
    check_config,
    resolve_device,
    threads,
)
from islands.metrics.run_dir import RunDir, read_summary
from islands.sim.faults import AsyncFaultPlan, FaultPlan, catch_up, quorum
from islands.tasks import Task
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock

log = logging.getLogger("islands.sim")


class _EveryRound:
    """The simulator's driver: rounds in order; the participants the algorithm draws among
    the members the fault plan leaves (all workers without one), less the banned.

    A worker is banned (gone from the round on, for good) when a sync refuses its payload
    (:class:`~islands.core.errors.PeerRefused`: a non-finite or undecodable payload, a forged
    weight; the sync is then carried out again without it), when the engine's
    :class:`~islands.engine.judge.Judge` judges it malicious, or when it accuses another
    falsely."""

    def __init__(self, everyone: Group, faults: FaultPlan | None = None) -> None:
        self.everyone, self.next, self.faults = everyone, 0, faults
        self.banned: list[dict] = []  # {"worker", "round", "reason"}, in order

    def next_round(self, engine: Engine) -> RoundPlan | None:
        r = self.next
        if r >= engine.rounds:
            return None
        self.next += 1
        out = {b["worker"] for b in self.banned}
        if self.faults is None:
            members = tuple(m for m in self.everyone.members if m not in out)
            ids = engine.algorithm.participants(r, members)
            everyone = self.everyone if not out else Group(engine.transport, members)
            return RoundPlan(r, ids, ids, everyone)
        members, crashing = self.faults.members(r)
        members = tuple(m for m in members if m not in out)
        ids = engine.algorithm.participants(r, members)
        # the crashing train, then are gone before the sync: no row, no contribution
        synced = tuple(i for i in ids if i not in crashing)
        return RoundPlan(r, synced, ids, Group(engine.transport, members),
                         info={"synced": synced})

    def sync(self, engine: Engine, plan: RoundPlan, losses) -> dict:
        synced, late = quorum(engine, plan.info.get("synced", plan.participants))
        if not synced:  # every participant crashed before the sync: the round is lost
            losses.clear()
            plan.members = ()
            return {}
        while True:
            try:
                engine.end_round(Group(engine.transport, synced), engine.local(synced))
                break
            except PeerRefused as e:  # the proof is the payload: banned, the sync again
                if e.sender not in synced or len(synced) == 1:
                    raise
                self.ban(plan.round, e.sender, str(e))
                synced = tuple(m for m in synced if m != e.sender)
        for verdict in engine.judge.take_verdicts():
            self.ban(plan.round, verdict["worker"], verdict["reason"])
        self._judge_accusations(engine, plan.round, synced)
        for w in set(plan.participants) - set(synced):
            losses.pop(w, None)
        plan.members = tuple(m for m in plan.members if m in synced)  # rows: the kept
        if late:
            catch_up(engine, late, synced)
        return {"left_out": list(late)} if late else {}

    def _judge_accusations(self, engine: Engine, r: int, synced: tuple[int, ...]) -> None:
        """A false accuser (``attack.name = "false_accuser"``) accuses another member of the
        sync (each in turn, the lowest first), as on real processes. The simulator sees every
        message, so it checks the accusation against what the accused sent: unless the sync
        refused the accused's messages, the accusation is false and the accuser is banned
        (its own contribution to the round, honest, stays)."""
        attack = engine.attack
        if attack is None:
            return
        refused = {b["worker"] for b in self.banned if b["round"] == r}
        for accuser in (w for w in synced if attack.accuses(w, r)):
            victim = attack.victim(accuser, synced, r)
            if victim not in refused:
                self.ban(r, accuser, f"a false accusation of worker {victim}: its messages of "
                                     f"round {r} passed every check")

    def ban(self, r: int, worker: int, reason: str) -> None:
        if all(b["worker"] != worker for b in self.banned):
            log.warning("round %d: worker %d banned: %s", r, worker, reason)
            self.banned.append({"worker": worker, "round": r, "reason": reason})

    def abort(self, engine, plan, error) -> None:  # the simulated network does not fail
        raise error

    def committed(self, engine, plan, point) -> None:
        pass


class Simulation:
    """One simulated run. Construct (the config and the run directory are checked), then
    :meth:`run`.

    Args:
        cfg: the run's config.
        out_dir: where to write the run directory (None: nowhere).
        on_round: called after every round with a dict of progress facts.
        task: the user's task (None: the one ``cfg.task`` names).
        existing: what to do when ``out_dir`` already holds run files: ``"refuse"`` (another
            run, or this one finished, is an error naming the folder and the differing key),
            ``"resume"`` (this run finished: keep it, nothing runs; unfinished: run it again
            from the start, as a simulation is a function of its config) or ``"overwrite"``
            (remove the run files there first).
        post_order: an asynchronous run's updates in the order to post them, each
            ``{"worker", "steps"}`` (a real run's, as its coordinator numbered them:
            ``summary.json``'s ``coordinator.async_posts``), in place of the order the
            modelled step times give; the run ends with the real replicas' parameters. A
            coordinator lists only the updates it numbered itself: a run whose coordinator
            was started anew cannot be replayed whole.
    """

    def __init__(self, cfg: RunConfig, out_dir: str | Path | None = None,
                 on_round: Callable[[dict], None] | None = None, *,
                 task: Task | None = None, existing: str = "refuse",
                 post_order: list[dict] | None = None) -> None:
        # a task object: the config records it as such, without the sections only the task
        # its name named would read (a user task's config.json has no [model])
        self.cfg = cfg = cfg if task is None else cfg.with_task_object(task.name)
        self.task = check_config(cfg, task)  # every setting checked before anything runs
        self._task_key = None if task is None else f"object:{id(task)}"
        if post_order is not None and (cfg.algorithm.name != "async_local_sgd" or cfg.faults):
            raise ConfigError("post_order replays an asynchronous run's updates: it needs "
                              "algorithm.name = 'async_local_sgd' and no [[faults]]")
        self.post_order = post_order
        self.out = RunDir(out_dir) if out_dir is not None else None
        self.found = self.out.claim(cfg, existing=existing) if self.out else "fresh"
        self.on_round = on_round

    def build(self) -> Engine:
        """Wires the run: data, the initial model, workers, network, clock and engine."""
        cfg = self.cfg
        run = assemble(cfg, self.task, task_key=self._task_key)
        self.workers = [run.worker(i) for i in range(cfg.workers)]
        clock = VirtualClock(cfg.workers)
        transport = SimTransport(cfg.workers, NetworkModel.from_config(cfg.network), clock)
        step_time = {w.id: w.step_time_s for w in cfg.compute.worker}
        return run.engine(transport, self.workers, clock, out=self.out,
                          step_time_s={i: step_time.get(i, cfg.compute.step_time_s)
                                       for i in range(cfg.workers)})

    def run(self) -> dict:
        """Runs the simulation and writes its run directory; returns the summary (a finished
        run kept with ``existing="resume"``: the stored one)."""
        if self.found == "finished":
            return read_summary(self.out.path)
        with threads(self.cfg, resolve_device(self.cfg.device)):
            return self._run()

    def _run(self) -> dict:
        engine = self.build()
        if self.out:
            self.out.reserve(engine.final_nbytes())
            self.out.start(self.cfg)
        everyone = Group(engine.transport, tuple(range(self.cfg.workers)))
        asynchronous = engine.algorithm.asynchronous
        plan = AsyncFaultPlan if asynchronous else FaultPlan
        faults = plan(self.cfg, engine) if self.cfg.faults else None
        driver = _EveryRound(everyone, None if asynchronous else faults)
        summary = engine.run(driver, self.on_round,
                             async_faults=faults if asynchronous else None,
                             async_order=self.post_order)
        if faults is not None:
            summary["epochs"] = faults.epochs
        if engine.attack is not None or driver.banned:
            summary["attackers"] = sorted(engine.attack.ids) if engine.attack else []
            summary["banned"] = driver.banned
        algorithm, workers = engine.algorithm, self.workers
        final = workers[engine.curve[-1]["worker"]]
        self.final_params = engine.final_params(final)[0].clone()
        self.final_state = engine.final_state(final)  # what final.safetensors holds
        self.shared_states = [algorithm.shared_state(w) for w in workers]
        gone = {b["worker"] for b in driver.banned}
        alive = faults.alive if faults is not None else range(len(workers))
        self.live = sorted(set(alive) - gone)
        if self.out:
            summary["run_id"] = self.out.run_id
            self.out.finish(summary, final=engine.final_bytes(final))
        return summary


def simulate(cfg: RunConfig, out_dir: str | Path | None = None,
             on_round: Callable[[dict], None] | None = None, *, task: Task | None = None,
             existing: str = "refuse") -> dict:
    """Runs one simulation and returns its summary (see :class:`Simulation`).

    Args:
        cfg: the run's config.
        out_dir: where to write the run directory (None: nowhere).
        on_round: progress callback, called after every round.
        task: the user's own task object (default: the one ``cfg.task`` names).
        existing: ``"refuse"``, ``"resume"`` or ``"overwrite"`` a run already in ``out_dir``.
    """
    return Simulation(cfg, out_dir, on_round, task=task, existing=existing).run()
