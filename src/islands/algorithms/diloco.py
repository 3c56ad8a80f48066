"""DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models"): each worker runs H inner steps with its own optimizer (AdamW; state kept
per worker, never synchronized), then the pseudo-gradients ``Δ_i = θ − θ_i`` are averaged and
an outer optimizer (Nesterov SGD, lr 0.7, momentum 0.9) applies ``mean Δ`` to the global
parameters ``θ``, from which every worker restarts.

As in torchft's ``local_sgd.DiLoCo``, the outer optimizer is any ``torch.optim`` optimizer fed
the pseudo-gradient through ``.grad``; each worker holds its own identical copy of ``θ`` and of
the outer optimizer state, so any worker can hand the state to a joiner.

Recipes for training from scratch (Charles et al. 2025 tune H and the outer lr per scale; the
DiLoCo papers sync more often early): an H schedule (``sync_every`` as ``[[step, H], ...]``),
schedules of the outer optimizer's settings per outer step (written into its param group before
each outer step, so the optimizer stays any ``torch.optim`` one), and a data-parallel phase
(``ddp_steps``): the first inner steps all-reduce gradients as DDP does, and the outer
rounds start from the parameters that phase reaches.

Overlap (``overlap``): round ``t``'s pseudo-gradients cross the wire while round ``t + 1``
trains, and their outer step lands at the end of round ``t + 1`` (the applied outer update is
one round old, as DiLoCoX's one-step delay). Where round ``t + 1`` starts, with round ``t``'s
average not there yet:

* ``"delayed"``: the newest global state (``θ_t``, which round ``t - 1``'s average made) minus
  the worker's own pseudo-gradient of round ``t``: its own drift, kept in full, stands in for
  the average until the average lands. No step is lost and none counted twice: each round's
  pseudo-gradient is the drift of that round alone (``Δ = start − end``), and the worker's
  own drift is replaced by the outer step of everyone's when that arrives. (Restarting from
  ``θ_t`` alone, a textbook one-step delay, trains round ``t + 1`` on the direction round
  ``t`` already took, which the late outer step then applies again.)
* ``"eager"`` (Kale et al. 2025): the worker's own fresh pseudo-gradient stands in for what
  has not arrived. ``eager = "whole"`` (the default): a tentative outer step from ``θ_t`` with
  all of ``Δ_i`` in place of the average, on a copy of the outer optimizer's state; the real
  outer step with the average replaces it when it lands. ``eager = "share"`` (the paper's
  update): worker ``i`` steps its own copy of the outer SGD with
  ``Δ̃_i(t) = Δ_i(t) / M + Σ_{k≠i} Δ_k(t-1) / M``, its fresh share of the average mixed with
  the others' one-round-old shares, so the members' parameters differ by their own shares.
  The shared state stays the settled one (the outer step of each average, alike on every
  member: the state a joiner receives and the hash covers), and each worker keeps, as private
  state, the exact difference between its paper trajectory and it: the SGD step is linear in
  its gradient, so with ``e(t) = Δ_i(t) / M(t) − Δ_i(t-1) / M(t-1)`` (plus the weight decay
  of the difference) the momentum difference is ``c ← μ c + e`` and the parameter difference
  ``d ← d − lr (e + μ c)`` (Nesterov; ``d ← d − lr c`` without), and round ``t + 1`` starts
  at ``θ_t + d``. It needs ``outer.optimizer = "sgd"``. A worker that receives the state (a
  joiner, a repair) starts its difference at zero.

The run's last round waits for its own average, so a run ends on the complete global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from islands.algorithms.base import GLOBAL_COLLECTIVES, Algorithm, Contribution, Worker
from islands.algorithms.outer import OuterConfig, outer_factory
from islands.algorithms.schedule import SyncEvery, outer_schedule, sync_every_setting
from islands.core.registry import register
from islands.core.sections import AlgorithmConfig, check

OuterFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

OVERLAPS = ("none", "delayed", "eager")  # algorithm.overlap
EAGER = ("whole", "share")  # algorithm.eager: what of its own pseudo-gradient stands in


def nesterov_sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """DiLoCo's outer optimizer: SGD, lr 0.7, momentum 0.9, Nesterov."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


