"""``islands status --watch``: a coordinator's state, refreshed, with stuck rounds flagged.

    islands status --coordinator HOST:PORT --watch [--interval 1] [--stuck 5]

Each refresh shows the members (and who is live), the epoch, the round in flight and for how
long, the last commit, the median round time, excluded members with who refused them and why,
refused joins, and hash mismatches (an asynchronous job: its updates numbered and dropped,
the inner steps left to hand out and those in progress, in place of a round). A round in
flight for longer than ``stuck`` times the median round is flagged STUCK.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table


def is_stuck(status: dict, factor: float) -> bool:
    """Whether the round in flight has taken longer than ``factor`` times the median round."""
    age, median = status.get("round_in_flight_s"), status.get("median_round_s")
    return age is not None and median is not None and median > 0 and age > factor * median


def render(status: dict, factor: float) -> Table:
    """One refresh as a two-column table."""
    t = Table(title=f"coordinator {status['instance']}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    live = set(status["live"])
    t.add_row("members", ", ".join(f"{m}" + ("" if m in live else " (gone)")
                                   for m in status["members"]) or "—")
    t.add_row("epoch", str(status["epoch"]))
    f, age = status.get("round_in_flight"), status.get("round_in_flight_s")
    flight = "—" if f is None else f"round {f} for {age:.1f} s"
    if is_stuck(status, factor):
        flight += f"  [bold red]STUCK[/] (> {factor:g} x the median round)"
    t.add_row("in flight", flight)
    if (a := status.get("async")) is not None:  # an asynchronous job: updates, no rounds
        busy = ", ".join(f"{w}: {n}" for w, n in a["in_progress"].items()) or "—"
        t.add_row("updates", f"{a['updates']} numbered, {a['dropped']} dropped as too stale; "
                             f"{a['steps_left']} inner steps to hand out; computing {busy}")
    last = status.get("last_commit_unix")
    t.add_row("last commit", "—" if last is None else
              f"round {status['last_round']}, {time.time() - last:.1f} s ago")
    med = status.get("median_round_s")
    t.add_row("median round", "—" if med is None else f"{med:.2f} s")
    excluded = status.get("excluded") or {}
    t.add_row("excluded", "\n".join(f"{w}: by worker {e['by']} at round {e['round']}: {e['why']}"
                                    for w, e in excluded.items()) or "—")
    refused = status.get("refused_joins") or []
    t.add_row("refused joins", "\n".join(f"{r['worker']}: {r['why']}" for r in refused[-3:])
              or "—")
    t.add_row("hash mismatches", str(status.get("hash_mismatches", 0)))
    return t


def watch(fetch, *, interval_s: float = 1.0, factor: float = 5.0, count: int | None = None,
          console: Console | None = None) -> None:
    """Prints ``fetch()`` rendered every ``interval_s`` (``count`` times, or until Ctrl-C)."""
    console = console or Console()
    n = 0
    while count is None or n < count:
        console.print(render(fetch(), factor))
        n += 1
        if count is None or n < count:
            time.sleep(interval_s)
