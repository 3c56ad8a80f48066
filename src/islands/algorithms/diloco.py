"""DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models"): each worker runs H inner steps with its own optimizer (AdamW; state kept
per worker, never synchronized), then the pseudo-gradients ``Δ_i = θ − θ_i`` are averaged and
an outer optimizer (Nesterov SGD, lr 0.7, momentum 0.9) applies ``mean Δ`` to the global
parameters ``θ``, from which every worker restarts.

As in torchft's ``local_sgd.DiLoCo``, the outer optimizer is any ``torch.optim`` optimizer fed
the pseudo-gradient through ``.grad``; each worker holds its own identical copy of ``θ`` and of
the outer optimizer state, so any worker can hand the state to a joiner.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from islands.algorithms.base import Algorithm, Contribution, Worker

OuterFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def nesterov_sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """DiLoCo's outer optimizer: SGD, lr 0.7, momentum 0.9, Nesterov."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


class DiLoCo(Algorithm):
    """Inner steps locally, outer optimizer on the averaged pseudo-gradient.

    Args:
        sync_every: inner steps per round (H).
        outer: builds the outer optimizer from the (single, flat) global parameter.
        aggregator: combines each shard's pseudo-gradients (default: the mean).
    """

    name = "diloco"

    def __init__(self, sync_every: int, *, outer: OuterFactory = nesterov_sgd, **kwargs) -> None:
        super().__init__(sync_every, **kwargs)
        self.outer_factory = outer

    def attach(self, worker: Worker) -> None:
        worker.global_params = nn.Parameter(worker.flat_params().clone())
        worker.outer = self.outer_factory([worker.global_params])

    def contribute(self, worker: Worker, observers: tuple[int, ...] = ()
                   ) -> list[Contribution]:
        # with observers every member weighs (0 or 1), so all aggregate alike
        weight = float(worker.id not in observers) if observers else None
        delta = worker.global_params.detach() - worker.flat_params()
        return [Contribution(delta, weight, tag="pseudo-gradient")]

    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        worker.global_params.grad = reduced[0]
        worker.outer.step()
        worker.outer.zero_grad(set_to_none=True)
        worker.load_flat(worker.global_params.detach())
        worker.samples = 0

    def can_observe(self) -> bool:
        return True

    def shared_state(self, worker: Worker) -> dict[str, torch.Tensor]:
        state = super().shared_state(worker)
        for k, v in sorted(worker.outer.state[worker.global_params].items()):
            if torch.is_tensor(v):
                state[f"outer/{k}"] = v
        return state
