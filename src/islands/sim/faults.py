"""The simulator's fault plan (``[[faults]]``): who takes part in each round, and the slowdowns
and link changes in force, applied at round boundaries in the order the plan lists them.

What the survivors do is what the real runtime's do:

* ``crash``: the worker trains the round, then dies before its sync; the round commits with
  the others (its contribution is lost; the runtime sees a killed process's connection close
  at once and releases the round without it).
* ``leave``: the worker is gone from the round on (a graceful leave after its last commit).
* ``join``: the worker takes part from the round on: it receives the committed shared state
  and the inner optimizer's state from the lowest live member (the bytes are counted and
  charged to both links), its step count and lr schedule are put where the run is. A worker
  whose first membership event in the plan is a ``join`` is absent until then. With an
  overlapped algorithm the sync in flight is not in the committed state: the joiner applies
  its result when it lands, as its source does (``Engine.adopt_in_flight``).
* ``slow``: its inner steps take ``factor`` times its configured step time from then on.
* ``link``: its link's settings change from then on.
* ``partition``: every link between ``workers`` and the others is cut from then on, until a
  ``heal``. Only gossip algorithms take it (an all-reduce cannot cross a cut): each worker
  keeps the weight a cut neighbour had in its row of the mixing matrix for itself (the matrix
  stays doubly stochastic), so each side averages within itself and the sides drift apart
  until the cut heals.

The straggler policy (``algorithm.min_quorum``, ``algorithm.grace_s``, :func:`quorum`) lives
here too: a member later than the quorum's grace window is left out of the round's sync.

An event at ``at_s`` happens at the first round that starts (the live members' latest
virtual time) at or after it; a crash at ``at_s`` hits the round the worker is computing at
that time (the first it would finish after it), and a join of a worker crashing in a round
takes effect at the next. ``summary.json``'s ``epochs`` lists each membership from the
round it began, as the runtime's coordinator records them.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from islands.core.errors import ConfigError
from islands.core.sections import present_at_start


class FaultPlan:
    """Applies ``cfg.faults`` to a simulation round by round.

    Args:
        cfg: the run's config.
        engine: the simulation's engine (its step times, transport and workers change).
    """

    def __init__(self, cfg, engine) -> None:
        self.faults, self.engine = list(cfg.faults), engine
        if engine.algorithm.shares_parameters and any(f.kind == "partition"
                                                      for f in self.faults):
            raise ConfigError(f"a partition fault cuts links that algorithm "
                              f"{engine.algorithm.name!r}'s all-reduce needs: partitions apply "
                              "to gossip algorithms (dsgd, gossip_diloco, noloco); remove it")
        self.applied: set[int] = set()
        self.alive = present_at_start(self.faults, cfg.workers)
        self.base_step_s = dict(engine.step_time_s)
        self.epochs: list[dict] = []
        self.crashing: set[int] = set()

    def members(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Applies the events due at round ``r``; returns (the round's members, those among
        them that crash before its sync)."""
        for w in self.crashing:  # last round's crashes are gone now
            self.alive.discard(w)
        self.crashing = set()
        clock = self.engine.clock
        now = max((clock.time_s(m) for m in self.alive), default=0.0)
        joiners = []
        steps = len(self.engine.steps_of(r))
        for i, f in enumerate(self.faults):
            if f.round is not None:
                due = f.round <= r
            elif f.kind == "crash":  # a crash hits the round the worker is computing then
                w = f.worker
                due = f.at_s < clock.time_s(w) + steps * self.engine.step_time_s[w]
            else:
                due = f.at_s <= now
            if i in self.applied or not due:
                continue
            if f.kind == "join" and f.worker in self.crashing:
                continue  # it crashes in this round: back at the next one
            self.applied.add(i)
            if f.kind == "leave":
                self.alive.discard(f.worker)
            elif f.kind == "crash" and f.worker in self.alive:
                self.crashing.add(f.worker)
            elif f.kind == "join" and f.worker not in self.alive:
                self.alive.add(f.worker)
                joiners.append(f.worker)
            elif f.kind in ("slow", "link"):
                change_worker(self.engine, self.base_step_s, f)
            elif f.kind == "partition":
                self.engine.transport.network.cut = frozenset(f.workers)
            elif f.kind == "heal":
                self.engine.transport.network.cut = None
        members = tuple(sorted(self.alive))
        if not members:
            raise ConfigError(f"the fault plan leaves no worker at round {r}: keep one, or "
                              "add a join before it")
        for j in joiners:
            self._join(j, r, [m for m in members if m not in joiners])
        committed = [m for m in members if m not in self.crashing]
        if not committed:
            raise ConfigError(f"the fault plan leaves no worker to commit round {r}: keep "
                              "one alive through it")
        if not self.epochs or self.epochs[-1]["members"] != committed:
            self.epochs.append({"epoch": len(self.epochs) + 1, "members": committed,
                                "from_round": r})
        return members, tuple(sorted(self.crashing))

    def _join(self, w: int, r: int, sources: list[int]) -> None:
        """A joiner receives the committed state from the lowest live member."""
        engine = self.engine
        if not sources:
            raise ConfigError(f"worker {w} joins at round {r} with nobody to take the state "
                              "from: keep a worker alive through its join")
        src, dst = engine.local([sources[0]])[0], engine.local([w])[0]
        join_from(engine, src, dst)
        dst.steps = src.steps
        # an overlapped algorithm: the sync in flight is not in the committed state; the
        # joiner applies its result when it lands, as the source does
        engine.adopt_in_flight(dst, src)


