"""The DiLoCo family on one interface: DDP, LocalSGD (FedAvg) and DiLoCo."""

from __future__ import annotations

import torch

from islands.aggregators import AGGREGATORS
from islands.algorithms.base import Aggregator, Algorithm, Contribution, Worker
from islands.algorithms.ddp import DDP
from islands.algorithms.diloco import DiLoCo, nesterov_sgd
from islands.algorithms.local_sgd import LocalSGD
from islands.core.errors import ConfigError


def outer_factory(cfg):
    """Builds the outer optimizer factory from an :class:`~islands.core.config.OuterConfig`."""
    names = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}
    cls = names[cfg.optimizer.lower()]
    kwargs = {"lr": cfg.lr, **cfg.kwargs}
    if cls is torch.optim.SGD:
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    return lambda params: cls(params, **kwargs)


def build_aggregator(cfg) -> Aggregator:
    """The aggregator an :class:`~islands.core.config.AggregatorConfig` names."""
    if cfg.name not in AGGREGATORS:
        raise ConfigError(f"aggregator.name ({cfg.name!r}) must be one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[cfg.name]


def build_algorithm(cfg) -> Algorithm:
    """The algorithm a :class:`~islands.core.config.RunConfig` names."""
    a, agg = cfg.algorithm, build_aggregator(cfg.aggregator)
    if a.name == "ddp":
        return DDP(aggregator=agg)
    if a.name == "local_sgd":
        return LocalSGD(a.sync_every, participation=a.participation, weighting=a.weighting,
                        seed=cfg.seed, aggregator=agg)
    return DiLoCo(a.sync_every, outer=outer_factory(cfg.outer), aggregator=agg)


__all__ = ["Algorithm", "Contribution", "DDP", "DiLoCo", "LocalSGD", "Worker",
           "build_aggregator", "build_algorithm", "nesterov_sgd", "outer_factory"]
