"""One worker's side of a gossip run over real processes: no barrier per round.

An algorithm whose workers' parameters differ by design (``Algorithm.shares_parameters`` is
False: ``dsgd``, ``gossip_diloco``, ``noloco``) has no global state to commit, hash or
repair. Its :class:`GossipMember` passes the coordinator's ``start`` barrier to form a group:
the members (the workers there), the epoch's process group and streams, and the round to go
on from. Then each round's sync is the algorithm's neighbour exchange on the round's
topology (:func:`~islands.collectives.neighbours.start_neighbours`): the worker sends to and
waits for its neighbours only, pairwise over the streams, and goes on to the next round as
soon as they answered. No ``ready``, no ``commit``, no hash check: a worker may be a round
ahead of a neighbour that is still waiting for a third; the graph's distances bound how far
apart two workers can drift. If the coordinator dies, the members keep training with the
topology they have (the heartbeats keep trying to reach it in the background).

**Churn: regrouping.** The members change only at a regrouping, the coordinator's ``start``
again (its job: membership and topology):

* a neighbour exchange fails (a peer crashed: its stream closed; or one hung past
  ``runtime.collective_timeout_s``): the worker undoes the round (its own state as the round
  began), closes its streams, so that its neighbours fail at once and regroup too (the whole
  graph follows within a round), and goes to ``start``;
* the coordinator lists a worker that is not a member (a joiner waiting at ``start``): every
  member aborts its round at its next exchange and regroups.

The coordinator releases the regrouping once every live worker is there (a dead one is
dropped after ``runtime.heartbeat_timeout_s``): the members are those present, the round the
furthest any of them reached (the others skip to it, keeping their parameters), and a joiner
that never trained receives a member's own state (parameters, outer state, inner moments).
The coordinator's live set is not read otherwise: a member that finished its last round and
left is no failure. The final merge (``algorithm.final_merge``) is the one global
collective, at the very end.
"""

from __future__ import annotations

import logging
import time

from islands.collectives.butterfly import Group
from islands.core.errors import CommError, ConfigError, Stopping
from islands.engine import Engine, RoundPlan
from islands.runtime import state
from islands.runtime.asynchronous import AsyncMember
from islands.runtime.member import Member, _keys

log = logging.getLogger("islands.worker")

NO_CHECKPOINTS = ("a gossip run (algorithm.shares_parameters is False) has no checkpoints yet: "
                  "each worker's parameters are its own; run it without --checkpoint-dir and "
                  "--resume")


class GossipMember(Member):
    """Drives a gossip worker: a ``start`` barrier to (re)group, then rounds with neighbours
    only (an :class:`~islands.engine.Driver`, as :class:`Member`, whose constructor it
    shares)."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("checkpoint_dir"):
            raise ConfigError(NO_CHECKPOINTS)
        super().__init__(*args, **kwargs)
        self.members: tuple[int, ...] = ()  # the group's (empty: regroup at the next round)
        self._keys_of: dict[int, str] = {}
        self._round_start: dict = {}  # its own state as the round began (state.snapshot)

    def resume(self, path) -> None:
        raise ConfigError(NO_CHECKPOINTS)

    def hash(self) -> str:
        """The digest of this worker's own state (parameters, buffers, outer state): what
        a shared-state algorithm would share (``final_hash``; workers agree only after a
        final merge)."""
        if self._builder is not None:
            return self._fresh_hash
        return state.digest(self.algorithm.handover(self.worker))

    def _start_extra(self) -> dict:
        """A gossip (re)grouping; ``fresh``: this worker never trained a round (a joiner)."""
        return {"gossip": True, "fresh": self.stats.first_commit_unix is None}

    def on_live(self, live: set[int], sent_at: float) -> None:
        """Heartbeat thread: a worker the coordinator lists that is not a member (a joiner at
        ``start``) makes this member regroup: its exchange in flight, or its next one,
        aborts. Departures are not read here (see the module)."""
        if (not self.members or sent_at < self.transport.group_since
                or self.finished):
            return
        if live - set(self.members) and not self.transport.abort_event.is_set():
            log.info("worker %d: workers %s wait to join; regrouping", self.me,
                     sorted(live - set(self.members)))
            self.transport.abort_event.set()

    def next_round(self, engine: Engine) -> RoundPlan | None:
        """A (re)grouping when due, then the next round."""
        if self.stopping.is_set() or self.round >= engine.rounds:
            return None
        t0 = time.perf_counter()
        if not self.members:
            res = self._regroup()
            if res["round"] > self.round:  # others went further: skip to where they are
                self.fast_forward(res["round"])
                self.round = res["round"]
            self.members = tuple(sorted(res["members"]))
            self._keys_of = _keys(res)
            log.info("worker %d: gossip with members %s from round %d; no barrier until the "
                     "members change", self.me, list(self.members), self.round)
        self._round_start = state.snapshot(self.algorithm, self.worker)
        r = self.round
        return RoundPlan(r, self.members, self.algorithm.participants(r, self.members),
                         Group(self.transport, self.members), info={"t0": t0})

    def _regroup(self) -> dict:
        """The coordinator's ``start``: builds the worker (the first time), forms the group
        and opens its streams."""
        return self._start_retrying("the gossip run")

    def sync(self, engine: Engine, plan: RoundPlan, losses) -> dict:
        """The round's neighbour exchange (and, after the last round, the final merge)."""
        t_sync = time.perf_counter()
        self.transport.set_context(f"{plan.round}/gossip", self._keys_of)
        engine.end_round(plan.everyone, [self.worker])
        self.round = plan.round + 1
        return self._row(plan.round, {"members": list(plan.participants)}, plan.info["t0"],
                         t_sync)

    def abort(self, engine: Engine, plan: RoundPlan | None, error: CommError) -> None:
        """An exchange failed (or a joiner waits): undo the round and regroup."""
        if isinstance(error, Stopping):
            self.stopping.set()
            return
        log.warning("worker %d: round %d: %s; undoing the round and regrouping", self.me,
                    self.round, error)
        if self._round_start:
            state.load(self.algorithm, self.worker, self._round_start, reset_params=True)
        self.transport.close_streams()  # its neighbours fail now, not at their timeout
        self.members = ()
        self.stats.aborted_attempts += 1  # (a regrouping: summary.json's aborted_attempts)


def member_class(algorithm) -> type[Member]:
    """The driver an algorithm's workers need: :class:`Member` (a shared global state under
    the coordinator's barriers), :class:`GossipMember` (parameters of their own) or
    :class:`~islands.runtime.asynchronous.AsyncMember` (updates in the coordinator's order,
    no rounds)."""
    if algorithm.asynchronous:
        return AsyncMember
    return Member if algorithm.shares_parameters else GossipMember
