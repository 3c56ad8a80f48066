"""The points of a sweep: a grid over ``--grid key=v1,v2,...`` values, random draws from
``--random key=lo:hi[:log]`` ranges (seeded), or both (each trial crossed with the grid), and
points listed whole (``--point 'k=v k2=v2'``: a recipe is several keys at once); all
of them, and the ``--baseline`` point, in each cell of ``--by key=v1,v2,...`` values (a
setting the baseline must follow, such as ``workers`` or ``data.corpus``).

Values are TOML, as ``--set`` takes them, so a point may set a list:
``--grid 'algorithm.sync_every=50,[[0,10],[100,25],[200,50]]'`` is two values (commas inside
brackets or quotes do not split).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass

from islands.core.config import parse_overrides
from islands.core.errors import ConfigError


@dataclass(frozen=True)
class Point:
    """One configuration of the sweep (before seeds).

    Attributes:
        sets: the point's ``key=value`` overrides, in flag order (its cell's first).
        name: its folder under the sweep's ``--out`` (readable, unique; ``cell/point``).
        baseline: whether it is its cell's ``--baseline`` point.
        cell: the name of its ``--by`` cell ("" without ``--by``).
        cell_sets: the sets it has from its cell (the start of ``sets``).
    """

    sets: tuple[str, ...]
    name: str
    baseline: bool = False
    cell: str = ""
    cell_sets: tuple[str, ...] = ()

    @property
    def own(self) -> tuple[str, ...]:
        """The sets that are the point's own, not its cell's."""
        return self.sets[len(self.cell_sets):]


def split_values(text: str, seps: str = ",") -> list[str]:
    """Splits ``v1,v2,...`` at ``seps`` outside brackets and quotes."""
    out, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch in seps and depth == 0:
            out.append(current.strip())
            current = ""
            continue
        current += ch
    out.append(current.strip())
    return out


def parse_points(items: list[str]) -> list[Point]:
    """``--point`` items: each a bundle of ``key=value`` sets (separated by spaces or ``;``
    outside brackets), one point; an empty item is the base config."""
    out = []
    for item in items:
        sets = tuple(s for s in split_values(item, " ;") if s)
        try:
            parse_overrides(list(sets))
        except ConfigError:
            raise ConfigError(f"--point {item!r} must be key=value sets separated by spaces, "
                              "e.g. --point 'algorithm.ddp_steps=8 outer.lr=1.0' (or '' for "
                              "the base config)") from None
        out.append(Point(sets, folder_name(sets)))
    return out


def parse_grid(items: list[str], flag: str = "--grid") -> dict[str, list[str]]:
    """``["outer.lr=0.5,0.7"]`` -> ``{"outer.lr": ["0.5", "0.7"]}`` (values as written)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        values = split_values(text) if sep else []
        if not sep or not key.strip() or not all(values):
            raise ConfigError(f"{flag} {item!r} must look like key=v1,v2,... "
                              f"e.g. {flag} outer.lr=0.5,0.7,1.0")
        _once(grid, key.strip(), flag)
        grid[key.strip()] = values
    return grid


@dataclass(frozen=True)
class Range:
    """A ``--random`` range: uniform (or log-uniform) in [lo, hi]; ints when both are."""

    key: str
    lo: float
    hi: float
    log: bool
    integer: bool

    def draw(self, rng: random.Random) -> str:
        lo, hi = (math.log(self.lo), math.log(self.hi)) if self.log else (self.lo, self.hi)
        x = rng.uniform(lo, hi)
        x = math.exp(x) if self.log else x
        if self.integer:
            return str(round(x))
        return f"{float(f'{x:.4g}')!r}"  # 4 significant digits: readable, stable folder names


