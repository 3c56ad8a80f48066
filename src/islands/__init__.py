"""islands: train one neural network on many poorly connected, unreliable, uneven machines.

The simulator (``islands.simulate``) runs many workers in one process with a network model and
a virtual clock; the same engine and algorithm objects run across machines in the real runtime
(``islands run``/``launch``), and under the user's own training loop (``islands.join``).
Bring your own model and data as a :class:`~islands.tasks.Task`
(``islands.tasks.from_dataset``).
"""

# every component package registers its config sections on import (islands.core.registry)
from islands import aggregators, algorithms, codecs, tasks  # noqa: F401
from islands.algorithms import DDP, Algorithm, Contribution, DiLoCo, LocalSGD, Worker
from islands.core.config import RunConfig, load_config
from islands.core.errors import (
                                 AuthError,
                                 CodecError,
                                 CommError,
                                 ConfigError,
                                 DataError,
                                 IslandsError,
                                 PeerRefused,
                                 RoundAborted,
)
from islands.engine import inner_optimizer
from islands.sim.runner import simulate
from islands.tasks import ShareSampler, Task, from_dataset, from_loader

__version__ = "0.1.0"

__all__ = ["Algorithm", "AuthError", "CodecError", "CommError", "ConfigError", "Contribution",
           "DDP", "DataError", "DiLoCo", "IslandsError", "LocalSGD", "PeerRefused",
           "RoundAborted",
           "RunConfig", "ShareSampler", "Task", "Worker", "from_dataset", "from_loader",
           "inner_optimizer", "join", "load_config", "simulate", "tasks"]


def __getattr__(name: str):
    # join pulls in torch.distributed and the runtime: load it only when asked for
    if name == "join":
        from islands.runtime.join import join

        return join
    raise AttributeError(f"module 'islands' has no attribute {name!r}")
