"""The transport interface: one bulk exchange of messages between the workers of a group.

A process drives some workers (the simulator: all of them; the real runtime: one). An
``exchange`` takes every message whose sender is driven here, keyed ``(src, dst)``, and returns
every message whose receiver is driven here. Collectives are built from exchanges, so the same
collective code runs in one process or across machines.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from islands.codecs.base import Encoded
from islands.core import memory
from islands.core.errors import ConfigError
from islands.core.timing import Stopwatch


@dataclass
class Message:
    """One payload in flight.

    Attributes:
        payload: the encoded tensor.
        header_bytes: bytes of the collective's own header (shard, length, weight) counted
            on the wire besides ``payload.nbytes``.
        weight: the sender's aggregation weight (travels in the header).
        claim: ``weight`` is the sender's claim for its own contribution (checked against
            the round's weights by every receiver), not an aggregate's or a state's 1.
        proof: the header as its sender signed it (an open job's real transport:
            :func:`islands.transports.wire.pack_header`), shown as evidence against it.
        sources: what an aggregate was computed from (a verified sync's shard owner): an
            open job's header signs their Merkle roots and weights with the aggregate.
        relay: the sender (of a reduce-scatter row) can send its shard of the all-gather as
            it computes it (:meth:`Transport.start_relay`); the members relay only if every
            member's row says so.
    """

    payload: Encoded
    header_bytes: int
    weight: float = 1.0
    claim: bool = False
    proof: dict | None = None
    sources: Sources | None = None
    relay: bool = False

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes + self.header_bytes


@dataclass(frozen=True)
class Sources:
    """The inputs of a shard's aggregate, as its owner aggregated them: every member's
    phase-1 message, in member order, and the weights the rule was given (None: none). The
    owner signs their Merkle roots with its aggregate, so a verifier holding the same inputs
    can show a third party any 16 KiB of the aggregate that the rule does not give
    (:mod:`islands.runtime.evidence`)."""

    members: tuple[int, ...]
    messages: tuple[Message, ...]
    weights: tuple[float, ...] | None


# place(src, dst, tensor name, dtype, shape) -> where a transport that receives bytes should put
# that payload tensor (a view into the caller's own memory), or None for a fresh tensor.
Place = Callable[[int, int, str, torch.dtype, tuple[int, ...]], "torch.Tensor | None"]


class Exchange:
    """An exchange in flight: the messages addressed to local workers, whose tensors may
    still be arriving (this base class: an exchange already complete, as the simulator's).

    Attributes:
        messages: every message addressed to a local worker, keyed ``(src, dst)``; read a
            tensor's bytes only once :meth:`wait_for` or :meth:`wait` says they arrived.
    """

    def __init__(self, messages: dict[tuple[int, int], Message]) -> None:
        self.messages = messages

    def wait_for(self, key: tuple[int, int], name: str, nbytes: int) -> None:
        """Returns once the first ``nbytes`` bytes of tensor ``name`` of message ``key`` have
        arrived (the rest may still be on the wire), so work on them overlaps the transfer."""

    def wait(self) -> dict[tuple[int, int], Message]:
        """Waits for everything (sends included), checks and counts it; returns
        :attr:`messages`. After an error off the wire, call it still, so no transfer is left
        behind."""
        return self.messages

    def abandon(self) -> None:
        """Gives up on what is still in flight after the wire failed (a timeout, an abort):
        returns at once, keeping the transfers' memory alive until they end."""


class Flight:
    """Work issued in the background (:meth:`Transport.in_background`): :meth:`run` issues
    it, :meth:`settle` waits until it is done and returns its result (raising its error).

    This base class runs the work at once, where it is issued (the simulator's: its clock,
    inside ``in_background``, charges the links and lets the members go on computing).
    """

    def __init__(self, settle: Callable[[], None] | None = None) -> None:
        self._settle = settle
        self._result = self._error = None

    def run(self, work: Callable[[], object]) -> None:
        try:
            self._result = work()
        except Exception as e:  # noqa: BLE001 (raised by settle(), as a thread's would be)
            self._error = e

    def settle(self):
        if self._settle is not None:
            self._settle()
            self._settle = None
        if self._error is not None:
            raise self._error
        return self._result

    def timing(self) -> tuple[float, float] | None:
        """``(seconds the work ran, seconds settle waited for it)`` where they were measured
        (None: the clock that issued it accounts for it itself)."""
        return None


class ThreadedFlight(Flight):
    """Work that runs on a thread of its own while the worker computes (a real transport's
    collective in flight); :meth:`settle` joins it. The work must not share the transport
    with the caller's thread until then (the engine waits for it before any other exchange).
    """

    def __init__(self) -> None:
        super().__init__()
        self._thread: threading.Thread | None = None
        self._ran_s = self._waited_s = 0.0

    def run(self, work: Callable[[], object]) -> None:
        def body() -> None:
            t0 = time.perf_counter()
            try:
                self._result = work()
            except BaseException as e:  # noqa: BLE001 (raised by settle() on the caller)
                self._error = e
            self._ran_s = time.perf_counter() - t0

        self._thread = threading.Thread(target=body, daemon=True, name="sync in flight")
        self._thread.start()

    def settle(self):
        if self._thread is not None:
            t0 = time.perf_counter()
            self._thread.join()
            self._waited_s = time.perf_counter() - t0
            self._thread = None
        return super().settle()

    def timing(self) -> tuple[float, float]:
        return self._ran_s, self._waited_s


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

    def reachable(self, a: int, b: int) -> bool:
        """Whether the link between workers ``a`` and ``b`` is up (the simulator's network
        model cuts links in a partition; a real transport finds out by trying)."""
        return True

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

    def start_exchange(self, messages: dict[tuple[int, int], Message],
                       members: tuple[int, ...], phase: str, *, place: Place | None = None,
                       check_finite: bool = True) -> Exchange:
        """:meth:`exchange`, returning as soon as the messages' headers are known; a transport
        that moves bytes lets the caller work on what has arrived while the rest is on the wire
        (this default: the exchange, complete)."""
        return Exchange(self.exchange(messages, members, phase, place=place,
                                      check_finite=check_finite))

    @contextlib.contextmanager
    def in_background(self) -> Iterator[Flight]:
        """Collectives issued inside cross the wire while their members go on computing; the
        :class:`Flight` yielded settles them (the simulator's clock charges each member only
        the part it waits for). This default: they complete when issued."""
        yield Flight()

    @contextlib.contextmanager
    def pairwise(self) -> Iterator[None]:
        """Exchanges inside are a gossip step: each worker waits only for the workers it
        sends to or receives from, not for every member. This default: nothing to change
        (a real process's exchange already names only its own peers)."""
        yield

    @contextlib.contextmanager
    def posting(self) -> Iterator[None]:
        """Exchanges inside are one-way posts (an asynchronous algorithm's update): the sender
        goes on at once and each receiver waits for it only when it needs it. This default:
        refused (real processes run the synchronous algorithms only for now)."""
        raise ConfigError("asynchronous algorithms (algorithm.name = 'async_local_sgd') run in "
                          "the simulator only for now (islands sim)")
        yield

    def all_reduce_mean(self, tensor: torch.Tensor, members: tuple[int, ...], phase: str
                        ) -> torch.Tensor | None:
        """The plain mean of one local worker's ``tensor`` over ``members`` by the transport's
        own collective (gloo's or NCCL's ``all_reduce``), in place; None where the transport
        has none (the simulator's), and the caller runs the butterfly instead."""
        return None

    def relays(self, device: torch.device) -> bool:
        """Whether :meth:`start_relay` works here for tensors on ``device``."""
        return False

    def start_relay(self, members: tuple[int, ...], phase: str, own: Message,
                    incoming: dict[int, Message]) -> Exchange:
        """An all-gather of lossless shards whose sends start before the local shard is
        computed (the real transport's ``_Relay``, an :class:`Exchange` with ``release``,
        ``finish`` and ``blame``), where :meth:`relays`; the simulator's hands every message
        over at once and has none."""
        raise NotImplementedError(f"{type(self).__name__} has no relay")

    def give_up(self, members: tuple[int, ...], phase: str, reason: str) -> None:
        """Tells the other members at once that this worker sends nothing in ``phase`` (a
        transport whose members wait on each other must; the simulator's, where nobody
        waits, does nothing)."""

    def scratch(self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """A buffer kept under ``key`` from one call to the next (a new one when the shape or
        dtype changes), for memory a collective receives into round after round.

        Fresh memory costs a page fault per page on its first write (on the CPU often more
        than the copy that fills it); a kept buffer costs it once. The cost: the buffers stay
        allocated while the transport lives. The caller must not keep a buffer past its call,
        nor use one key for two collectives in flight at once.
        """
        return memory.kept(self.__dict__.setdefault("_scratch", {}), key, shape, dtype, device)

    def drop_scratch(self) -> None:
        """Forgets every kept buffer. A transport that gives up on transfers still in flight
        calls it: a late peer may yet write into those buffers, which the next collective
        must not be handed (they are freed once the abandoned transfers end)."""
        self.__dict__.pop("_scratch", None)