class DiLoCo(Algorithm):
    """Inner steps locally, outer optimizer on the averaged pseudo-gradient.

    Args:
        sync_every: inner steps per round (H), or an H schedule ``[[step, H], ...]``.
        outer: builds the outer optimizer from the (single, flat) global parameter.
        aggregator: combines each shard's pseudo-gradients (default: the mean).
        ddp_steps: the first ``ddp_steps`` inner steps all-reduce gradients (each a round of
            its own, as DDP); 0: off.
        outer_schedule: ``outer_step -> {param-group key: value}`` (e.g. ``{"lr": 0.35}``),
            applied before each outer step; the first round after the data-parallel phase is
            outer step 0 (None: the optimizer's own settings throughout). Overlapped, round
            ``t``'s outer step runs at the end of round ``t + 1``, with that round's settings.
        overlap: ``"none"`` (blocking), ``"delayed"`` or ``"eager"`` (see the module).
        eager: with ``overlap = "eager"``: ``"whole"`` (a tentative outer step with all of
            ``Δ_i``) or ``"share"`` (the paper's update; an SGD outer optimizer).
        min_quorum, grace_s: the straggler policy (see :class:`DiLoCoConfig`).
        collective: how the pseudo-gradients are combined: ``"all_reduce"`` (the butterfly)
            or ``"all_gather"`` (each worker's whole encoded pseudo-gradient to every other,
            decoded and averaged there: sparse codecs are applied once, not again to the
            reduced shards; SparseLoCo).
    """

    name = "diloco"

    def __init__(self, sync_every: SyncEvery, *, outer: OuterFactory = nesterov_sgd,
                 ddp_steps: int = 0,
                 outer_schedule: Callable[[int], dict[str, float]] | None = None,
                 overlap: str = "none", eager: str = "whole", min_quorum: int = 0,
                 grace_s: float = 0.0, collective: str = "all_reduce", **kwargs) -> None:
        super().__init__(sync_every, **kwargs)
        if ddp_steps < 0:
            raise ValueError(f"ddp_steps ({ddp_steps}) must be >= 0")
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap ({overlap!r}) must be one of {', '.join(OVERLAPS)}")
        if eager not in EAGER:
            raise ValueError(f"eager ({eager!r}) must be one of {', '.join(EAGER)}")
        if collective not in GLOBAL_COLLECTIVES:
            raise ValueError(f"collective ({collective!r}) must be one of {GLOBAL_COLLECTIVES}")
        self.collective = collective
        self.outer_factory = outer
        self.ddp_steps = ddp_steps
        self.outer_schedule = outer_schedule
        self.overlap = overlap
        self.overlaps = overlap != "none"
        self.eager = eager
        self.min_quorum, self.grace_s = min_quorum, grace_s

    def syncs_gradients_at(self, step: int) -> bool:
        return step < self.ddp_steps

    def attach(self, worker: Worker) -> None:
        worker.global_params = nn.Parameter(worker.flat_params().clone())
        worker.outer = self.outer_factory([worker.global_params])
        if self.overlaps:  # where the worker's round started (its drift is measured from it)
            worker.round_start = worker.flat_params().clone()
            worker.fresh = None  # its pseudo-gradient of the round just issued
            self._settle_eager(worker)

    def begin_round(self, group, workers: list[Worker], round: int) -> None:
        # The data-parallel phase's steps are one round each, so outer step k is round
        # ddp_steps + k on every worker, joiners included (no counter to hand over).
        if self.outer_schedule is None or round < self.ddp_steps:
            return
        settings = self.outer_schedule(round - self.ddp_steps)
        for w in workers:
            for g in w.outer.param_groups:
                g.update(settings)

    def contribute(self, worker: Worker, observers: tuple[int, ...] = ()
                   ) -> list[Contribution]:
        if self.syncs_gradients_at(worker.steps):  # the data-parallel phase: as DDP
            return [Contribution(worker.flat_grads(), tag="gradient")]
        # with observers every member weighs (0 or 1), so all aggregate alike
        weight = float(worker.id not in observers) if observers else None
        if self.overlaps:
            worker.fresh = worker.round_start - worker.flat_params()
            return [Contribution(worker.fresh.clone(), weight, tag="pseudo-gradient",
                                 collective=self.collective)]
        delta = worker.global_params.detach() - worker.flat_params()
        return [Contribution(delta, weight, tag="pseudo-gradient", collective=self.collective)]

    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        if self.syncs_gradients_at(worker.steps):
            worker.load_flat_grads(reduced[0])
            return
        worker.global_params.grad = reduced[0]
        worker.outer.step()
        worker.global_params.grad = None  # the outer optimizer's one parameter
        if self.overlaps:  # the worker is a round further on: restart() places it
            worker.landed = True  # (the settled state took an outer step this round)
            return
        worker.load_flat(worker.global_params.detach())
        worker.samples = 0

    @torch.no_grad()
    def restart(self, worker: Worker, settled: bool, averaged: int = 1) -> None:
        theta = worker.global_params.detach()
        if settled:
            start = theta
            self._settle_eager(worker)
        elif self.overlap == "delayed":
            start = theta - worker.fresh
        elif self.eager == "share":
            start = theta + self._paper_offset(worker, worker.fresh / averaged, theta)
        else:
            start = self._tentative(worker, worker.fresh)
        worker.load_flat(start)
        worker.round_start = worker.flat_params().clone()
        worker.fresh = None
        worker.samples = 0

    @staticmethod
    def _settle_eager(worker: Worker) -> None:
        """The paper's eager difference back to zero: the worker is on the settled state."""
        worker.eager_offset = worker.eager_momentum = worker.eager_share = None
        worker.landed = False

    @staticmethod
    def _paper_offset(worker: Worker, share: torch.Tensor, theta: torch.Tensor
                      ) -> torch.Tensor:
        """``d``, the worker's paper trajectory less the settled state ``theta``, after this
        round's outer step with the fresh ``share`` (see the module; SGD with the outer
        optimizer's current settings, the ones the settled state's step just used). In the
        first round no average has landed: the settled state took no step (exact while every
        round's average lands; a sync lost to a failure leaves the difference approximate)."""
        g = worker.outer.param_groups[0]
        lr, mu, decay = g["lr"], g.get("momentum", 0.0), g.get("weight_decay", 0.0)
        d = worker.eager_offset if worker.eager_offset is not None else torch.zeros_like(share)
        e = share - worker.eager_share if worker.eager_share is not None else share.clone()
        if decay:  # the decay of the difference, or all of the paper's own if nothing landed
            e += decay * (d if worker.landed else theta + d)
        worker.landed = False
        if mu:
            c = e if worker.eager_momentum is None else mu * worker.eager_momentum + e
            worker.eager_momentum = c
            e = e + mu * c if g.get("nesterov") else c
        worker.eager_offset = d - lr * e
        worker.eager_share = share
        return worker.eager_offset

    @staticmethod
    def _tentative(worker: Worker, delta: torch.Tensor) -> torch.Tensor:
        """The outer step ``delta`` would make from the global state, on a copy of the outer
        optimizer (its settings and state); the worker's own optimizer is untouched."""
        p = nn.Parameter(worker.global_params.detach().clone())
        opt = type(worker.outer)([p], **worker.outer.defaults)
        opt.param_groups[0].update({k: v for k, v in worker.outer.param_groups[0].items()
                                    if k != "params"})
        for k, v in worker.outer.state[worker.global_params].items():
            opt.state[p][k] = v.clone() if torch.is_tensor(v) else v
        p.grad = delta
        opt.step()
        return p.detach()

    @torch.no_grad()
    def after_gradient_round(self, worker: Worker) -> None:
        worker.global_params.copy_(worker.flat_params())
        if self.overlaps:
            worker.round_start = worker.flat_params().clone()
        worker.samples = 0

    def can_observe(self) -> bool:
        if self.overlaps:  # an observer would need the round in flight's average too
            return False
        # An observer heals in before its step counter is put where the run is, so it could
        # not tell a data-parallel round from an outer one, nor the outer step of a schedule:
        # with either, a joiner receives the state at the next round's start instead.
        return self.ddp_steps == 0 and self.outer_schedule is None

    def load_shared_state(self, worker: Worker, state: dict[str, torch.Tensor], *,
                          reset_params: bool = True) -> None:
        super().load_shared_state(worker, state, reset_params=reset_params)
        if reset_params and self.overlaps:  # the next round starts from the state loaded
            self.restart(worker, settled=True)


