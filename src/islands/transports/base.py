"""The transport interface: one bulk exchange of messages between the workers of a group.

A process drives some workers (the simulator: all of them; the real runtime: one). An
``exchange`` takes every message whose sender is driven here, keyed ``(src, dst)``, and returns
every message whose receiver is driven here. Collectives are built from exchanges, so the same
collective code runs in one process or across machines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from islands.codecs.base import Encoded
from islands.core.timing import Stopwatch


@dataclass
class Message:
    """One payload in flight.

    Attributes:
        payload: the encoded tensor.
        header_bytes: bytes of the collective's own header (shard, length, weight) counted
            on the wire besides ``payload.nbytes``.
        weight: the sender's aggregation weight (travels in the header).
    """

    payload: Encoded
    header_bytes: int
    weight: float = 1.0

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes + self.header_bytes


# place(src, dst, tensor name, dtype, shape) -> where a transport that receives bytes should put
# that payload tensor (a view into the caller's own memory), or None for a fresh tensor.
Place = Callable[[int, int, str, torch.dtype, tuple[int, ...]], "torch.Tensor | None"]


class Transport(ABC):
    """Moves messages between workers and counts every byte it moves.

    Attributes:
        stopwatch: when set (benchmarks), the collectives and the transport add the seconds
            of each activity to it (``encode``, ``decode``, ``reduce``, ``pack``, ``wire``).
    """

    stopwatch: Stopwatch | None = None

    @property
    @abstractmethod
    def local(self) -> tuple[int, ...]:
        """Ids of the workers driven by this process."""

    @abstractmethod
    def sent(self, worker: int) -> int:
        """Bytes a local worker has sent so far (``Message.nbytes``, headers included)."""

    @abstractmethod
    def received(self, worker: int) -> int:
        """Bytes a local worker has received so far."""

    @abstractmethod
    def exchange(self, messages: dict[tuple[int, int], Message], members: tuple[int, ...],
                 phase: str, *, place: Place | None = None,
                 check_finite: bool = True) -> dict[tuple[int, int], Message]:
        """Delivers messages among ``members``.

        Args:
            messages: every message sent by a local worker, keyed ``(src, dst)``; ``src == dst``
                is a local hand-over and costs no bytes. A payload's tensors must stay
                unchanged until the exchange returns.
            members: the workers taking part (all must call, in the real runtime).
            phase: a label for logs and accounting (``"reduce-scatter"``, ``"all-gather"``).
            place: where received tensors may go (a transport that hands messages over in
                memory, as the simulator's, ignores it).
            check_finite: refuse received floating tensors holding NaN/Inf (False: the caller
                checks the decoded values itself). Messages handed over in memory come from
                this process's own encoders, which refuse NaN/Inf, and are not checked again.

        Returns:
            Every message addressed to a local worker, keyed ``(src, dst)``.
        """
