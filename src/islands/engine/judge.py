"""Who the aggregate listened to: per-worker statistics of every sync, and the ban rule.

After each sync the :class:`Judge` reads, for every member of the group,

* ``influence``: how much its contribution counted against a plain mean, in [0, 1], as the
  robust rule reports it (:attr:`islands.aggregators.Rule.influence`: the share of its
  coordinates a trimmed mean kept, 1 or 0 for a Krum selection, CenteredClip's clip factor,
  the Sybil defence's weight), averaged over the shards by their sizes;
* ``distance_to_aggregate``: ``||sent - aggregate|| / ||aggregate||`` and
  ``cosine_to_aggregate``, for the contributions this process saw whole (every worker's in the
  simulator, its own in the runtime; none under ``runtime.trust = "cluster"``, whose native
  all-reduce writes the mean over the contribution).

They land in each worker's ``metrics.jsonl`` rows and, averaged, in ``summary.json``
(``influence_by_worker``). **The ban rule**: a worker whose influence stays under
``aggregator.ban_below`` times the sync's median influence for ``aggregator.ban_after`` syncs
in a row is judged malicious (the sync's median is the honest majority's yardstick: a robust
rule that trims every worker alike, as a trimmed mean does, bans nobody). Provable offences
(a non-finite payload, a forged weight: a :class:`~islands.core.errors.PeerRefused`) need no
statistics; the driver bans their sender at once.
"""

from __future__ import annotations

import statistics

import torch

from islands.aggregators import Mean, Rule
from islands.core.sections import AggregatorConfig


class WorkerRules(dict):
    """``{worker: its rule}``, each built from the ``[aggregator]`` section the first time it
    is asked for (the runtime builds its worker after the engine)."""

    def __init__(self, section: AggregatorConfig) -> None:
        super().__init__()
        self.section = section

    def __missing__(self, worker: int) -> Rule:
        rule = self.section.build()
        if not isinstance(rule, Rule):  # the plain mean, with a clone filter in front
            rule = Mean()
        rule.clones = self.section.clones
        self[worker] = rule
        return rule


def worker_rules(cfg, algorithm, workers) -> object:
    """The rule each local worker aggregates with: a robust rule built once per worker (its
    private state, such as CenteredClip's center, is its own; ``aggregator.clones`` set), or
    the algorithm's one plain function for every worker."""
    if not isinstance(algorithm.aggregator, Rule) and cfg.aggregator.clones is None:
        return algorithm.aggregator
    rules = WorkerRules(cfg.aggregator)
    for w in workers:
        rules[w.id]  # noqa: B018 (built now)
    return rules


class Judge:
    """Per-worker statistics of every sync and the ban rule (see the module docstring).

    Args:
        cfg: the ``[aggregator]`` section (``ban_after``, ``ban_below``).
    """

    def __init__(self, cfg: AggregatorConfig) -> None:
        self.ban_after, self.ban_below = cfg.ban_after, cfg.ban_below
        self.latest: dict[int, dict] = {}  # worker -> its statistics of the latest sync
        self._low: dict[int, int] = {}  # worker -> syncs in a row under the threshold
        self._sum: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self.verdicts: list[dict] = []  # {"worker", "round", "reason"}, not yet acted on

    @torch.no_grad()
    def observe(self, r: int, members: tuple[int, ...], sent: dict[int, torch.Tensor],
                results: dict[int, torch.Tensor], rules) -> None:
        """Reads one sync: ``sent`` and ``results`` are the local workers' first contribution
        and its aggregate; ``rules`` the local rules (their reports since the last sync)."""
        self.latest = {}
        influence = _influence(members, rules)
        for wid, x in sent.items():
            agg = results[wid].to(x.dtype)
            norm = float(agg.norm())
            stats = {"distance_to_aggregate": float((x - agg).norm()) / max(norm, 1e-30),
                     "cosine_to_aggregate": float(torch.nn.functional.cosine_similarity(
                         x.flatten(), agg.flatten(), dim=0))}
            self.latest[wid] = stats
        if influence is None:
            return
        median = statistics.median(influence.values())
        for wid, v in influence.items():
            self.latest.setdefault(wid, {})["influence"] = v
            self._sum[wid] = self._sum.get(wid, 0.0) + v
            self._count[wid] = self._count.get(wid, 0) + 1
            low = v < self.ban_below * median
            self._low[wid] = self._low.get(wid, 0) + 1 if low else 0
            if self.ban_after is not None and self._low[wid] == self.ban_after:
                self.verdicts.append({
                    "worker": wid, "round": r,
                    "reason": f"influence under {self.ban_below:g} x the median for "
                              f"{self.ban_after} syncs in a row (last {v:.3g} against "
                              f"{median:.3g})"})

    def row(self, worker: int) -> dict:
        """The worker's statistics of the latest sync, for its ``metrics.jsonl`` row."""
        return dict(self.latest.get(worker, {}))

    def take_verdicts(self) -> list[dict]:
        """The workers judged malicious since the last call."""
        out, self.verdicts = self.verdicts, []
        return out

    def summary(self) -> dict:
        """``summary.json``'s ``influence_by_worker``: each worker's mean influence (None
        where no robust rule reported one)."""
        if not self._count:
            return {}
        return {"influence_by_worker": {str(w): self._sum[w] / self._count[w]
                                        for w in sorted(self._count)}}


def _influence(members: tuple[int, ...], rules) -> dict[int, float] | None:
    """Each member's influence in the sync just done, from the local rules' reports (rows in
    member order), averaged over the shards by their sizes."""
    local = rules.values() if isinstance(rules, dict) else [rules]
    reports = [rep for rule in local if isinstance(rule, Rule) for rep in rule.take_reports()]
    if not reports:
        return None
    total = sum(numel for _, numel, _ in reports)
    acc = torch.zeros(len(members), dtype=torch.float64)
    for _, numel, infl in reports:
        if infl.numel() == len(members):
            acc += infl.to(torch.float64) * numel
    return {m: float(v) / total for m, v in zip(members, acc)}
