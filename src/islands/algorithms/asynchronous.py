"""Asynchronous local SGD (Liu et al. 2024, "Asynchronous Local-SGD Training for Language
Modeling"): no round waits for anyone. Each worker runs its inner steps from the global
parameters it last pulled and, as soon as it finishes, posts its pseudo-gradient
``Δ_i = θ_pulled − θ_i``; the outer optimizer applies it to the global parameters at once, and
the worker pulls the result and goes on. A slow worker slows nobody; its updates arrive
*stale*, computed from global parameters that others have moved since.

The two fixes of the paper, both on by default:

* **Delayed Nesterov** (:class:`DelayedNesterov`): Nesterov momentum applied once every
  ``N`` arrivals (``momentum_every``; default: the number of workers), plain steps in
  between, so one arrival never drives the momentum alone. Our variant keeps a window of
  ``N`` arrivals equal to one synchronous Nesterov step on their mean: each arrival moves the
  parameters by ``lr · Δ / N`` as it comes (the gradient part, seen at once), and the ``N``-th
  also updates ``m ← β m + mean Δ`` and moves them by ``lr · β · m`` (the momentum part).
* **Dynamic local updates** (``dynamic_steps``): a worker's inner steps per update are
  ``H`` times its measured speed over the fastest worker's (at least 1), so updates of
  workers of different speed arrive about together and carry alike-sized pseudo-gradients.

Staleness: an update's staleness is the number of updates applied to the global parameters
between its worker's pull and its post. One staler than ``max_staleness`` is dropped (not
sent, not applied, counted); its worker pulls the current global parameters and starts over.

There is no server. The global parameters (and the outer optimizer's state) are replicated:
each post goes to every worker, and every worker applies the updates in one order, the order
in which they were posted, so every replica stays bit-identical. A worker sends its update
at once and, before it pulls, waits only for the updates posted before its own that have not
reached it yet. The run's
budget is the synchronous run's data: ``workers × steps`` inner steps in all, however they
are spread over the workers (the fast ones take more). In the simulator the order is the
modelled step times' and its fault plan takes crashes, leaves, joins, slowdowns and link
changes at virtual times (:class:`islands.sim.faults.AsyncFaultPlan`); on real processes the
coordinator numbers the updates (:mod:`islands.runtime.asynchronous`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from islands.algorithms.base import Algorithm, Contribution, Worker
from islands.algorithms.outer import OuterConfig
from islands.core.errors import ConfigError
from islands.core.registry import register
from islands.core.sections import AlgorithmConfig, check

# the fault kinds its loop carries out (a partition cuts its side from the coordinator)
ASYNC_FAULTS = ("crash", "leave", "join", "slow", "link", "partition", "heal")


class DelayedNesterov(torch.optim.Optimizer):
    """Nesterov SGD whose momentum moves once every ``every`` steps (delayed Nesterov, after
    Liu et al. 2024); the gradient part of each step lands at once.

    Per step with gradient ``g`` (a pseudo-gradient): ``p ← p − lr · g / every``; every
    ``every``-th step also ``m ← β m + ḡ`` (``ḡ``: the mean of the window's ``every``
    gradients) and ``p ← p − lr · β · m``. Over a window the parameters move by
    ``lr · (ḡ + β m)``: one Nesterov step on the window's mean. ``every = 1`` is
    ``torch.optim.SGD(nesterov=True)``.

    State per parameter (the shared state's ``outer/<key>``): ``momentum_buffer``, ``window``
    (the sum of the window's gradients so far) and ``count`` (steps taken).
    """

    def __init__(self, params, lr: float = 0.7, momentum: float = 0.9, every: int = 1) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or every < 1:
            raise ValueError(f"lr ({lr}) must be > 0, momentum ({momentum}) in [0, 1) and "
                             f"every ({every}) >= 1")
        super().__init__(params, {"lr": lr, "momentum": momentum, "every": every})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, beta, every = group["lr"], group["momentum"], group["every"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                s = self.state[p]
                if not s:
                    s["momentum_buffer"] = torch.zeros_like(p)
                    s["window"] = torch.zeros_like(p)
                    s["count"] = torch.zeros((), dtype=torch.int64)
                g = p.grad
                p.add_(g, alpha=-lr / every)
                s["window"].add_(g)
                s["count"] += 1
                if int(s["count"]) % every == 0:
                    s["momentum_buffer"].mul_(beta).add_(s["window"], alpha=1 / every)
                    p.add_(s["momentum_buffer"], alpha=-lr * beta)
                    s["window"].zero_()


def local_steps(sync_every: int, dynamic: bool, worker: int, rates: dict[int, float]) -> int:
    """The inner steps of ``worker``'s next update: H (``sync_every``), or with ``dynamic``
    H times its speed (``rates``: inner steps per second so far, by worker; 0: not measured
    yet) over the fastest's, at least 1."""
    if not dynamic or not all(rates.values()):
        return sync_every
    return max(1, round(sync_every * rates[worker] / max(rates.values())))


class AsyncLocalSGD(Algorithm):
    """Asynchronous local SGD with delayed Nesterov and dynamic local updates.

    Args:
        sync_every: inner steps per update of the fastest worker (H).
        lr, momentum: the outer step's (delayed Nesterov's).
        momentum_every: arrivals per momentum step (N).
        max_staleness: updates staler than this are dropped.
        dynamic_steps: scale each worker's inner steps by its measured speed.
    """

    name = "async_local_sgd"
    asynchronous = True  # the engine runs its asynchronous loop (engine/asynchronous.py)

    def __init__(self, sync_every: int, *, lr: float = 0.7, momentum: float = 0.9,
                 momentum_every: int = 1, max_staleness: int = 8, dynamic_steps: bool = True,
                 **kwargs) -> None:
        super().__init__(sync_every, **kwargs)
        if not isinstance(sync_every, int):
            raise ValueError("sync_every must be an int for async_local_sgd (no H schedule)")
        if max_staleness < 0:
            raise ValueError(f"max_staleness ({max_staleness}) must be >= 0")
        self.lr, self.momentum, self.momentum_every = lr, momentum, momentum_every
        self.max_staleness, self.dynamic_steps = max_staleness, dynamic_steps

    def attach(self, worker: Worker) -> None:
        worker.global_params = nn.Parameter(worker.flat_params().clone())
        worker.outer = DelayedNesterov([worker.global_params], lr=self.lr,
                                       momentum=self.momentum, every=self.momentum_every)
        worker.round_start = worker.flat_params().clone()  # where its inner steps started
        worker.pulled = 0  # the updates the global parameters held when it pulled them

    def applied(self, worker: Worker) -> int:
        """Updates applied to ``worker``'s replica of the global parameters so far."""
        s = worker.outer.state.get(worker.global_params)
        return int(s["count"]) if s else 0

    def staleness(self, worker: Worker) -> int:
        """Updates applied since ``worker`` pulled (what its update would be stale by)."""
        return self.applied(worker) - worker.pulled

    def local_steps(self, worker: int, rates: dict[int, float]) -> int:
        """The inner steps of ``worker``'s next update (:func:`local_steps`)."""
        return local_steps(self.sync_every, self.dynamic_steps, worker, rates)

    def contribute(self, worker: Worker, observers: tuple[int, ...] = ()
                   ) -> list[Contribution]:
        return [Contribution(worker.round_start - worker.flat_params(), tag="pseudo-gradient")]

    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        """One posted pseudo-gradient into ``worker``'s replica (every worker applies every
        update, the poster's own included; its inner steps are not touched)."""
        worker.global_params.grad = reduced[0]
        worker.outer.step()
        worker.global_params.grad = None

    @torch.no_grad()
    def restart(self, worker: Worker, settled: bool = True, averaged: int = 1) -> None:
        """The worker pulls: its parameters become the global ones, its next update counts
        from here."""
        worker.load_flat(worker.global_params.detach())
        worker.round_start = worker.flat_params().clone()
        worker.pulled = self.applied(worker)
        worker.samples = 0


@register("algorithm", "async_local_sgd", sections={"outer": OuterConfig})
@dataclass(frozen=True, kw_only=True)
class AsyncLocalSGDConfig(AlgorithmConfig):
    """``[algorithm] name = "async_local_sgd"``: asynchronous local SGD (see
    :mod:`islands.algorithms.asynchronous`); ``outer.lr`` and ``outer.momentum`` set the
    delayed Nesterov step (``outer.optimizer`` must stay ``"sgd"``). Stale updates under
    DiLoCo's outer momentum of 0.9 overshoot: lower it (0.3 trains best on the main job,
    docs/overlap.md).

    Attributes:
        sync_every: inner steps per update of the fastest worker (H).
        max_staleness: an update staler than this many updates is dropped (not sent, not
            applied); its worker pulls the global parameters and starts over.
        momentum_every: arrivals per momentum step (delayed Nesterov's N; 0: the number of
            workers, one momentum step per "round" of arrivals).
        dynamic_steps: inner steps per update proportional to each worker's measured speed
            (false: H for every worker).
    """

    name: str = "async_local_sgd"
    sync_every: int = 50
    max_staleness: int = 8
    momentum_every: int = 0
    dynamic_steps: bool = True

    def __post_init__(self) -> None:
        check(isinstance(self.sync_every, int) and self.sync_every >= 1,
              "algorithm.sync_every", self.sync_every,
              "must be an int >= 1 for async_local_sgd (no H schedule)")
        check(self.max_staleness >= 0, "algorithm.max_staleness", self.max_staleness,
              "must be >= 0 (0: only updates nobody else overtook)")
        check(self.momentum_every >= 0, "algorithm.momentum_every", self.momentum_every,
              "must be >= 0 (0: the number of workers)")

    def build(self, run, aggregator) -> AsyncLocalSGD:
        for i, f in enumerate(run.faults):  # what its loop carries out (sim.faults)
            if f.round is not None:
                raise ConfigError(f"faults[{i}].round ({f.round}): algorithm.name = "
                                  "'async_local_sgd' has no rounds; give the event's virtual "
                                  "time instead (at_s)")
            if f.kind not in ASYNC_FAULTS:
                raise ConfigError(
                    f"faults[{i}] (kind = {f.kind!r}) with algorithm.name = 'async_local_sgd' "
                    f"is not carried out yet ({', '.join(ASYNC_FAULTS)} are): remove it, or "
                    "use a round-based algorithm")
        outer = run.outer
        if outer.optimizer.lower() != "sgd" or outer.kwargs:
            raise ConfigError(f"outer.optimizer ({outer.optimizer!r}) with async_local_sgd "
                              "must be 'sgd' with no outer.kwargs: its outer step is delayed "
                              "Nesterov (set outer.lr and outer.momentum only)")
        if not outer.nesterov and outer.momentum:
            raise ConfigError(f"outer.nesterov (false) with outer.momentum ({outer.momentum}) "
                              "and async_local_sgd: its momentum is Nesterov's; set "
                              "outer.nesterov = true, or outer.momentum = 0")
        if not isinstance(outer.lr, float) or not isinstance(outer.momentum, float):
            raise ConfigError("outer.lr and outer.momentum must be numbers with "
                              "async_local_sgd (there are no rounds to schedule them over)")
        return AsyncLocalSGD(self.sync_every, lr=outer.lr, momentum=outer.momentum,
                             momentum_every=self.momentum_every or run.workers,
                             max_staleness=self.max_staleness,
                             dynamic_steps=self.dynamic_steps, aggregator=aggregator)
