"""Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication"):
DiLoCo whose parameters are cut into ``fragments`` synced at staggered times, so each sync
carries one fragment and the peak bandwidth drops by the number of fragments.

Rounds last ``H / fragments`` inner steps; round ``r`` syncs fragment ``r mod fragments``, so
every fragment is synced every ``H`` steps, each at its own offset. A fragment's sync is
DiLoCo's: the pseudo-gradient ``Δ_p = θ_p − θ_{i,p}`` of the fragment's global parameters
``θ_p`` against the worker's, averaged (through the worker's codec: low-precision fragments),
then an outer optimizer step of ``θ_p`` (one outer optimizer per fragment, from ``[outer]``).
The average crosses the wire while the worker trains on for ``tau`` inner steps; when it lands,
the worker's fragment is mixed with the new global one:
``θ_{i,p} ← α θ_{i,p} + (1 − α) θ_p`` (``alpha``), keeping part of the ``tau`` steps' local
progress the new global state has not seen. ``fragments = 1, tau = 0, alpha = 0`` is DiLoCo.

Fragments are contiguous ranges of the flat parameter vector, equal in size (consecutive
layers, the paper's "sequential" fragments; a tensor may straddle two), so each sync carries
``1/fragments`` of the parameters, to one element. The global state is every fragment's
``θ_p`` as of its last sync: the run's result (evaluation, ``final.safetensors``) is that
state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from islands.algorithms.base import Algorithm, Contribution, Worker, load_buffers
from islands.algorithms.diloco import OuterFactory, nesterov_sgd
from islands.algorithms.outer import OuterConfig, outer_factory
from islands.core.registry import register
from islands.core.sections import AlgorithmConfig, check
from islands.core.shards import shard_bounds


def fragment_bounds(numel: int, fragments: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: ``fragments`` contiguous ranges of the flat parameter vector,
    equal in size to one element (the model's order: consecutive layers)."""
    if not 1 <= fragments <= numel:
        raise ValueError(f"fragments ({fragments}) must be in [1, the model's trainable "
                         f"parameters ({numel})]")
    return shard_bounds(numel, fragments)


