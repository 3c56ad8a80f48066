"""One worker's side of an asynchronous run over real processes (``algorithm.name =
"async_local_sgd"``): no round, no barrier per update.

The worker trains its inner steps from the global parameters it last pulled, then asks the
coordinator for its update's place in the order (:mod:`islands.runtime.posts`). It sends the
update one way to every other member at once (:meth:`DistTransport.send_post`: it does not
wait for them to take it), takes from their posters, in order, the updates numbered before
its own that its replica lacks (:meth:`DistTransport.receive_post`), applies them and then its
own, pulls, and goes on with the inner steps the coordinator handed it. An update too stale
is dropped (not sent); its worker applies what was numbered and pulls. When no inner steps are
left, the worker waits for the others' last updates and applies them: every replica ends
holding every update, in one order, bit for bit (the simulator's replicas too, given the same
order: :func:`islands.sim.runner.Simulation` with ``post_order``).

**Churn: regrouping.** A transfer that fails (a peer crashed: its stream closed; a peer that
hangs past ``runtime.collective_timeout_s``; one the heartbeats find gone), or the coordinator
answering ``regroup`` (a member gone, a joiner waiting at ``start``): the worker closes its
streams, so that its peers fail at once too, and goes to the coordinator's ``start`` with the
number of updates its replica holds. The members go on from the replica holding the most (the
others receive it, a joiner too); updates numbered past it are void, and the inner steps of
those and of every update in progress are handed out again (their work is lost).
"""

from __future__ import annotations

import logging

from islands.codecs.cast import Identity
from islands.collectives.butterfly import MESSAGE_HEADER_BYTES
from islands.core.errors import CommError, ConfigError
from islands.engine import Engine
from islands.runtime.member import Member
from islands.runtime.membership import CoordinatorRestarted, FixedMembership
from islands.transports.base import Message

log = logging.getLogger("islands.worker")

# sends (a header, or a 4 MiB piece of a payload, to one peer) kept in flight before the
# oldest are waited for: about 70 updates of 4 MB to 7 peers, 15 of 128 MB to 2
MAX_SENDS_IN_FLIGHT = 1024


