"""How the coordinator's barriers release: who the members of a round are, who receives the
state from whom, who is left out or excluded, and when a round commits (see
:mod:`islands.runtime.coordinator` for the protocol). A mixin of :class:`Coordinator`, kept
apart because these rules are the protocol's substance and the connection handling is not.
Every method runs with the coordinator's lock held.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from statistics import median

from islands.aggregators import coordinatewise
from islands.core.config import build_component
from islands.core.errors import ConfigError
from islands.runtime import evidence

log = logging.getLogger("islands.coordinator")


@dataclass
class Barrier:
    kind: str
    key: tuple
    expected: frozenset | None  # None: every live worker (start)
    opened: float = field(default_factory=time.monotonic)
    arrivals: dict = field(default_factory=dict)
    result: dict | None = None
    quorum_at: float | None = None  # when a ready barrier first had its quorum


class RoundRules:
    """The release rules of the ``start``, ``ready`` and ``commit`` barriers."""

    def _check(self) -> None:
        live = {i for i, m in self.members.items() if m.alive}
        now = time.monotonic()
        b = self._open_start
        if b is not None and b.result is None:
            here = live & set(b.arrivals)
            first = self.epoch == 0  # this instance's first barrier: the job's (re)start
            need = max((int(r.get("wait_for", 1)) for i, r in b.arrivals.items() if i in here),
                       default=1) if first else 1
            waited = now - b.opened
            # a straggler left out of the last round is still computing it: don't wait
            awaited = live - (set() if first else self._behind)
            late = (not first and self.deadline_s is not None and waited > self.deadline_s)
            if here and (awaited <= here or late) and (len(here) >= need
                                                       or waited > self.join_timeout_s):
                b.result = self._release_start(b, here)
                self._open_start = None
        # a worker back at `start` (it aborted its round) is no longer awaited elsewhere
        at_start = set(self._open_start.arrivals) if self._open_start is not None else set()
        for b in list(self._barriers.values()):
            if b.result is not None:
                continue
            here = live & set(b.arrivals)
            waiting = (b.expected & live) - here - at_start
            late = b.kind == "ready" and here and (
                (self.deadline_s is not None and now - b.opened > self.deadline_s)
                or self._quorum_waited(b, here, now))
            if not waiting or late:
                b.result = (self._release_ready(b, here) if b.kind == "ready"
                            else self._release_commit(b, here))

    def _quorum_waited(self, b: Barrier, here: set[int], now: float) -> bool:
        """The straggler policy (``algorithm.min_quorum``, ``grace_s``): a ready barrier goes
        ahead once ``min_quorum`` members are there and ``grace_s`` more seconds passed."""
        if not self.min_quorum or len(here) < self.min_quorum:
            return False
        if b.quorum_at is None:
            b.quorum_at = now
        return now - b.quorum_at >= self.grace_s

    def _new_epoch(self, members: tuple[int, ...]) -> dict:
        if members != self.current:
            self.epoch += 1
            self.current = members
            self.epochs.append({"epoch": self.epoch, "members": list(members),
                                "from_round": self.last_round + 1, "unix": time.time()})
        leader = self.members[members[0]] if members else None
        return {"epoch": self.epoch, "members": list(members),
                "prefix": f"{self.instance}/{self.epoch}",
                "store": leader.store if leader else None}

    def _heal_into_round(self, wid: int, req: dict) -> dict | None:
        """Admits a healing joiner into the round in flight (None: it waits for the next)."""
        f = self._in_flight
        if not req.get("heal") or f is None or wid in f["members"]:
            return None
        ready = self._barriers.get(("ready", f["round"], 0))
        if ready is not None and ready.result is not None:
            return None  # its collective is formed: too late to take part
        f["joiners"].add(wid)
        if ready is not None:
            ready.expected = ready.expected | {wid}
        log.info("worker %d heals into round %d (in flight, members %s)", wid, f["round"],
                 sorted(f["members"]))
        return self._heal_reply(f["round"], f["src"], f["members"] | f["joiners"])

    @staticmethod
    def _heal_reply(round: int, src: int, members) -> dict:
        """What a healing joiner hears: the round it observes, its source, the members."""
        return {"heal": True, "round": round, "src": src, "members": sorted(members)}

    def _release_start(self, b: Barrier, here: set[int]) -> dict:
        reports = {i: b.arrivals[i] for i in here}
        if any(r.get("gossip") for r in reports.values()):
            return self._release_gossip(reports, here)
        top = max(int(r["round"]) for r in reports.values())
        at_top = {i: r["hash"] for i, r in reports.items() if int(r["round"]) == top}
        if self.sampled:
            # a sampled round leaves its state with its participants only: no majority (the
            # members' states differ by design; the algorithm's refresh brings a drawn
            # worker up to date), and a joiner's source committed the last round if it can
            good = sorted(at_top, key=lambda i: (i not in self._last_committers, i))
            majority = at_top[good[0]]
        else:
            majority, tied = _majority(at_top)
            if tied:
                log.warning("round %d: states tie; keeping the lowest worker id's", top)
            good = sorted(i for i, h in at_top.items() if h == majority)
        stale = sorted(set(here) - set(good))
        for i in stale:
            if int(reports[i]["round"]) == top:
                self.hash_mismatches += 1
                log.warning("worker %d: shared-state hash mismatch at round %d; repairing "
                            "from worker %d (majority)", i, top, good[0])
        # joiners behind that asked to heal observe this round, as if they came mid-round:
        # they receive the state at its ready, so the members need not wait for them now
        healing = sorted(i for i in stale if reports[i].get("heal")
                         and int(reports[i]["round"]) < top)
        members = set(here) - set(healing)
        self._behind -= here  # at start: none of them is computing an earlier round
        out = self._new_epoch(tuple(sorted(members)))
        self._in_flight = {"round": top, "members": frozenset(members), "src": good[0],
                           "joiners": set(healing), "since": time.monotonic()}
        out = {**out, "round": top, "src": good[0], "hash": majority, "healing": healing,
               "keys": self._keys(here), "need_state": [i for i in stale if i not in healing]}
        if (posts := self.async_posts()) is not None:  # "round": the updates applied
            self._in_flight = None  # no round: islands status shows the updates instead
            grants = posts.regroup(sorted(members), top, reports[good[0]].get("spent"))
            out["grants"] = {str(w): n for w, n in grants.items()}
            out["spent"] = posts.spent
            log.info("asynchronous members %s from update %d (worker %d's replica); inner "
                     "steps handed out %s, %d left", sorted(members), top, good[0], grants,
                     posts.left)
        return out

    def _release_gossip(self, reports: dict, here: set[int]) -> dict:
        """A gossip job's (re)grouping (:mod:`islands.runtime.gossip`): its members hold
        parameters of their own, so no majority and no repair. The round is the furthest any
        member reached (the others skip to it with their own parameters); a fresh worker (a
        joiner that never trained) receives the state of the lowest member that has."""
        top = max(int(r["round"]) for r in reports.values())
        fresh = sorted(i for i, r in reports.items() if r.get("fresh"))
        sources = sorted(set(here) - set(fresh))
        out = self._new_epoch(tuple(sorted(here)))
        log.info("gossip members %s from round %d%s", sorted(here), top,
                 f"; {fresh} take worker {sources[0]}'s state" if fresh and sources else "")
        return {**out, "round": top, "src": sources[0] if sources else min(here),
                "hash": None, "healing": [], "keys": self._keys(here),
                "need_state": fresh if sources else []}

    def _release_ready(self, b: Barrier, here: set[int]) -> dict:
        members = tuple(sorted(here))
        left_out = sorted(b.expected - here)
        if left_out:
            log.warning("round %d: committing without %s (deadline, quorum or gone)", b.key[1],
                        left_out)
            # still computing this round; not one already back at start (a restart of a
            # member lost mid-round, say), which the next start must wait for
            at_start = self._open_start.arrivals if self._open_start is not None else {}
            self._behind |= set(left_out) - set(at_start)
        # each member's aggregation weight, by the algorithm's rule where the job's config
        # fixes it, else as it reported it (held against every header)
        out = {**self._new_epoch(members), "left_out": left_out, "keys": self._keys(members),
               "weights": {str(i): self._recorded_weight(i, w) for i in members
                           if isinstance(w := b.arrivals[i].get("weight"), (int, float))
                           and not isinstance(w, bool) and math.isfinite(w)}}
        f = self._in_flight
        if f is not None and f["round"] == b.key[1]:
            observers = sorted(f["joiners"] & here)
            senders = sorted(here - f["joiners"])
            if observers and senders:
                src = f["src"] if f["src"] in senders else senders[0]
                out.update(observers=observers, heal={"src": src, "dsts": observers})
                # an observer contributes nothing: its weight is 0 whatever it reported (as
                # every member sends it; a header or aggregate held to a report would be
                # "forged")
                out["weights"].update({str(o): 0.0 for o in observers
                                       if str(o) in out["weights"]})
        return out

    def _recorded_weight(self, worker: int, reported: float) -> float:
        """The aggregation weight recorded for ``worker``'s report: LocalSGD's rule where the
        job's config fixes it (its fingerprint), whatever the member says: ``uniform`` 1,
        ``dataset`` its share's size (``data.sizes``, a built-in worker's). Every receiver
        holds the sender's header to it, so a forged claim is refused by name. Otherwise the
        report stands, within what it can be: never below 0 and, for ``samples`` (what it
        trained this round) where the data fixes a batch's samples, never above a whole
        round's batches (:meth:`_most_samples`); a report outside is recorded at the bound
        and logged."""
        fp = self.fingerprint
        rule = fp.get("algorithm.weighting") if fp.get("algorithm.name") == "local_sgd" else None
        sizes = fp.get("data.sizes")
        if rule == "uniform":
            return 1.0
        if rule == "dataset" and isinstance(sizes, list) and worker < len(sizes):
            return float(sizes[worker])
        most = self._most_samples() if rule == "samples" else None
        if reported < 0:
            log.warning("worker %d reported weight %g; recorded 0 (a weight is never "
                        "negative)", worker, reported)
            return 0.0
        if most is not None and reported > most:
            log.warning("worker %d reported %g samples trained this round; recorded %g, a "
                        "whole round's (data.samples_per_step x algorithm.sync_every)", worker,
                        reported, most)
            return most
        return float(reported)

    def _most_samples(self) -> float | None:
        """The most samples a member can train in one round, where the job fixes it: its
        data's samples a step (``data.samples_per_step``, in the fingerprint of a worker
        whose partition fixes it) times the largest ``algorithm.sync_every``. None where
        the member's own loop decides (a loader's batches, a drop-in ``Trainer``)."""
        per_step, h = (self.fingerprint.get(k)
                       for k in ("data.samples_per_step", "algorithm.sync_every"))
        if isinstance(h, list) and h:
            h = max(int(pair[1]) for pair in h)
        return float(per_step * h) if isinstance(per_step, int) and isinstance(h, int) else None

    def _release_commit(self, b: Barrier, here: set[int]) -> dict:
        r, attempt = b.key[1], b.key[2]
        ok = here == set(b.expected) and all(b.arrivals[i].get("ok") for i in here)
        majority, _ = _majority({i: b.arrivals[i].get("hash") for i in here
                                 if b.arrivals[i].get("ok")})
        mismatched = sorted(i for i in here if b.arrivals[i].get("ok")
                            and b.arrivals[i].get("hash") != majority)
        out = {"hash": majority, "mismatched": mismatched, "epoch": self.epoch}
        if ok:
            if r > self.last_round:
                self.rounds_committed += 1
            self._last_committers = frozenset(here)
            self.last_round = max(self.last_round, r)
            f = self._in_flight
            if f is not None and f["round"] == r:
                self._commits.append((time.time(), time.monotonic() - f["since"]))
                self._in_flight = None
            if mismatched:
                self.hash_mismatches += len(mismatched)
                log.warning("round %d: hash mismatch on %s", r, mismatched)
            self._note_statistics(b, here, r)
            judged = self._judged(b, here, r)
            return {**out, "commit": True, "members": sorted(here),
                    "excluded": [{"worker": w, **self.excluded[w]} for w in judged]}
        self.aborted_attempts += 1
        excluded, sit_out = self._blame(b, here)
        members = sorted(here - excluded - sit_out)
        log.warning("round %d attempt %d aborted (members %s, arrived %s%s)", r, attempt,
                    sorted(b.expected), sorted(here),
                    f"; excluded {sorted(excluded)}" if excluded else "")
        if not excluded and members == sorted(b.expected) and attempt + 1 >= self.max_attempts:
            whys = sorted({str(b.arrivals[i].get("why")) for i in here
                           if not b.arrivals[i].get("ok")})
            fatal = (f"round {r} failed {attempt + 1} attempts with the same members "
                     f"{members} ({'; '.join(whys)}); giving up instead of retrying forever")
            log.error("%s", fatal)
            return {**out, "commit": False, "members": members, "fatal": fatal}
        return {**out, "commit": False, "members": members,
                "excluded": [{"worker": w, **self.excluded[w]} for w in sorted(excluded)]}

    def _job_rule(self):
        """The job's aggregation rule, built from its config fingerprint's ``aggregator.*``
        keys, to check a verifier's evidence against a shard owner; None where the job has no
        rule a third party can check 16 KiB at a time (:func:`coordinatewise`; the clone
        filter, which the engine puts in front of the rule, reads whole rows)."""
        section = {k.partition(".")[2]: v for k, v in self.fingerprint.items()
                   if k.startswith("aggregator.")}
        if not section or section.get("clones") is not None:
            return None
        try:
            rule = build_component("aggregator", section).build()
        except (ConfigError, ValueError, TypeError) as e:
            log.warning("the job's aggregator cannot be built here (%s): a verifier's "
                        "evidence cannot be checked", e)
            return None
        return rule if coordinatewise(rule) else None

    def _blame(self, b: Barrier, here: set[int]) -> tuple[set[int], set[int]]:
        """Judges the accusations of an aborted attempt (:mod:`islands.runtime.evidence`):
        returns who is excluded from the run (the proven culprits, those who blamed
        themselves, the seconded, the authors of evidence that proves nothing) and who sits
        out the retry (both sides of a dispute that no evidence settles)."""
        r, attempt = b.key[1], b.key[2]
        ready = self._barriers.get(("ready", r, attempt))
        recorded = (ready.result or {}).get("weights", {}) if ready is not None else {}
        weights = {int(i): w for i, w in recorded.items()}
        excluded: dict[int, dict] = {}
        unproven: dict[int, dict[int, str]] = {}  # {accused: {accuser: why}}
        themselves: dict[int, dict] = {}
        for reporter in sorted(here):
            blame = b.arrivals[reporter].get("blame")
            if not isinstance(blame, dict) or blame.get("worker") not in b.expected:
                continue
            accused, why = int(blame["worker"]), str(blame.get("why"))[:300]
            proof = blame.get("evidence")
            if accused == reporter:  # its own contribution could not be encoded
                themselves[accused] = {"by": reporter, "round": r, "why": why}
            elif isinstance(proof, dict) and accused in self.members:
                proven, verdict = evidence.judge(
                    proof, key=self.members[accused].key, accused=accused, accuser=reporter,
                    context=f"{r}/{attempt}", weights=weights,
                    job_rule=self._job_rule())
                if proven:
                    excluded.setdefault(accused, {"by": reporter, "round": r,
                                                  "why": f"{why} (proven: {verdict})"})
                else:
                    excluded[reporter] = {"by": "coordinator", "round": r,
                                          "why": f"a false accusation of worker {accused}: "
                                                 f"{verdict}"}
            else:
                unproven.setdefault(accused, {})[reporter] = why
        disputes: list[tuple[set[int], int]] = []  # (accusers, accused)
        for accused, whys in sorted(unproven.items()):
            accusers = set(whys) - set(excluded)
            if not accusers or accused in excluded:
                continue
            if evidence.seconded(accusers, accused, here):
                first = min(accusers)
                excluded[accused] = {"by": first, "round": r, "why": f"{whys[first]} (refused "
                                     f"by workers {sorted(accusers)} alike)"}
                continue
            if accused in themselves:  # it owned up: no dispute
                continue
            disputes.append((accusers, accused))
            self.disputes.append({"round": r, "attempt": attempt, "accused": accused,
                                  "accusers": sorted(accusers)})
            log.warning("round %d: worker(s) %s refused worker %d's contribution without "
                        "evidence, seconded by no one: both sides sit out the retry", r,
                        sorted(accusers), accused)
        for w, info in themselves.items():
            excluded.setdefault(w, info)
        excluded.update(self._at_odds_with_most(disputes, here, r, excluded))
        sit_out: set[int] = set()
        for accusers, accused in disputes:  # a dispute whose one side is excluded is settled
            if accused not in excluded and (left := accusers - set(excluded)):
                sit_out |= left | {accused}
        for w, info in excluded.items():
            self._exclude(w, info)
        return set(excluded), sit_out

    def _at_odds_with_most(self, disputes: list[tuple[set[int], int]], here: set[int],
                           r: int, excluded: dict[int, dict]) -> dict[int, dict]:
        """Adds this attempt's disputes to each side's record of whom it was at odds with,
        over the run; returns the workers at odds with at least two and more than half of
        their fellow members in ``here`` (:func:`evidence.seconded`), as though those had
        refused it alike. The members are an honest majority, and an honest member is at
        odds only with the dishonest (a false accuser, a sender of garbage), so a member at
        odds with most of the others is the liar."""
        for accusers, accused in disputes:
            for a in accusers:
                self.at_odds.setdefault(a, set()).add(accused)
                self.at_odds.setdefault(accused, set()).add(a)
        out = {}
        for w in sorted({w for accusers, accused in disputes for w in accusers | {accused}}):
            others = (self.at_odds[w] & here) - set(excluded)
            if w not in excluded and evidence.seconded(others, w, here):
                out[w] = {"by": "coordinator", "round": r,
                          "why": f"at odds with workers {sorted(others)}, more than half of "
                                 "its fellow members, in disputes no evidence settled"}
        return out

    def _judged(self, b: Barrier, here: set[int], r: int) -> list[int]:
        """After a commit: the members each member's judge (the engine's ban rule on its
        view of the influence statistics) found malicious; one named by a majority of the
        others (:func:`evidence.seconded`) is excluded from the run."""
        reasons: dict[int, dict[int, str]] = {}  # {accused: {judge: reason}}
        for reporter in sorted(here):
            for v in b.arrivals[reporter].get("judged") or ():
                if isinstance(v, dict) and v.get("worker") in here and v["worker"] != reporter:
                    reasons.setdefault(int(v["worker"]), {})[reporter] = str(v.get("reason"))
        out = []
        for accused, by in sorted(reasons.items()):
            if not evidence.seconded(set(by), accused, here):
                continue
            first = min(by)
            self._exclude(accused, {"by": first, "round": r, "why": f"judged malicious by "
                                    f"workers {sorted(by)}: {by[first][:200]}"})
            out.append(accused)
        return out

    def _exclude(self, w: int, info: dict) -> None:
        """Excludes worker ``w`` from the run (``info``: by whom, at which round, why)."""
        self.excluded[w] = info
        if w in self.members:
            self.members[w].alive = False
        log.warning("worker %d excluded at round %d by %s: %s", w, info["round"],
                    "the coordinator" if info["by"] == "coordinator" else f"worker {info['by']}",
                    info["why"])

    def _note_statistics(self, b: Barrier, here: set[int], r: int) -> None:
        """Each member's statistics of a committed round (``status()``'s ``workers``): its
        own distance and cosine to the aggregate, and the median of the influence the
        members' rules gave it."""
        views = {i: v for i in here if isinstance(v := b.arrivals[i].get("stats"), dict)}
        for w in here:
            own = views.get(w, {}).get(str(w))
            own = own if isinstance(own, dict) else {}
            seen = [float(x) for v in views.values() if isinstance(v.get(str(w)), dict)
                    and isinstance(x := v[str(w)].get("influence"), (int, float))]
            row = {k: float(own[k]) for k in ("distance_to_aggregate", "cosine_to_aggregate")
                   if isinstance(own.get(k), (int, float))}
            if seen:
                row["influence"] = median(seen)
            if row:
                self.statistics[w] = {"round": r, **row}


def _majority(hash_by_worker: dict[int, str]) -> tuple[str | None, bool]:
    """The hash most workers report, and whether it tied with another; in a tie (two
    workers, two states) the lowest worker id's, so start and commit pick alike."""
    if not hash_by_worker:
        return None, False
    counts = Counter(hash_by_worker.values())
    most = max(counts.values())
    tied = {h for h, n in counts.items() if n == most}
    winner = next(h for _, h in sorted(hash_by_worker.items()) if h in tied)
    return winner, len(tied) > 1
