"""Transports move encoded payloads between workers: ``sim`` (one process, virtual clock) and,
in the real runtime, ``dist`` (torch.distributed). Only this package imports torch.distributed."""

from islands.transports.base import Message, Transport
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock

__all__ = ["Message", "Transport", "SimTransport", "NetworkModel", "VirtualClock",
           "DistTransport"]


def __getattr__(name: str):
    # DistTransport pulls in torch.distributed: load it only when asked for.
    if name == "DistTransport":
        from islands.transports.dist import DistTransport

        return DistTransport
    raise AttributeError(f"module 'islands.transports' has no attribute {name!r}")