@register("algorithm", "diloco", sections={"outer": OuterConfig}, default=True)
@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig(AlgorithmConfig):
    """``[algorithm] name = "diloco"``; the outer optimizer is ``[outer]``
    (:class:`~islands.algorithms.outer.OuterConfig`).

    Attributes:
        sync_every: inner steps per round (H). An int, or an H schedule: ``[[step, H], ...]``
            pairs starting at step 0, meaning "from inner step ``step`` on, rounds of ``H``
            steps" (``[[0, 10], [100, 25], [200, 50]]``: few inner steps per round early, when
            the parameters move fast). A round that starts at step s lasts the H in force at
            s; a change point inside a round takes effect at the next round.
        ddp_steps: a data-parallel phase before DiLoCo: the first ``ddp_steps`` inner steps
            all-reduce gradients every step, exactly as DDP (each a round of its own, bytes
            counted, virtual time charged); DiLoCo's rounds then start from the resulting
            parameters, which every worker holds alike. 0: off.
        overlap: ``"none"``: blocking, each round waits for its own average. ``"delayed"``
            or ``"eager"``: round t's average crosses the wire while round t+1 trains and
            its outer step lands one round late (see :mod:`islands.algorithms.diloco`; on
            real processes the sync runs on a thread).
        eager: with ``overlap = "eager"``, how the worker's own fresh pseudo-gradient stands
            in for the average not yet arrived: ``"whole"`` (a tentative outer step with all
            of it) or ``"share"`` (Kale et al.'s update: its share ``Δ_i / M`` mixed with the
            others' one-round-old shares; needs ``outer.optimizer = "sgd"``).
        min_quorum: the straggler policy (0: off, every round waits for every member). A
            round's sync goes ahead once ``min_quorum`` members are ready and ``grace_s``
            more seconds have passed; a member later than that is left out of the round
            (its round is abandoned, its contribution dropped) and catches up from the
            committed state. On real processes the coordinator applies it at the round's
            ``ready`` (beside ``runtime.round_deadline_s``).
        grace_s: seconds the sync waits for more members after the quorum is ready.
        collective: ``"all_reduce"`` (the butterfly: each shard averaged by its owner, then
            re-encoded) or ``"all_gather"`` (every worker's encoded pseudo-gradient reaches
            every other, encoded once: for sparse codecs; the download grows with the
            workers).
    """

    name: str = "diloco"
    sync_every: int | tuple[tuple[int, int], ...] = 50
    ddp_steps: int = 0
    overlap: str = "none"
    eager: str = "whole"
    min_quorum: int = 0
    grace_s: float = 0.0
    collective: str = "all_reduce"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sync_every", sync_every_setting(self.sync_every))
        check(self.ddp_steps >= 0, "algorithm.ddp_steps", self.ddp_steps,
              "must be >= 0 (0: no data-parallel phase)")
        check(self.overlap in OVERLAPS, "algorithm.overlap", self.overlap,
              f"must be one of {', '.join(repr(o) for o in OVERLAPS)}")
        check(self.eager in EAGER, "algorithm.eager", self.eager,
              f"must be one of {', '.join(repr(e) for e in EAGER)} (with overlap = 'eager': "
              "what of a worker's own pseudo-gradient stands in for the average)")
        check(self.min_quorum >= 0, "algorithm.min_quorum", self.min_quorum,
              "must be >= 0 (0: no straggler policy)")
        check(self.grace_s >= 0, "algorithm.grace_s", self.grace_s, "must be >= 0")
        check(self.overlap == "none" or not self.min_quorum, "algorithm.min_quorum",
              self.min_quorum, "works with algorithm.overlap = 'none' only for now")
        check(self.collective in GLOBAL_COLLECTIVES, "algorithm.collective", self.collective,
              f"must be one of {', '.join(repr(c) for c in GLOBAL_COLLECTIVES)}")

    def build(self, run, aggregator) -> DiLoCo:
        if self.overlap == "eager" and self.eager == "share":  # its difference is SGD's
            check(run.outer.optimizer.lower() == "sgd"
                  and not run.outer.kwargs.get("dampening"), "algorithm.eager", self.eager,
                  f"needs outer.optimizer = 'sgd' without dampening (got "
                  f"{run.outer.optimizer!r}, dampening "
                  f"{run.outer.kwargs.get('dampening', 0)}): use eager = 'whole' otherwise")
        return DiLoCo(self.sync_every, outer=outer_factory(run.outer), aggregator=aggregator,
                      ddp_steps=self.ddp_steps,
                      outer_schedule=outer_schedule(lr=run.outer.lr,
                                                    momentum=run.outer.momentum),
                      overlap=self.overlap, eager=self.eager, min_quorum=self.min_quorum,
                      grace_s=self.grace_s, collective=self.collective)
