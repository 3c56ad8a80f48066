"""``islands sweep``: a grid or random search over ``--set`` values, each point run for several
seeds in parallel processes, resumable, ending in one table, ``sweep.json`` and ``sweep.png``.

    islands sweep examples/diloco.toml --grid outer.lr=0.5,0.7,1.0 \\
        --grid algorithm.sync_every=25,50 --seeds 3 --baseline algorithm.name=ddp --out runs/s
    islands sweep examples/diloco.toml --random outer.lr=0.3:1.5 \\
        --random inner.lr=1e-3:1e-2:log --trials 12 --seeds 2
    islands sweep --grid outer.lr=0.7,1.0 --by workers=4,8 --baseline algorithm.name=ddp

Layout: ``OUT/[<cell>/]<point>/seed<k>/`` is an ``islands sim`` run directory (plus ``run.log``);
``OUT/sweep.json`` and ``OUT/sweep.png`` summarize. Run the same command again and the
finished runs are skipped, so a sweep interrupted (Ctrl-C, a reboot) or widened (a value
added) costs only what is new.

Why a hand-written search and not Optuna: the sweeps behind islands' recipes must be
reproducible by one command and read as claims (a mean ± std over seeds for each point of a
grid), and a run is a process that can crash. A grid and seeded random draws are fixed before
anything runs, so the same command gives the same runs on any machine with any ``--jobs``;
the finished-run check is the run directory itself. Optuna's samplers (TPE) decide each
trial from the ones finished so far, so with parallel processes the points depend on which run
finished first; repeating a point over seeds, resuming, and parallel processes would need its
RDB storage beside the run directories; and it would add a dependency (SQLAlchemy, Alembic)
for what ``itertools.product`` and ``random.Random`` do here. At the budgets these sweeps have
(tens of runs over three or four knobs) TPE's model barely starts (its first ten trials are
random). Optuna stays the right tool for a large adaptive search; a user can drive
``islands.simulate`` from an Optuna objective directly.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from islands.core.config import load_config
from islands.core.errors import ConfigError
from islands.sweep import report, runner, space
from islands.sweep.runner import Run, auto_jobs


def sweep(config: str | None, *, grid: list[str] = (), random: list[str] = (),
          point: list[str] = (), min_traffic: float | None = None,
          trials: int = 8, search_seed: int = 0, seeds: int = 1, sets: list[str] = (),
          baseline: list[str] = (), by: list[str] = (), out: str | Path = "runs/sweep",
          jobs: str | int = "auto",
          console: Console, progress: bool = True, dry_run: bool = False) -> list[dict]:
    """Plans, runs (what is not finished) and reports a sweep; returns the points' rows.

    Args:
        config: the base TOML config (None: the defaults).
        grid: ``key=v1,v2,...`` items.
        random: ``key=lo:hi[:log]`` items, drawn ``trials`` times from ``search_seed``.
        point: points listed whole, each ``"k=v k2=v2"`` ("" : the base config).
        min_traffic: only points sending at most 1/``min_traffic`` of the baseline's bytes
            per worker may be the best (a budget such as 25x less than DDP).
        seeds: runs per point, seeds counting up from the config's ``seed``.
        sets: ``key=value`` overrides for every run.
        baseline: ``key=value`` sets of an extra point compared with every other
            (``algorithm.name=ddp``), run over the same seeds.
        by: ``key=v1,v2,...`` items: the whole sweep, baseline included, runs in each cell
            of their product; comparisons and the best point are per cell.
        out: the sweep's folder.
        jobs: processes at once (``"auto"``: the cores divided by each run's threads).
        dry_run: print the plan, run nothing.

    Raises:
        ConfigError: a malformed flag, a bad value (naming its flag), or a finished run
            directory of another config.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds ({seeds}) must be >= 1")
    if min_traffic is not None and not baseline:
        raise ConfigError(f"--min-traffic ({min_traffic}) compares with the baseline: give "
                          "--baseline too (e.g. --baseline algorithm.name=ddp)")
    points = all_points(list(grid), list(random), list(point), trials, search_seed,
                        list(baseline), list(by))
    out = Path(out)
    runs = runner.plan(config, list(sets), points, seeds, out)
    n_jobs = _jobs(jobs, config, list(sets))
    todo = sum(r.status == "todo" for r in runs)
    console.print(f"sweep: {len(points)} point(s) x {seeds} seed(s) = {len(runs)} runs "
                  f"({todo} to run, {n_jobs} at a time) into {out}/")
    if dry_run:
        for run in runs:
            console.print(f"{run.status:8} {run.dir}", highlight=False)
        return []
    runner.execute(runs, n_jobs, console, progress)
    rows = report.point_rows(runs, min_traffic)
    report.render(rows, console, title=f"sweep: {out} ({seeds} seed(s) per point)")
    report.write(rows, runs, out, {
        "config": config, "sets": list(sets), "grid": list(grid), "random": list(random),
        "trials": trials if random else None, "search_seed": search_seed if random else None,
        "seeds": seeds, "baseline": list(baseline), "by": list(by), "point": list(point),
        "min_traffic": min_traffic})
    _say_best(rows, runs, out, console)
    return rows


def all_points(grid: list[str], random: list[str], point: list[str], trials: int,
               search_seed: int, baseline: list[str], by: list[str]) -> list[space.Point]:
    """Every point of the sweep (the flags' meaning is :func:`sweep`'s), each key given once
    and never ``seed``."""
    parsed_grid, ranges = space.parse_grid(grid), space.parse_random(random)
    cells = space.parse_grid(by, flag="--by")
    keys = [*cells, *parsed_grid, *(r.key for r in ranges)]
    if "seed" in keys:
        raise ConfigError("--grid/--random/--by seed=...: seeds come from --seeds N (each "
                          "point runs seeds config.seed .. config.seed + N - 1)")
    twice = next((k for k in cells if k in keys[len(cells):]), None)
    if twice:
        raise ConfigError(f"{twice} is in --by and in --grid/--random; give it once")
    listed = space.parse_points(point)
    searched = (space.points(parsed_grid, ranges, trials, search_seed)
                if parsed_grid or ranges or not listed else [])
    names = [p.name for p in searched + listed]
    if len(set(names)) < len(names):
        raise ConfigError(f"--point {next(n for n in names if names.count(n) > 1)!r} is also "
                          "a point of the grid (or listed twice); give it once")
    return space.in_cells(cells, searched + listed, space.baseline_point(baseline))


def _jobs(jobs: str | int, config: str | None, sets: list[str]) -> int:
    if jobs == "auto":
        return auto_jobs(load_config(config, sets))
    try:
        n = int(jobs)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--jobs ({jobs!r}) must be 'auto' or a number >= 1")
    return n


def _say_best(rows: list[dict], runs: list[Run], out: Path, console: Console) -> None:
    failed = [r for r in runs if r.status == "failed"]
    for best in (r for r in rows if r["best"]):
        cell = f" in {best['cell']}" if best["cell"] else ""
        console.print(f"best{cell}: {report.label(best).removeprefix('★ ')}",
                      highlight=False)
    if failed:
        console.print(f"{len(failed)} run(s) failed (their run.log says why); run the same "
                      "command again to retry them")
    console.print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")


__all__ = ["sweep"]
