"""The DiLoCo family on one interface: DDP, LocalSGD (FedAvg) and DiLoCo."""

from __future__ import annotations

import torch

from islands.aggregators import AGGREGATORS
from islands.algorithms.base import Aggregator, Algorithm, Contribution, Worker
from islands.algorithms.ddp import DDP
from islands.algorithms.diloco import DiLoCo, nesterov_sgd
from islands.algorithms.local_sgd import LocalSGD
from islands.algorithms.schedule import largest, outer_schedule, value_at
from islands.core.errors import ConfigError


def outer_factory(cfg):
    """Builds the outer optimizer factory from an :class:`~islands.core.config.OuterConfig`.

    Raises:
        ConfigError: a setting the chosen optimizer would ignore (``momentum`` or
            ``nesterov`` with anything but SGD) or refuse (a keyword in ``outer.kwargs``).
    """
    names = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}
    cls = names[cfg.optimizer.lower()]
    # a schedule's first value builds the optimizer (DiLoCo rewrites it before each outer
    # step); a momentum ramp from 0 builds with its largest, as Nesterov needs momentum > 0
    kwargs = {"lr": value_at(cfg.lr, 0), **cfg.kwargs}
    if cls is torch.optim.SGD:
        kwargs.update(momentum=largest(cfg.momentum), nesterov=cfg.nesterov)
    else:
        defaults = type(cfg)()
        for key in ("momentum", "nesterov"):
            if getattr(cfg, key) != getattr(defaults, key):
                raise ConfigError(
                    f"outer.{key} ({getattr(cfg, key)!r}) is used by outer.optimizer = 'sgd' "
                    f"only; {cls.__name__} would ignore it. Remove it, or give {cls.__name__}'s "
                    "own settings in [outer.kwargs] (e.g. betas = [0.9, 0.95] for adam)")
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"outer.kwargs ({dict(cfg.kwargs)}) are refused by "
                          f"torch.optim.{cls.__name__}: {e}") from None
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
    return DiLoCo(a.sync_every, outer=outer_factory(cfg.outer), aggregator=agg,
                  ddp_steps=a.ddp_steps,
                  outer_schedule=outer_schedule(lr=cfg.outer.lr, momentum=cfg.outer.momentum))


def check_algorithm(cfg) -> None:
    """Builds what the algorithm section names once (refusing settings it would ignore)."""
    build_aggregator(cfg.aggregator)
    if cfg.algorithm.name == "diloco":
        outer_factory(cfg.outer)


__all__ = ["Algorithm", "Contribution", "DDP", "DiLoCo", "LocalSGD", "Worker",
           "build_aggregator", "build_algorithm", "check_algorithm", "nesterov_sgd", "outer_factory"]