class AsyncFaultPlan:
    """The fault plan of an asynchronous run (``async_local_sgd``), which has no rounds:
    every event at ``at_s``, carried out by the engine's asynchronous loop
    (:func:`islands.engine.asynchronous.run_async`) as the runtime would see it:

    * ``crash``: the update the worker is computing at ``at_s`` is lost (never posted); it
      computes until ``at_s`` and is gone. Its unspent inner steps go back to the run's budget,
      which the others spend.
    * ``leave``: the worker finishes and posts the update it is computing at ``at_s``, then is
      gone (its unspent steps go back as well); ``epochs`` records when it left.
    * ``join``: from ``at_s`` the worker downloads the global parameters and the outer state
      from the lowest live worker (one way: that worker trains on; the bytes are counted),
      adopts its inner optimizer's moments and lr schedule, then trains and receives every
      post; it takes its share of the inner steps left. A worker whose first membership
      event is a join is absent until then.
    * ``slow``: its updates that start at or after ``at_s`` take ``factor`` times its
      configured step time.
    * ``link``: its link changes for the transfers that start at or after ``at_s`` (applied
      once every live worker's clock has passed it).
    * ``partition``: the side listed in ``workers`` is cut from the coordinator, which sits
      with the others: a post goes to every member and needs the coordinator's number, so
      the cut workers are out of the run from ``at_s`` as if crashed (their updates in
      progress lost, their unspent steps back to the budget), and the others go on.
    * ``heal``: the cut workers join back at ``at_s``, each as a joiner (the newest replica
      from the lowest live worker that was not cut).

    Events at a ``round`` are refused when the config is checked
    (``AsyncLocalSGDConfig.build``), naming the entry. ``epochs`` lists each membership from
    the update it began at, with its virtual time.

    Args:
        cfg: the run's config.
        engine: the simulation's engine (its step times and network change).
    """

    def __init__(self, cfg, engine) -> None:
        # the config's check refused rounds and partitions (AsyncLocalSGDConfig)
        self.faults, self.engine = list(cfg.faults), engine
        self.alive = present_at_start(self.faults, cfg.workers)
        self.base_step_s = dict(engine.step_time_s)
        self.applied: set[int] = set()
        self.cut: set[int] = set()  # the workers a partition cut, until its heal
        self.joining: set[int] = set()  # those back in the last membership(): not sources
        self.epochs = [{"epoch": 1, "members": sorted(self.alive), "from_update": 0,
                        "at_s": 0.0}]

    def _due(self, kinds: tuple[str, ...], worker: int | None = None):
        """The events of ``kinds`` not carried out yet (of ``worker``), in plan order."""
        return [(i, f) for i, f in enumerate(self.faults) if i not in self.applied
                and f.kind in kinds and (worker is None or f.worker == worker)]

    def timing(self) -> None:
        """Slowdowns of live workers whose clock (the start of their next update) has
        reached them, and link changes once every live worker's clock has."""
        clock = self.engine.clock
        earliest = min(clock.time_s(w) for w in self.alive)
        for i, f in self._due(("slow", "link")):
            due = clock.time_s(f.worker) if f.kind == "slow" else earliest
            if f.worker in self.alive and f.at_s <= due:
                change_worker(self.engine, self.base_step_s, f)
                self.applied.add(i)

    def membership(self, before_s: float, update: int) -> list[tuple[str, int, float]]:
        """The crashes and joins before ``before_s`` (the time of post number ``update``),
        in time order: ``(kind, worker, at_s)``, the live set changed for each (a crash of a
        worker not live, or a join of one that is, changes nothing and is not listed); a
        partition's cut workers are listed as crashes, a heal's as joins. :meth:`join` then
        takes each joiner's state from a live worker not among those listed."""
        out, self.joining = [], set()
        due = sorted(self._due(("crash", "join", "partition", "heal")),
                     key=lambda e: (e[1].at_s, e[0]))
        for i, f in due:
            if f.at_s >= before_s:
                break
            self.applied.add(i)
            if f.kind == "partition":  # the cut side crashes, as far as the run can tell
                gone = sorted(set(f.workers) & self.alive)
                self.cut |= set(gone)
                self._gone(gone, f.at_s, update)
                out += [("crash", w, f.at_s) for w in gone]
            elif f.kind == "heal":
                back, self.cut = sorted(self.cut - self.alive), set()
                self._back(back, f.at_s, update)
                out += [("join", w, f.at_s) for w in back]
            elif f.kind == "crash" and f.worker in self.alive:
                self._gone([f.worker], f.at_s, update)
                out.append((f.kind, f.worker, f.at_s))
            elif f.kind == "join" and f.worker not in self.alive:
                self._back([f.worker], f.at_s, update)
                out.append((f.kind, f.worker, f.at_s))
        return out

    def leaves(self, worker: int, by_s: float, update: int) -> bool:
        """Whether ``worker`` leaves at ``by_s``: it has just posted the update it was
        computing at its leave's ``at_s``, or is about to start one after it (``update``: the
        next post's number). Gone now if so."""
        for i, f in self._due(("leave",), worker):
            if f.at_s <= by_s:
                self.applied.add(i)
                self._gone([worker], by_s, update)
                return True
        return False

    def _gone(self, workers: list[int], at_s: float, update: int) -> None:
        if not workers:
            return
        self.alive -= set(workers)
        if not self.alive:
            raise ConfigError(f"the fault plan leaves no worker at {at_s:g} s: keep one alive "
                              "to the end of the run, or add a join before")
        self._epoch(at_s, update)

    def _back(self, workers: list[int], at_s: float, update: int) -> None:
        if workers:
            self.alive |= set(workers)
            self.joining |= set(workers)
            self._epoch(at_s, update)

    def _epoch(self, at_s: float, update: int) -> None:
        self.epochs.append({"epoch": len(self.epochs) + 1, "members": sorted(self.alive),
                            "from_update": update, "at_s": at_s})

    def join(self, w, at_s: float) -> None:
        """A joiner (``w``, a worker of the engine) takes the global parameters and the outer
        state from the lowest other live worker (every live replica holds every update posted
        so far), one way from ``at_s`` (bytes counted), and that worker's inner optimizer
        moments and lr schedule; then it pulls and trains."""
        src = min(self.alive - self.joining - {w.id})  # one that holds the newest replica
        join_from(self.engine, self.engine.local([src])[0], w, at_s=at_s)