def parse_random(items: list[str]) -> list[Range]:
    """``["inner.lr=1e-3:1e-2:log"]`` -> ranges (a key once, lo < hi, log needs lo > 0)."""
    ranges, seen = [], {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = text.split(":")
        usage = (f"--random {item!r} must look like key=lo:hi or key=lo:hi:log, "
                 "e.g. --random outer.lr=0.3:1.5 or --random inner.lr=1e-3:1e-2:log")
        if not sep or not key.strip() or len(parts) not in (2, 3) or (
                len(parts) == 3 and parts[2] != "log"):
            raise ConfigError(usage)
        try:
            lo, hi = float(parts[0]), float(parts[1])
        except ValueError:
            raise ConfigError(usage) from None
        if not lo < hi:
            raise ConfigError(f"--random {item!r}: lo ({parts[0]}) must be below hi "
                              f"({parts[1]})")
        if len(parts) == 3 and lo <= 0:
            raise ConfigError(f"--random {item!r}: a log range needs lo > 0 (got {parts[0]})")
        _once(seen, key.strip(), "--random")
        seen[key.strip()] = True
        integer = all(re.fullmatch(r"-?\d+", p.strip()) for p in parts[:2])
        ranges.append(Range(key.strip(), lo, hi, len(parts) == 3, integer))
    return ranges


def _once(seen: dict, key: str, flag: str) -> None:
    if key in seen:
        raise ConfigError(f"{flag} {key}=... is given twice; give each key once "
                          "(all its values in one flag)")


def points(grid: dict[str, list[str]], ranges: list[Range], trials: int,
           search_seed: int) -> list[Point]:
    """The grid's product, crossed with ``trials`` random draws when ranges are given (a
    single point, the base config, when neither is)."""
    both = set(grid) & {r.key for r in ranges}
    if both:
        raise ConfigError(f"{min(both)} is in both --grid and --random; give it once")
    if ranges and trials < 1:
        raise ConfigError(f"--trials ({trials}) must be >= 1 with --random")
    rng = random.Random(search_seed)
    draws = [[f"{r.key}={r.draw(rng)}" for r in ranges] for _ in range(trials)] if ranges \
        else [[]]
    combos = [[f"{k}={v}" for k, v in zip(grid, values)]
              for values in itertools.product(*grid.values())]
    out, seen = [], {}
    for drawn in draws:
        for combo in combos:
            sets = tuple(combo + drawn)
            if sets in seen.values():  # two random draws alike after rounding: one suffices
                continue
            name = folder_name(sets)
            if name in seen:  # values that differ only in characters a folder name drops
                name = f"{name}~{hashlib.sha1(','.join(sets).encode()).hexdigest()[:8]}"
            seen[name] = sets
            out.append(Point(sets, name))
    return out


def baseline_point(items: list[str]) -> Point | None:
    """The ``--baseline`` point (its own ``key=value`` sets, none of the grid's)."""
    if not items:
        return None
    parse_overrides(items)  # the shape key=value, with the --set message
    return Point(tuple(items), "baseline", baseline=True)


def in_cells(by: dict[str, list[str]], points: list[Point], baseline: Point | None
             ) -> list[Point]:
    """Every point (the baseline first) in every ``--by`` cell: the product of the ``--by``
    values, which apply to the baseline too (a DDP baseline per worker count, per corpus)."""
    cells = [tuple(f"{k}={v}" for k, v in zip(by, values))
             for values in itertools.product(*by.values())]
    out = []
    for cell in cells:
        cell_name = folder_name(cell) if cell else ""
        for p in ([baseline] if baseline else []) + points:
            out.append(Point(cell + p.sets, f"{cell_name}/{p.name}" if cell else p.name,
                             p.baseline, cell_name, cell))
    return out


def folder_name(sets: tuple[str, ...]) -> str:
    """A readable folder name for a point: ``outer.lr=0.5,algorithm.sync_every=25``; lists
    written ``0-10_100-25``; past 120 characters cut and made unique by a hash."""
    if not sets:
        return "base"
    parts = []
    for item in sets:
        key, _, value = item.partition("=")
        value = re.sub(r"\],\s*\[", "_", value.strip())
        value = re.sub(r"[\s\[\]'\"]", "", value).replace(",", "-")
        parts.append(f"{key}={re.sub(r'[^A-Za-z0-9._+-]', '', value)}")
    name = ",".join(parts)
    if len(name) > 120:
        name = name[:110] + "~" + hashlib.sha1(",".join(sets).encode()).hexdigest()[:8]
    return name
