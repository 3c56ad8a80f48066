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

from islands.algorithms.base import Algorithm, Worker
from islands.collectives.butterfly import Group

OuterFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def nesterov_sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """DiLoCo's outer optimizer: SGD, lr 0.7, momentum 0.9, Nesterov."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


class DiLoCo(Algorithm):
    """Inner steps locally, outer optimizer on the averaged pseudo-gradient.

    Args:
        sync_every: inner steps per round (H).
        outer: builds the outer optimizer from the (single, flat) global parameter.
    """

    name = "diloco"

    def __init__(self, sync_every: int, *, outer: OuterFactory = nesterov_sgd) -> None:
        super().__init__(sync_every)
        self.outer_factory = outer

    def attach(self, worker: Worker) -> None:
        worker.global_params = nn.Parameter(worker.flat_params().clone())
        worker.outer = self.outer_factory([worker.global_params])

    def sync(self, group: Group, workers: list[Worker], round: int,
             observers: tuple[int, ...] = ()) -> None:
        deltas = {w.id: w.global_params.detach() - w.flat_params() for w in workers}
        # with observers every member weighs (0 or 1), so all aggregate alike
        weights = {w.id: float(w.id not in observers) for w in workers} if observers else None
        avg = group.all_reduce(deltas, codecs={w.id: w.codec for w in workers},
                               weights=weights, tag="pseudo-gradient")
        for w in workers:
            w.global_params.grad = avg[w.id]
            w.outer.step()
            w.outer.zero_grad(set_to_none=True)
            w.load_flat(w.global_params.detach())
            w.samples = 0

    def can_observe(self) -> bool:
        return True

    def shared_state(self, worker: Worker) -> dict[str, torch.Tensor]:
        state = {"global_params": self.global_state(worker)}
        for k, v in sorted(worker.outer.state[worker.global_params].items()):
            if torch.is_tensor(v):
                state[f"outer/{k}"] = v
        return state