def change_worker(engine, base_step_s: dict[int, float], f) -> None:
    """A ``slow`` event (the worker's step time becomes ``factor`` times its configured one)
    or a ``link`` event (its link's settings given change)."""
    if f.kind == "slow":
        engine.step_time_s[f.worker] = base_step_s[f.worker] * f.factor
        return
    net = engine.transport.network
    changes = {k: getattr(f, k) for k in ("upload_bps", "download_bps", "latency_s")
               if getattr(f, k) is not None}
    net.overrides[f.worker] = replace(net.link(f.worker), **changes)


def join_from(engine, src, dst, *, at_s: float | None = None) -> None:
    """A joiner ``dst`` takes ``src``'s committed shared state (:func:`hand_state`; from
    ``at_s`` on, one way, in an asynchronous run) and its inner optimizer's moments and lr
    schedule, where the run is (the runtime's joiner adopts the same)."""
    hand_state(engine, src, [dst], at_s=at_s)
    dst.inner.load_state_dict(copy.deepcopy(src.inner.state_dict()))
    if dst.scheduler is not None:
        dst.scheduler.load_state_dict(copy.deepcopy(src.scheduler.state_dict()))


def hand_state(engine, src, dsts, *, at_s: float | None = None) -> None:
    """``src``'s committed shared state (gossip: its own, ``Algorithm.handover``) installed
    on each of ``dsts`` (their parameters reset to it), its bytes counted and charged to both
    links as a blocking transfer, or (``at_s``: an asynchronous run, where ``src`` trains on)
    one way from ``at_s``, the receiver waiting for it."""
    state = {k: v.detach().clone() for k, v in engine.algorithm.handover(src).items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    for w in dsts:
        engine.algorithm.load_shared_state(w, state, reset_params=True)
        w.samples = 0
        engine.transport.send_state(src.id, w.id, nbytes, at_s=at_s)


def quorum(engine, synced: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The straggler policy at a round's sync: ``(kept, left out)``. The sync goes ahead at
    the time the ``min_quorum``-th member is ready plus ``grace_s``; a member ready later is
    left out (0: everyone is kept)."""
    q = getattr(engine.algorithm, "min_quorum", 0)
    if not q or len(synced) <= q:
        return synced, ()
    ready = {m: engine.clock.time_s(m) for m in synced}
    cutoff = sorted(ready.values())[q - 1] + engine.algorithm.grace_s
    kept = tuple(m for m in synced if ready[m] <= cutoff)
    return kept, tuple(m for m in synced if ready[m] > cutoff)


def catch_up(engine, late: tuple[int, ...], kept: tuple[int, ...]) -> None:
    """Members left out abandon their round when it commits and receive the committed state
    from the lowest member kept (bytes counted, as a joiner's)."""
    src = engine.local([kept[0]])[0]
    commit = engine.clock.time_s(src.id)
    for w in engine.local(late):
        engine.clock.abandon(w.id, commit)
    hand_state(engine, src, engine.local(late))