class StreamingDiLoCo(Algorithm):
    """DiLoCo over staggered fragments, each sync overlapped with ``tau`` inner steps.

    Args:
        sync_every: inner steps between two syncs of one fragment (H); a multiple of
            ``fragments``.
        fragments: how many fragments the parameters are cut into.
        tau: inner steps a fragment's average may take to land (0: it is waited for at
            once); at most ``sync_every / fragments``.
        alpha: the share of the worker's own fragment kept when the average lands.
        outer: builds each fragment's outer optimizer.
    """

    name = "streaming_diloco"
    overlaps = True

    def __init__(self, sync_every: int, *, fragments: int = 4, tau: int = 1,
                 alpha: float = 0.5, outer: OuterFactory = nesterov_sgd, **kwargs) -> None:
        if not isinstance(sync_every, int) or sync_every % fragments:
            raise ValueError(f"sync_every ({sync_every}) must be an int multiple of fragments "
                             f"({fragments})")
        super().__init__(sync_every // fragments, **kwargs)
        if not 0 <= tau <= sync_every // fragments:
            raise ValueError(f"tau ({tau}) must be in [0, sync_every / fragments = "
                             f"{sync_every // fragments}]")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha ({alpha}) must be in [0, 1]")
        self.period, self.fragments, self.alpha = sync_every, fragments, alpha
        self.overlap_steps = tau
        self.outer_factory = outer

    def attach(self, worker: Worker) -> None:
        flat = worker.flat_params()
        worker.bounds = fragment_bounds(flat.numel(), self.fragments)
        worker.fragment_params = [nn.Parameter(flat[a:b].clone()) for a, b in worker.bounds]
        worker.fragment_outer = [self.outer_factory([p]) for p in worker.fragment_params]
        worker.in_flight = None  # the fragment whose average is on the wire

    def fragment_of(self, worker: Worker) -> int:
        """The fragment the round that just ended syncs (from the steps taken)."""
        return (worker.steps // self.sync_every - 1) % self.fragments

    def contribute(self, worker: Worker, observers: tuple[int, ...] = ()
                   ) -> list[Contribution]:
        p = worker.in_flight = self.fragment_of(worker)
        a, b = worker.bounds[p]
        delta = worker.fragment_params[p].detach() - worker.flat_params()[a:b]
        return [Contribution(delta, tag=f"fragment-{p}")]

    @torch.no_grad()
    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        p, (a, b) = worker.in_flight, worker.bounds[worker.in_flight]
        theta = worker.fragment_params[p]
        theta.grad = reduced[0]
        worker.fragment_outer[p].step()
        theta.grad = None
        flat = worker.flat_params()
        flat[a:b] = self.alpha * flat[a:b] + (1 - self.alpha) * theta.detach()
        worker.load_flat(flat)
        worker.in_flight = None

    def adopt_in_flight(self, joiner: Worker, member: Worker) -> None:
        joiner.in_flight = member.in_flight  # the fragment whose average it will apply

    def restart(self, worker: Worker, settled: bool, averaged: int = 1) -> None:
        """The worker trains on from its own parameters (the landing mixes them)."""
        worker.samples = 0

    def global_state(self, worker: Worker) -> torch.Tensor:
        return torch.cat([p.detach() for p in worker.fragment_params])

    @torch.no_grad()
    def load_shared_state(self, worker: Worker, state: dict[str, torch.Tensor], *,
                          reset_params: bool = True) -> None:
        flat = state["global_params"]
        load_buffers(worker, state, reset_params)
        for i, ((a, b), p, opt) in enumerate(zip(worker.bounds, worker.fragment_params,
                                                  worker.fragment_outer)):
            p.copy_(flat[a:b])
            slot = opt.state[p]
            slot.clear()
            prefix = f"outer/{i}/"
            slot.update({k[len(prefix):]: v.detach().clone() for k, v in state.items()
                         if k.startswith(prefix)})
        if reset_params:
            worker.load_flat(flat)
        worker.in_flight = None

    def shared_state(self, worker: Worker) -> dict[str, torch.Tensor]:
        state = super().shared_state(worker)
        for i, (p, opt) in enumerate(zip(worker.fragment_params, worker.fragment_outer)):
            for k, v in sorted(opt.state[p].items()):
                if torch.is_tensor(v):
                    state[f"outer/{i}/{k}"] = v
        return state


@register("algorithm", "streaming_diloco", sections={"outer": OuterConfig})
@dataclass(frozen=True, kw_only=True)
class StreamingDiLoCoConfig(AlgorithmConfig):
    """``[algorithm] name = "streaming_diloco"``; each fragment's outer optimizer is
    ``[outer]`` (a constant lr and momentum: no schedules).

    Attributes:
        sync_every: inner steps between two syncs of one fragment (H), a multiple of
            ``fragments``; a round (one fragment's sync) lasts ``sync_every / fragments``.
        fragments: how many fragments the parameters are cut into (peak bytes per sync:
            about ``1 / fragments`` of DiLoCo's).
        tau: inner steps a fragment's average has to land while the worker trains on (0:
            waited for at once); at most ``sync_every / fragments``.
        alpha: share of the worker's own fragment kept when the average lands (0: replaced
            by the global fragment, as DiLoCo).
    """

    name: str = "streaming_diloco"
    sync_every: int = 50
    fragments: int = 5
    tau: int = 5
    alpha: float = 0.5

    def __post_init__(self) -> None:
        check(isinstance(self.sync_every, int) and self.sync_every >= 1,
              "algorithm.sync_every", self.sync_every, "must be an int >= 1 (no H schedule)")
        check(isinstance(self.fragments, int) and self.fragments >= 1, "algorithm.fragments",
              self.fragments, "must be an int >= 1")
        check(self.sync_every % self.fragments == 0, "algorithm.sync_every", self.sync_every,
              f"must be a multiple of algorithm.fragments ({self.fragments})")
        period = self.sync_every // self.fragments
        check(isinstance(self.tau, int) and 0 <= self.tau <= period, "algorithm.tau", self.tau,
              f"must be an int in [0, sync_every / fragments = {period}]")
        check(0.0 <= self.alpha <= 1.0, "algorithm.alpha", self.alpha, "must be in [0, 1]")

    def build(self, run, aggregator) -> StreamingDiLoCo:
        for key in ("lr", "momentum"):
            value = getattr(run.outer, key)
            check(not isinstance(value, tuple), f"outer.{key}", value,
                  "must be a number for streaming_diloco (no schedule)")
        return StreamingDiLoCo(self.sync_every, fragments=self.fragments, tau=self.tau,
                               alpha=self.alpha, outer=outer_factory(run.outer),
                               aggregator=aggregator)
