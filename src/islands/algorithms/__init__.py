"""The DiLoCo family on one interface: DDP, LocalSGD (FedAvg) and DiLoCo."""

from __future__ import annotations

import torch

from islands.algorithms.base import Algorithm, Worker
from islands.algorithms.ddp import DDP
from islands.algorithms.diloco import DiLoCo, nesterov_sgd
from islands.algorithms.local_sgd import LocalSGD


def outer_factory(cfg):
    """Builds the outer optimizer factory from an :class:`~islands.core.config.OuterConfig`."""
    names = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}
    cls = names[cfg.optimizer.lower()]
    kwargs = {"lr": cfg.lr, **cfg.kwargs}
    if cls is torch.optim.SGD:
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    return lambda params: cls(params, **kwargs)


def build_algorithm(cfg) -> Algorithm:
    """The algorithm a :class:`~islands.core.config.RunConfig` names."""
    a = cfg.algorithm
    if a.name == "ddp":
        return DDP()
    if a.name == "local_sgd":
        return LocalSGD(a.sync_every, participation=a.participation, weighting=a.weighting,
                        seed=cfg.seed)
    return DiLoCo(a.sync_every, outer=outer_factory(cfg.outer))


__all__ = ["Algorithm", "Worker", "DDP", "DiLoCo", "LocalSGD", "build_algorithm",
           "nesterov_sgd", "outer_factory"]
