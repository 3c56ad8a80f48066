"""Byzantine workers (``[attack]``): what an attacker sends instead of its honest contribution.

The engine asks :class:`Attack` to rewrite the attackers' contributions after every worker
contributed and before the collective is issued (:meth:`Attack.corrupt`), to flip the labels
of an attacker's batches (:meth:`Attack.batch`), and for the header weight an attacker claims
(``forged_weight``). The attacks are the classic ones of the Byzantine-robust literature:

* ``sign_flip``, ``noise``, ``constant`` (BTARD, Gorbunov et al. 2022, tested the same three
  at x1000; our defaults are milder, :data:`~islands.core.sections.ATTACK_SCALES`);
* ``alie``: "a little is enough" (Baruch et al. 2019): ``mean - z * std`` of the honest
  pseudo-gradients per coordinate, with the paper's ``z`` for ``n`` workers and ``f``
  attackers: ``s = floor(n / 2 + 1) - f``, ``z = Phi^-1((n - s) / n)``;
* ``ipm``: inner-product manipulation (Xie et al. 2020): ``-eps`` times the honest mean;
* ``label_flip`` (trains on ``y -> classes - 1 - y``), ``stale`` (its pseudo-gradient of
  ``delay_rounds`` rounds ago), ``nan``, ``sybil`` (every attacker sends one and the same
  update), ``forged_weight`` (a false aggregation weight in its headers),
  ``lying_aggregator`` (as a shard's owner in the butterfly, ``-scale`` times the true
  aggregate: :meth:`Attack.rule`).

In the simulator the attacker is omniscient where the attack needs it: ALIE and IPM read the
honest contributions of the round (every worker is local). Real processes see only their own;
the attackers of one adversary collude through a folder they share (``attack.shared_dir``,
:class:`SharedFolder`): each publishes the honest update it would have sent and reads the
others', so ALIE and IPM estimate the honest mean and spread from the attackers' own honest
updates (Baruch et al.'s threat model: the attackers train on data like everyone's), and a
Sybil's identities all send the first attacker's. Buffers (BatchNorm statistics) travel
untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
from collections import deque
from pathlib import Path

import torch

from islands.algorithms import Contribution
from islands.collectives.butterfly import aggregate
from islands.collectives.verify import recompute
from islands.core.errors import ConfigError
from islands.core.sections import AttackConfig
from islands.core.seeding import derive_seed

log = logging.getLogger("islands.attack")

# attacks that send their contributions as they are (they lie elsewhere)
LEAVE_CONTRIBUTIONS = frozenset({"none", "label_flip", "forged_weight", "lying_aggregator",
                                 "false_accuser"})
# attacks that read other workers' updates, and what real processes share for them
COLLUDING = {
    "alie": "it estimates the honest updates from the attackers' own",
    "ipm": "it estimates the honest mean from the attackers' own updates",
    "sybil": "its identities all send the first attacker's update",
}
# how long an attacker waits for its accomplices' updates of a round (real processes)
COLLUDE_TIMEOUT_S = 60.0


def alie_z(n: int, f: int) -> float:
    """The number of standard deviations "a little is enough" moves (Baruch et al. 2019):
    the largest that still leaves the attackers inside the honest majority's spread."""
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return statistics.NormalDist().inv_cdf(p)


