"""Transports move encoded payloads between workers: ``sim`` (one process, virtual clock) and,
in the real runtime, ``dist`` (torch.distributed). Only this package imports torch.distributed."""

from islands.transports.base import Message, Transport
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock

__all__ = ["Message", "Transport", "SimTransport", "NetworkModel", "VirtualClock"]
