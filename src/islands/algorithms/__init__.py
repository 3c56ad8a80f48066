"""The DiLoCo family on one interface: DDP, LocalSGD (FedAvg), DiLoCo, SparseLoCo, Streaming
DiLoCo, asynchronous local SGD, and gossip (decentralized SGD, gossip DiLoCo).

Each algorithm registers its ``[algorithm]`` section beside its code (``DDPConfig``,
``LocalSGDConfig``, ``DiLoCoConfig``); the section builds the algorithm.
"""

from __future__ import annotations

from islands.algorithms.asynchronous import AsyncLocalSGD, AsyncLocalSGDConfig
from islands.algorithms.base import Aggregator, Algorithm, Contribution, Worker
from islands.algorithms.ddp import DDP, DDPConfig
from islands.algorithms.diloco import DiLoCo, DiLoCoConfig, nesterov_sgd
from islands.algorithms.gossip import (
    DSGD,
    DSGDConfig,
    GossipDiLoCo,
    GossipDiLoCoConfig,
    NoLoCoConfig,
)
from islands.algorithms.local_sgd import LocalSGD, LocalSGDConfig
from islands.algorithms.outer import OuterConfig, outer_factory
from islands.algorithms.sparseloco import SparseLoCoConfig
from islands.algorithms.streaming import StreamingDiLoCo, StreamingDiLoCoConfig


def build_aggregator(cfg) -> Aggregator:
    """The aggregator an ``[aggregator]`` section names."""
    return cfg.build()


def build_algorithm(cfg) -> Algorithm:
    """The algorithm a :class:`~islands.core.config.RunConfig` names."""
    return cfg.algorithm.build(cfg, build_aggregator(cfg.aggregator))


def check_algorithm(cfg) -> Algorithm:
    """Builds what the algorithm section names once (refusing settings it would ignore)."""
    return build_algorithm(cfg)


__all__ = ["Algorithm", "AsyncLocalSGD", "AsyncLocalSGDConfig", "Contribution", "DDP",
           "DDPConfig", "DSGD", "DSGDConfig", "DiLoCo", "DiLoCoConfig", "GossipDiLoCo",
           "GossipDiLoCoConfig", "NoLoCoConfig",
           "LocalSGD", "LocalSGDConfig", "OuterConfig", "SparseLoCoConfig", "StreamingDiLoCo",
           "StreamingDiLoCoConfig", "Worker",
           "build_aggregator", "build_algorithm", "check_algorithm", "nesterov_sgd",
           "outer_factory"]