def flip_labels(batch, classes: int):
    """``(x, y) -> (x, classes - 1 - y)`` for integer targets ``y``."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[1])
            and not batch[1].is_floating_point()):
        raise ConfigError("attack.name ('label_flip') needs batches (x, y) with integer "
                          "targets y; this task's are not: choose another attack")
    x, y = batch
    return type(batch)((x, classes - 1 - y))


class Attack:
    """The attackers of one run.

    Args:
        cfg: the ``[attack]`` section.
        workers: the job's workers.
        classes: the task's number of classes (``label_flip``; None: it cannot flip).
    """

    def __init__(self, cfg: AttackConfig, workers: int, *, classes: int | None = None) -> None:
        if cfg.name == "label_flip" and classes is None:
            raise ConfigError("attack.name ('label_flip') needs the task's number of classes "
                              "(Task.classes); this task does not say it: choose another "
                              "attack")
        self.cfg, self.name, self.scale = cfg, cfg.name, cfg.strength
        self.ids = frozenset(cfg.ids(workers))
        self.classes = classes
        # the stale attack's own pseudo-gradients of the last delay_rounds rounds
        self._past: dict[int, deque] = ({i: deque(maxlen=cfg.delay_rounds + 1) for i in self.ids}
                                        if cfg.name == "stale" else {})
        self._direction: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "attack"))
        self._shared: SharedFolder | None = None  # real processes' accomplices (collude)

    def collude(self, folder: str | Path, me: int) -> None:
        """Real processes: this process's attacker ``me`` shares its honest updates with the
        other attackers through ``folder`` (``alie``, ``ipm``, ``sybil``)."""
        if self.name in COLLUDING and me in self.ids:
            self._shared = SharedFolder(folder, me)

    def attacking(self, worker: int, r: int) -> bool:
        """Whether ``worker`` attacks in round ``r``."""
        return worker in self.ids and r >= self.cfg.start_round

    def accuses(self, worker: int, r: int) -> bool:
        """Whether ``worker`` makes a false accusation in round ``r`` (``false_accuser``)."""
        return self.name == "false_accuser" and self.attacking(worker, r)

    def victim(self, worker: int, members, r: int) -> int:
        """Whom a false accuser accuses in round ``r``: the other members of the sync in
        turn, one a round, the lowest at its first accusation (``start_round``)."""
        others = sorted(m for m in members if m != worker)
        return others[(r - self.cfg.start_round) % len(others)]

    def batch(self, worker: int, r: int, batch):
        """The batch ``worker`` trains on in round ``r`` (flipped labels for a label
        flipper)."""
        if self.name == "label_flip" and self.attacking(worker, r):
            return flip_labels(batch, self.classes)
        return batch

    def claims(self, worker: int, r: int, weight: float | None) -> float | None:
        """The weight ``worker`` puts in its headers (``forged_weight``: ``scale``), and
        with real processes reports at ``ready`` (where the coordinator records a samples
        count within what a round can hold, so the headers still lie)."""
        if self.name == "forged_weight" and self.attacking(worker, r):
            return self.scale
        return weight

    def rule(self, worker: int, r: int, rule):
        """The rule ``worker`` aggregates with as a shard's owner (``lying_aggregator``: the
        honest result times ``-scale``)."""
        if self.name == "lying_aggregator" and self.attacking(worker, r):
            return _Lying(rule, self.scale)
        return rule

    def codec(self, worker: int, r: int, codec):
        """The codec ``worker`` encodes with: an attacker sending NaN skips its own codec's
        finiteness check (an honest worker refuses to encode NaN before sending it)."""
        if self.name == "nan" and self.attacking(worker, r):
            return _Unchecked(codec)
        return codec

    @torch.no_grad()
    def corrupt(self, r: int, plans: dict[int, list[Contribution]],
                members: tuple[int, ...] | None = None) -> None:
        """Rewrites the attackers' contributions of round ``r`` in ``plans`` (every
        contribution but the buffers); ``members``: the sync's (None: the workers of
        ``plans``, every one local)."""
        if self.name in LEAVE_CONTRIBUTIONS:
            return
        count = len(next(iter(plans.values())))
        for k in range(count):
            items = {wid: p[k] for wid, p in plans.items()}
            if next(iter(items.values())).tag == "buffers":
                continue
            for wid in self._past if k == 0 else ():
                if wid in items:
                    self._past[wid].append(items[wid].tensor.clone())
            bad = [wid for wid in sorted(items) if self.attacking(wid, r)]
            if not bad:
                continue
            honest = [items[w].tensor for w in sorted(items) if w not in bad]
            pool, n, f = None, len(items), len(bad)  # in the simulator, every worker
            if self._shared is not None:  # real processes: the attackers' honest updates
                sync = sorted(plans) if members is None else members
                accomplices = [m for m in sync if self.attacking(m, r)]
                pool = self._shared.share(r, k, {w: items[w].tensor for w in bad},
                                          accomplices)
                n, f = len(sync), len(accomplices)
            forged = {wid: self._forged(wid, items, honest, bad, n, f, pool) for wid in bad}
            for wid, tensor in forged.items():  # a new tensor: the honest one may be kept
                plans[wid][k] = dataclasses.replace(items[wid], tensor=tensor)

    def _forged(self, wid: int, items: dict[int, Contribution], honest: list[torch.Tensor],
                bad: list[int], n: int, f: int,
                pool: dict[int, torch.Tensor] | None) -> torch.Tensor:
        own, s = items[wid].tensor, self.scale
        if self.name == "sign_flip":
            return -s * own
        if self.name == "noise":
            rms = own.float().pow(2).mean().sqrt()
            return torch.randn(own.shape, generator=self._gen, dtype=own.dtype) * (s * rms)
        if self.name == "constant":
            if self._direction is None or self._direction.shape != own.shape:
                d = torch.randn(own.shape, generator=self._gen, dtype=own.dtype)
                self._direction = d / d.norm()
            return self._direction * (s * own.norm())
        if self.name == "nan":
            return torch.full_like(own, float("nan"))
        if self.name == "stale":
            return self._past[wid][0]
        if self.name == "sybil":  # the first attacker's, as every identity sends it
            return -s * (items[bad[0]].tensor if pool is None else pool[min(pool)])
        # the omniscient attacks: the honest updates (in the simulator), or the attackers'
        # own honest ones (real processes, shared)
        rows = (honest or [own]) if pool is None else [pool[w] for w in sorted(pool)]
        stacked = torch.stack(rows)
        mu = stacked.mean(dim=0)
        if self.name == "ipm":
            return -s * mu
        assert self.name == "alie", self.name
        std = stacked.std(dim=0) if len(rows) > 1 else torch.zeros_like(mu)
        return mu - s * alie_z(n, f) * std


class SharedFolder:
    """The attackers' side channel with real processes: a folder they all read and write.

    Each attacker writes the honest update it would have sent in round ``r`` (its ``k``-th
    contribution) as ``r{r}-c{k}-w{id}.pt`` (written whole, then renamed) and reads the
    other attackers' of the same round, waiting for those in the sync up to
    :data:`COLLUDE_TIMEOUT_S`; one that never comes is left out (and logged). Each deletes its
    own files of earlier runs when it starts and of its rounds before the last as it goes, so
    the folder holds at most two rounds of each attacker.

    Args:
        folder: the shared folder (made if missing).
        me: this process's attacker.
        timeout_s: how long to wait for the others' updates of a round.
    """

    def __init__(self, folder: str | Path, me: int,
                 timeout_s: float = COLLUDE_TIMEOUT_S) -> None:
        self.folder, self.me, self.timeout_s = Path(folder), me, timeout_s
        self.folder.mkdir(parents=True, exist_ok=True)
        self._forget(me, before=None)  # an earlier run's

    def _file(self, r: int, k: int, worker: int) -> Path:
        return self.folder / f"r{r}-c{k}-w{worker}.pt"

    def _forget(self, worker: int, before: int | None) -> None:
        """Deletes ``worker``'s files of the rounds before ``before`` (None: all)."""
        for path in self.folder.glob(f"r*-c*-w{worker}.pt"):
            if before is None or int(path.name[1:path.name.index("-")]) < before:
                path.unlink(missing_ok=True)

    def share(self, r: int, k: int, mine: dict[int, torch.Tensor],
              attackers: list[int]) -> dict[int, torch.Tensor]:
        """Publishes ``mine`` ({local attacker: its honest update}) and returns every one of
        ``attackers``' updates that arrived in time, by id (``mine`` at least)."""
        for wid, t in mine.items():
            path = self._file(r, k, wid)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(t.detach().clone(), tmp)  # (a clone: a view would save its storage)
            os.replace(tmp, path)
            self._forget(wid, before=r - 1)
        out = dict(mine)
        deadline = time.monotonic() + self.timeout_s
        while True:
            for wid in attackers:
                path = self._file(r, k, wid)
                if wid not in out and path.exists():
                    out[wid] = torch.load(path, weights_only=True)
            if len(out) >= len(set(attackers) | set(mine)) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        missing = sorted(set(attackers) - set(out))
        if missing:
            log.warning("round %d: attacker %d goes on without its accomplices %s (nothing "
                        "in %s within %g s)", r, self.me, missing, self.folder, self.timeout_s)
        return out


class _Unchecked:
    """A codec that encodes without checking its input finite (a NaN attacker's)."""

    def __init__(self, codec) -> None:
        self._codec = codec

    def encode(self, x: torch.Tensor, key: str = "tensor", offset: int = 0, **_) -> object:
        return self._codec.encode(x, key, offset, finite=True)

    def __getattr__(self, name: str):
        return getattr(self._codec, name)


class _Lying:
    """A shard owner's rule that returns ``-scale`` times the honest aggregate; as a
    verifier it recomputes honestly (a lying verifier is not simulated)."""

    def __init__(self, honest, scale: float) -> None:
        self.honest, self.scale = honest, scale

    def __call__(self, stacked: torch.Tensor, weights: torch.Tensor | None = None, *,
                 key=None) -> torch.Tensor:
        return -self.scale * aggregate(self.honest, stacked, weights, key)

    def recompute(self, stacked: torch.Tensor, weights: torch.Tensor | None = None
                  ) -> torch.Tensor:
        return recompute(self.honest, stacked, weights)