class AsyncMember(Member):
    """Drives an asynchronous worker (a :class:`~islands.engine.asynchronous.PostDriver`):
    the coordinator's ``start`` to (re)group, then ``post`` per update and ``posts_end`` at
    the end. Shares :class:`Member`'s constructor, state transfers and epochs."""

    def __init__(self, cfg, me, membership, *args, **kwargs) -> None:
        if isinstance(membership, FixedMembership):
            raise ConfigError("algorithm.name = 'async_local_sgd' needs a coordinator, which "
                              "numbers the updates: run the workers with --coordinator "
                              "HOST:PORT (islands coordinator), or use islands launch, not "
                              "torchrun alone")
        super().__init__(cfg, me, membership, *args, **kwargs)
        self.members: tuple[int, ...] = ()
        self._sends: list = []  # this epoch's sends in flight (they hold their tensors)
        self._exact = Identity()  # buffers travel as exact fp32
        self._done = False  # every update applied (``finished``)
        self._spent = 0  # the inner steps in the updates its replica holds
        self._posted = 0  # updates of its own posted (checkpoints count them)

    def resume(self, path) -> dict:
        """Its replica from a checkpoint of an asynchronous run (``round``: the updates it
        holds, ``spent``: their inner steps), and its own state; at its first ``start``
        the members go on from the replica holding the most (a coordinator started anew
        numbers on from it, its budget less ``spent``)."""
        facts = super().resume(path)
        if "spent" not in facts:
            raise ConfigError(f"checkpoint {str(path)!r} was not written by an asynchronous "
                              "run (it has no 'spent' inner steps): resume an asynchronous "
                              "run from its own checkpoints")
        self._spent = int(facts["spent"])
        return facts

    def _most_rounds(self) -> int:
        return self.cfg.workers * self.cfg.steps  # updates: at least an inner step each

    def _checkpoint(self, final: bool = False) -> None:
        """After every ``runtime.checkpoint_every``-th update of its own, and once every
        update is applied: its replica (``round``: the updates it holds) and its own state."""
        every = self.cfg.runtime.checkpoint_every
        if self.checkpoint_dir is not None and (final or (every and self._posted % every == 0)):
            self._write_checkpoint(self._applied(), spent=self._spent)

    @property
    def finished(self) -> bool:
        return self._done

    def _start_extra(self) -> dict:
        """Its replica's inner steps, for a coordinator started anew (the budget left)."""
        return {"spent": self._spent}

    def _may_heal(self) -> bool:
        return False  # no round to observe: a joiner waits for the members to regroup

    def fast_forward(self, round: int) -> None:
        """No round schedule: a replica received keeps this worker's own step count."""

    def on_live(self, live: set[int], sent_at: float) -> None:
        """Heartbeat thread: a member gone (not having finished) aborts the transfer in
        flight, or the next one; the worker regroups."""
        if not self.members or sent_at < self.transport.group_since:
            return
        gone = set(self.members) - live
        if gone and not self.transport.abort_event.is_set():
            log.warning("worker %d: members %s gone; regrouping", self.me, sorted(gone))
            self.transport.abort_event.set()

    def _applied(self) -> int:
        return 0 if self._builder is not None else self.algorithm.applied(self.worker)

    # --- PostDriver ------------------------------------------------------------------------

    def regroup(self, engine: Engine, error: CommError | None) -> int:
        if error is not None:
            log.warning("worker %d: %s; regrouping from update %d", self.me, error,
                        self._applied())
            self.transport.close_streams()  # its peers fail now, not at their timeout
            self.stats.aborted_attempts += 1
        self._sends, self.members = [], ()
        self.round = self._applied()  # what start compares: the updates it holds
        res = self._start_retrying("the asynchronous run")
        self.members = tuple(sorted(res["members"]))
        self._spent = int(res.get("spent", self._spent))
        self.transport.set_context(f"async/{res['epoch']}",
                                   {int(k): v for k, v in res.get("keys", {}).items()})
        self.algorithm.restart(self.worker)  # pull the members' latest global parameters
        steps = int(res["grants"][str(self.me)])
        log.info("worker %d: asynchronous with members %s from update %d; next update after "
                 "%d inner steps", self.me, list(self.members), self._applied(), steps)
        return steps

    def post(self, engine: Engine, worker, steps: int) -> dict:
        alg, rate = self.algorithm, engine.clock.compute_s[self.me]
        reply = self._ask("post", steps=steps, pulled=worker.pulled, applied=self._applied(),
                          rate=worker.steps / rate if rate > 0 else 0.0)
        seq, mine, buffers = reply["seq"], None, None
        if reply["kept"]:
            [c] = alg.contribute(worker)
            payload = worker.codec.encode(c.tensor, key=f"w{self.me}/{c.tag}")
            others = tuple(m for m in self.members if m != self.me)
            self._send(Message(payload, MESSAGE_HEADER_BYTES), others, f"post/{seq}")
            mine = worker.codec.decode(payload)
            if (flat := worker.flat_buffers()) is not None:
                self._send(Message(self._exact.encode(flat, key=f"w{self.me}/buffers"),
                                   MESSAGE_HEADER_BYTES), others, f"post/{seq}/buffers")
                buffers = flat.clone()
        self._apply(engine, worker, reply["posters"])
        self._spent = int(reply["spent"])
        if mine is not None:
            alg.apply(worker, [mine])
            if buffers is not None:
                worker.global_buffers = buffers
                worker.load_flat_buffers(buffers)
        self.round = self._applied()  # (the updates its replica holds)
        self._posted += 1
        self._checkpoint()
        log.info("update %s | worker %d | %s | staleness %d | %d inner steps | sent %d B",
                 seq if reply["kept"] else "-", self.me,
                 "posted" if reply["kept"] else "dropped (too stale)", reply["stale"], steps,
                 self.transport.bytes_sent)
        return {"kept": reply["kept"], "stale": reply["stale"], "seq": seq,
                "next": int(reply["next"])}

    def end(self, engine: Engine, worker) -> None:
        reply = self._ask("posts_end", applied=self._applied())
        self._apply(engine, worker, reply["posters"])
        self._spent = int(reply["spent"])
        self.transport.wait_sends(self._sends, "post")  # its updates reach every member
        self._sends = []
        self._done = True
        self._checkpoint(final=True)
        log.info("worker %d: every update applied (%d); done", self.me, self._applied())

    def summary_fields(self) -> dict:
        return {**super().summary_fields(), "updates_applied": self._applied()}

    # --- helpers ---------------------------------------------------------------------------

    def _ask(self, op: str, **fields) -> dict:
        """A request to the coordinator; ``regroup`` in its answer is a failure to regroup
        on (so is a coordinator restarted meanwhile)."""
        try:
            reply = self.membership.request(op, **fields)
        except CoordinatorRestarted as e:
            raise CommError(str(e)) from None
        if reply.get("regroup"):
            raise CommError(f"{op}: the coordinator asks the members to regroup (a member "
                            "gone, or a worker waiting to join)")
        return reply

    def _send(self, message: Message, to: tuple[int, ...], phase: str) -> None:
        """Sends one way; keeps the works not done yet, waiting for the oldest beyond
        :data:`MAX_SENDS_IN_FLIGHT` (gloo's works hold their tensors until waited for)."""
        if not to:
            return
        self._sends = self.transport.unfinished(self._sends)
        if len(self._sends) > MAX_SENDS_IN_FLIGHT:
            old, self._sends = (self._sends[:-MAX_SENDS_IN_FLIGHT],
                                self._sends[-MAX_SENDS_IN_FLIGHT:])
            self.transport.wait_sends(old, phase)
        self._sends += self.transport.send_post(message, to, phase)

    def _apply(self, engine: Engine, worker, posters: list[int]) -> None:
        """Takes the updates numbered from this replica's count on from their ``posters``
        and applies them in order."""
        for seq, src in enumerate(posters, start=self._applied()):
            got = self.transport.receive_post(src, f"post/{seq}")
            self.algorithm.apply(worker, [worker.codec.decode(got.payload)])
            if worker.global_buffers is not None:
                b = self.transport.receive_post(src, f"post/{seq}/buffers")
                worker.global_buffers = self._exact.decode(b.payload)
