"""The coordinator's order of an asynchronous job's updates (``algorithm.name =
"async_local_sgd"`` on real processes, :mod:`islands.runtime.asynchronous`).

Every worker applies every update to its replica of the global parameters in one order, so
the replicas stay bit-identical; with real processes that order is the coordinator's. A worker
that finishes its inner steps asks for its place (``post``): the coordinator numbers its
update after every update it numbered before, decides whether it is too stale (the updates
numbered since its worker pulled, against ``algorithm.max_staleness``: then it is dropped, not
numbered), and answers with the posters of the updates the worker has not applied yet, in
order, and the inner steps of its next update. The budget is the simulator's: ``workers x
steps`` inner steps in all, handed out ``H`` at a time, or, with ``algorithm.dynamic_steps``,
``H`` times each worker's measured speed over the fastest's (the speeds the workers report
with their posts), within what is left.

At a regrouping (the ``start`` barrier again: a member gone, a joiner waiting) the replica
that applied the most updates is the one every member takes: updates numbered past it are
void (their posters never delivered them to it), and the inner steps of the void updates, and
those every member was computing, return to the budget and are handed out again.
"""

from __future__ import annotations

from islands.algorithms.asynchronous import local_steps


class PostOrder:
    """One asynchronous job's numbered updates and its budget of inner steps.

    Args:
        fingerprint: the job's config fingerprint (``workers``, ``steps``,
            ``algorithm.sync_every``, ``dynamic_steps`` and ``max_staleness``).
    """

    def __init__(self, fingerprint: dict) -> None:
        self.total = int(fingerprint["workers"]) * int(fingerprint["steps"])
        self.left = self.total
        self.sync_every = int(fingerprint["algorithm.sync_every"])
        self.dynamic = bool(fingerprint.get("algorithm.dynamic_steps", True))
        self.max_staleness = int(fingerprint.get("algorithm.max_staleness", 8))
        self.posters: list[int] = []  # the poster of each numbered update, in order
        self.steps: list[int] = []  # the inner steps of each numbered update
        self.planned: dict[int, int] = {}  # each member's inner steps in progress
        self.rates: dict[int, float] = {}  # inner steps per second, as last reported
        self.log: list[dict] = []  # every post, dropped ones included (the job's view)

    @property
    def done(self) -> bool:
        """Whether every inner step is handed out and every member has posted its last."""
        return self.left == 0 and not any(self.planned.values())

    @property
    def spent(self) -> int:
        """The inner steps in a replica holding every numbered update."""
        return sum(self.steps)

    def progress(self) -> dict:
        """For ``islands status``: the updates numbered and dropped, the inner steps not
        handed out yet and those each member is computing."""
        return {"updates": len(self.posters),
                "dropped": sum(p["seq"] is None for p in self.log),
                "steps_left": self.left, "in_progress": {str(w): n for w, n in
                                                         sorted(self.planned.items()) if n}}

    def regroup(self, members: list[int], applied: int, spent: int | None = None
                ) -> dict[int, int]:
        """The members go on from a replica holding the first ``applied`` updates (with
        ``spent`` inner steps in them, as its worker reports): the rest are void; every
        member's inner steps are handed out again. Returns them.

        A coordinator started anew has numbered none of a replica's updates: it numbers on
        from ``applied`` (their posters unknown, -1) and takes their ``spent`` inner steps
        from the budget."""
        if applied > len(self.posters):
            unseen = max(0, int(spent or 0) - self.spent)
            missing = applied - len(self.posters)
            self.posters += [-1] * missing
            self.steps += [unseen] + [0] * (missing - 1)
            self.left = max(0, self.left - unseen)
        void = self.steps[applied:]
        del self.posters[applied:], self.steps[applied:]
        self.log = [p for p in self.log if p["seq"] is None or p["seq"] < applied]
        self.left += sum(void) + sum(self.planned.values())
        self.planned = {}
        for w in sorted(members):
            self._allot(w, members)
        return dict(self.planned)

    def post(self, worker: int, steps: int, pulled: int, rate: float, members) -> dict:
        """``worker`` finished ``steps`` inner steps from the global parameters holding the
        first ``pulled`` updates; its place, or that it is dropped, and its next steps."""
        if steps != self.planned.get(worker):
            return {"error": f"post: worker {worker} trained {steps} inner steps where "
                             f"{self.planned.get(worker)} were handed to it"}
        if rate > 0:
            self.rates[worker] = float(rate)
        stale = len(self.posters) - pulled
        kept = 0 <= stale <= self.max_staleness
        seq = len(self.posters) if kept else None
        if kept:
            self.posters.append(worker)
            self.steps.append(steps)
        self.log.append({"worker": worker, "steps": steps, "seq": seq, "stale": stale})
        self.planned[worker] = 0
        self._allot(worker, members)
        return {"seq": seq, "stale": stale, "kept": kept, "next": self.planned[worker]}

    def _allot(self, worker: int, members) -> None:
        rates = {w: self.rates.get(w, 0.0) for w in members}
        self.planned[worker] = min(local_steps(self.sync_every, self.dynamic, worker, rates),
                                   self.left)
        self.left -= self.planned[worker]
