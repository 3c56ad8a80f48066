"""islands: train one neural network on many poorly connected, unreliable, uneven machines.

The simulator (``islands.simulate``) runs many workers in one process with a network model and
a virtual clock; the same algorithm objects run across machines in the real runtime.
"""

from islands.algorithms import DDP, Algorithm, DiLoCo, LocalSGD, Worker
from islands.core.config import RunConfig, load_config
from islands.core.errors import (
                                 AuthError,
                                 CodecError,
                                 CommError,
                                 ConfigError,
                                 DataError,
                                 IslandsError,
                                 RoundAborted,
)
from islands.sim.runner import simulate

__version__ = "0.1.0"

__all__ = ["Algorithm", "AuthError", "CodecError", "CommError", "ConfigError", "DDP",
           "DataError", "DiLoCo", "IslandsError", "LocalSGD", "RoundAborted", "RunConfig",
           "Worker", "load_config", "simulate"]
