"""``islands sweep``: a grid or random search over ``--set`` values, each point run for several
seeds in parallel processes, resumable, ending in one table, ``sweep.json`` and ``sweep.png``.

    islands sweep examples/diloco.toml --grid outer.lr=0.5,0.7,1.0 \\
        --grid algorithm.sync_every=25,50 --seeds 3 --baseline algorithm.name=ddp --out runs/s
    islands sweep examples/diloco.toml --random outer.lr=0.3:1.5 \\
        --random inner.lr=1e-3:1e-2:log --trials 12 --seeds 2

Layout: ``OUT/<point>/seed<k>/`` is an ``islands sim`` run directory (plus ``run.log``);
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
          trials: int = 8, search_seed: int = 0, seeds: int = 1, sets: list[str] = (),
          baseline: list[str] = (), out: str | Path = "runs/sweep", jobs: str | int = "auto",
          console: Console, progress: bool = True, dry_run: bool = False) -> list[dict]:
    """Plans, runs (what is not finished) and reports a sweep; returns the points' rows.

    Args:
        config: the base TOML config (None: the defaults).
        grid: ``key=v1,v2,...`` items.
        random: ``key=lo:hi[:log]`` items, drawn ``trials`` times from ``search_seed``.
        seeds: runs per point, seeds counting up from the config's ``seed``.
        sets: ``key=value`` overrides for every run.
        baseline: ``key=value`` sets of an extra point compared with every other
            (``algorithm.name=ddp``), run over the same seeds.
        out: the sweep's folder.
        jobs: processes at once (``"auto"``: the cores divided by each run's threads).
        dry_run: print the plan, run nothing.

    Raises:
        ConfigError: a malformed flag, a bad value (naming its flag), or a finished run
            directory of another config.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds ({seeds}) must be >= 1")
    parsed_grid, ranges = space.parse_grid(list(grid)), space.parse_random(list(random))
    for key in [*parsed_grid, *(r.key for r in ranges)]:
        if key == "seed":
            raise ConfigError("--grid/--random seed=...: seeds come from --seeds N (each "
                              "point runs seeds config.seed .. config.seed + N - 1)")
    points = space.points(parsed_grid, ranges, trials, search_seed)
    base_point = space.baseline_point(list(baseline))
    if base_point is not None:
        points = [base_point, *points]
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
    rows = report.point_rows(runs)
    report.render(rows, console, title=f"sweep: {out} ({seeds} seed(s) per point)")
    report.write(rows, runs, out, {
        "config": config, "sets": list(sets), "grid": list(grid), "random": list(random),
        "trials": trials if random else None, "search_seed": search_seed if random else None,
        "seeds": seeds, "baseline": list(baseline)})
    _say_best(rows, runs, out, console)
    return rows


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
    best = next((r for r in rows if r["best"]), None)
    if best is not None:
        console.print(f"best: {best['point']} (" + ", ".join(best["sets"]) + ")")
    if failed:
        console.print(f"{len(failed)} run(s) failed (their run.log says why); run the same "
                      "command again to retry them")
    console.print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")


__all__ = ["sweep"]
