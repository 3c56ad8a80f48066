"""The simulator's fault plan (``[[faults]]``) carried out on real drop-in worker processes:
a crash is a SIGKILL inside its round, a leave a SIGTERM inside its round (the worker ends
cleanly, contributing nothing to it), a join a fresh process healing into its round.

Every worker holds inside the first step of each round an event names (the drop-in test
worker's ``--hold``), so an event lands in its round however loaded the machine: a crash at
round r kills the worker while all hold in round r, then releases them (the round commits
without it, as in the simulator); a join at round r restarts the worker while the others hold
in round r, waits until the coordinator has it healing into that round, then releases them.
Only ``crash``, ``leave`` and ``join`` at a ``round`` are carried out so
(:func:`carry_out`). ``islands launch`` carries out a whole plan (events at a time, ``slow``
and ``link`` too: :class:`islands.runtime.launch.FaultRunner`) without holding the workers,
so its events land a little into their rounds.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import last_round, wait_until


def hold_args(faults, tmp: Path) -> list[str]:
    """The ``--hold`` options every worker starts with: one per round an event names."""
    out = []
    for r in sorted({f.round for f in faults}):
        out += ["--hold", f"{r}:{tmp / f'go-{r}'}"]
    return out


def carry_out(faults, coord, out: Path, workers: dict, start: Callable[[int], object],
              tmp: Path) -> None:
    """Runs the plan's events in round order on ``workers`` ({id: process}), restarting a
    joiner with ``start(id)``; returns when the last event's round is released."""
    for f in faults:
        if f.kind not in ("crash", "leave", "join") or f.round is None:
            raise ValueError(f"the real-process plan carries out crash, leave and join at a "
                             f"round only, not {f}")
    for r in sorted({f.round for f in faults}):
        here = [f for f in faults if f.round == r]
        alive = [w for w in workers if w not in {f.worker for f in here if f.kind == "join"}]
        # everyone alive holds inside round r: it is in flight at the coordinator
        wait_until(lambda: coord.status()["round_in_flight"] == r
                   and all(last_round(out / f"w{w}") >= r - 1 for w in alive
                           if workers[w].poll() is None), 120, f"round {r} in flight")
        for f in here:
            if f.kind == "crash":
                workers[f.worker].send_signal(signal.SIGKILL)
                assert workers[f.worker].wait() == -signal.SIGKILL
                (out / f"w{f.worker}").rename(out / f"w{f.worker}-crashed-{r}")
                wait_until(lambda: f.worker not in coord.status()["live"], 30,
                           f"worker {f.worker} dropped")
            elif f.kind == "leave":  # its loop ends while held: it leaves before the sync
                workers[f.worker].send_signal(signal.SIGTERM)
                assert workers[f.worker].wait(timeout=60) == 0, f"worker {f.worker} leaving"
                wait_until(lambda: f.worker not in coord.status()["live"], 30,
                           f"worker {f.worker} gone")
            else:
                workers[f.worker] = start(f.worker)
                wait_until(lambda: f.worker in coord.status()["healing"], 120,
                           f"worker {f.worker} healing into round {r}")
        (tmp / f"go-{r}").touch()

