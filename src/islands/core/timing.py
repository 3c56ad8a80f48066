"""Where a collective's time goes: wall seconds per activity, summed over calls.

A transport's ``stopwatch`` is ``None`` unless a benchmark sets one
(``benchmarks/collective.py``); the collective then times each activity it runs (encoding,
decoding, the reduction, serialization, waiting on the wire). Off, a timed section costs one
``nullcontext`` per shard or message, never per value.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Stopwatch:
    """Accumulates wall seconds per activity name.

    Attributes:
        seconds: ``{activity: seconds}`` since the last :meth:`reset`.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, activity: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(activity, time.perf_counter() - start)

    def add(self, activity: str, seconds: float) -> None:
        self.seconds[activity] = self.seconds.get(activity, 0.0) + seconds

    def reset(self) -> None:
        self.seconds = {}


def timed(stopwatch: Stopwatch | None, activity: str) -> contextlib.AbstractContextManager:
    """``stopwatch(activity)``, or a context that times nothing when ``stopwatch`` is None."""
    return contextlib.nullcontext() if stopwatch is None else stopwatch(activity)
