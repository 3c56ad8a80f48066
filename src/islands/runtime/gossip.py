"""One worker's side of a gossip run over real processes: no barrier after the start.

An algorithm whose workers' parameters differ by design (``Algorithm.shares_parameters`` is
False: ``dsgd``, ``gossip_diloco``, ``noloco``) has no global state to commit, hash or
repair. Its :class:`GossipMember` passes the coordinator's ``start`` barrier once, which
admits the members (the workers there within ``runtime.join_timeout_s``), forms the epoch's
process group and opens its streams. From then on each round's sync is the algorithm's
neighbour exchange on the round's topology
(:func:`~islands.collectives.neighbours.start_neighbours`): the worker sends to and waits
for its neighbours only, pairwise over the streams, and goes on to the next round as soon as
they answered. No ``ready``, no ``commit``, no hash check: a worker may be a round ahead of
a neighbour that is still waiting for a third; the graph's distances bound how far apart two
workers can drift.

The coordinator is asked nothing after the start: if it dies, the members keep training
with the topology they computed from the members it admitted (the heartbeats keep trying to
reach it in the background).

What is left out (documented in ``docs/gossip.md``): the members are fixed at the start. A
neighbour that fails (its exchange breaks or times out after
``runtime.collective_timeout_s``) ends this worker's run with an error naming it, since the
others' rows of the mixing matrix still count on it; re-forming the topology over the
survivors without a global barrier is not built yet, and a worker that arrives after the
start is refused. The final merge (``algorithm.final_merge``) is the one global collective,
at the very end.
"""

from __future__ import annotations

import logging
import time

from islands.collectives.butterfly import Group
from islands.core.errors import CommError, ConfigError, Stopping
from islands.engine import Engine, RoundPlan
from islands.runtime import state
from islands.runtime.member import Member, _keys
from islands.runtime.membership import Removed

log = logging.getLogger("islands.worker")

NO_CHECKPOINTS = ("a gossip run (algorithm.shares_parameters is False) has no checkpoints yet: "
                  "each worker's parameters are its own and its members are fixed at its "
                  "start; run it without --checkpoint-dir and --resume")


class GossipMember(Member):
    """Drives a gossip worker: one ``start`` barrier, then rounds with neighbours only (an
    :class:`~islands.engine.Driver`, as :class:`Member`, whose constructor it shares)."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("checkpoint_dir"):
            raise ConfigError(NO_CHECKPOINTS)
        super().__init__(*args, **kwargs)
        self._start_fields = {"fixed": True}  # a worker coming after the start is refused
        self.members: tuple[int, ...] = ()  # admitted at the start, fixed for the run
        self._keys_of: dict[int, str] = {}

    def resume(self, path) -> None:
        raise ConfigError(NO_CHECKPOINTS)

    def on_live(self, live: set[int], sent_at: float) -> None:
        """Nothing: a member the coordinator no longer lists may simply have finished its
        last round (the others finish theirs without it); a neighbour that fails shows up
        in the exchange itself (its stream closes, or the collective times out)."""

    def hash(self) -> str:
        """The digest of this worker's own state (parameters, buffers, outer state): what
        a shared-state algorithm would share (``final_hash``; workers agree only after a
        final merge)."""
        if self._builder is not None:
            return self._fresh_hash
        return state.digest(self.algorithm.handover(self.worker))

    def next_round(self, engine: Engine) -> RoundPlan | None:
        """The job's start (the one barrier), then every round in turn."""
        if self.stopping.is_set() or self.round >= engine.rounds:
            return None
        t0 = time.perf_counter()
        if not self.members:
            try:
                res = self._start()  # builds the worker, forms the group, opens the streams
            except Stopping:
                raise
            except CommError as e:  # no second chance: the members are fixed at the start
                raise Removed(f"worker {self.me} could not join the gossip run at its "
                              f"start: {e}") from None
            if res.get("heal") or res["need_state"] or res["round"] != self.round:
                raise Removed(f"a gossip run admits its members at its start only; worker "
                              f"{self.me} came at round {res['round']} (members "
                              f"{sorted(res['members'])}): restart the job to add workers")
            self.members = tuple(sorted(res["members"]))
            self._keys_of = _keys(res)
            log.info("worker %d: gossip with members %s from round %d; no barrier from here "
                     "on", self.me, list(self.members), self.round)
        r = self.round
        return RoundPlan(r, self.members, self.algorithm.participants(r, self.members),
                         Group(self.transport, self.members), info={"t0": t0})

    def sync(self, engine: Engine, plan: RoundPlan, losses) -> dict:
        """The round's neighbour exchange (and, after the last round, the final merge)."""
        t_sync = time.perf_counter()
        self.transport.set_context(f"{plan.round}/gossip", self._keys_of)
        engine.end_round(plan.everyone, [self.worker])
        self.round = plan.round + 1
        return self._row(plan.round, {"members": list(plan.participants)}, plan.info["t0"],
                         t_sync)

    def abort(self, engine: Engine, plan: RoundPlan | None, error: CommError) -> None:
        """A neighbour failed: the fixed topology cannot go on without it (see the module)."""
        if isinstance(error, Stopping):
            self.stopping.set()
            return
        raise Removed(f"round {self.round}: a neighbour exchange failed ({error}); a gossip "
                      "run's members are fixed at its start, so this worker stops") from None


def member_class(algorithm) -> type[Member]:
    """The driver an algorithm's workers need: :class:`Member` (a shared global state under
    the coordinator's barriers) or :class:`GossipMember` (parameters of their own)."""
    return Member if algorithm.shares_parameters else GossipMember
