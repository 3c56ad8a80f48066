"""Running a sweep's runs: one ``islands sim`` process per (point, seed), several at once,
each with one torch thread, resumable.

Each run is a separate process, so one that crashes (or runs out of memory) costs only itself:
its log stays in ``DIR/run.log`` and the sweep goes on; a finished one gets ``DIR/run.json``
(the command and the process's wall time, start-up included). A run whose directory already holds a
``summary.json`` written for the same resolved config is not run again; a folder that holds a
run of a different config is refused before anything starts (never silently reused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from islands.algorithms import build_algorithm, check_algorithm
from islands.core.config import RunConfig, load_config
from islands.core.errors import ConfigError
from islands.engine import resolve_device, resolve_threads, run_codec
from islands.metrics.run_dir import RunDir, plain, write_json
from islands.sweep.space import Point


@dataclass
class Run:
    """One (point, seed) of the sweep.

    Attributes:
        point: its point.
        seed: its seed.
        dir: its run directory (``OUT/<point>/seed<k>``).
        argv: the ``islands sim`` command that runs it.
        config: its resolved config, as ``config.json`` holds it.
        rounds: its rounds (for the progress bar).
        workers: its workers (``metrics.jsonl`` has a row per round per worker).
        status: ``"todo"``, ``"skipped"`` (finished before), ``"done"`` or ``"failed"``.
        summary: its ``summary.json`` once finished.
        error: the end of its log when it failed.
    """

    point: Point
    seed: int
    dir: Path
    argv: list[str]
    config: dict
    rounds: int
    workers: int
    status: str = "todo"
    summary: dict | None = None
    error: str | None = None
    wall_s: float | None = field(default=None, repr=False)
    rows_seen: int = field(default=0, repr=False)  # metrics.jsonl lines read so far
    bytes_seen: int = field(default=0, repr=False)  # ... and where reading stopped


def plan(config: str | None, sets: list[str], points: list[Point], seeds: int,
         out: Path) -> list[Run]:
    """Every run of the sweep, each config validated (a bad value names the flag it came
    from); finished runs are marked ``skipped``.

    Raises:
        ConfigError: a bad setting, or a finished run of the same folder whose config differs.
    """
    runs = []
    for point in points:
        base = _resolve(config, sets, point)
        for k in range(seeds):
            cfg = base.replace(seed=base.seed + k)  # seeds count up from the config's own
            where = out / point.name / f"seed{cfg.seed}"
            argv = [sys.executable, "-m", "islands.cli.main", "sim",
                    *([config] if config else []),
                    *[a for s in (*sets, *point.sets, f"seed={cfg.seed}") for a in ("--set", s)],
                    "--out", str(where), "--no-progress"]
            rounds = len(build_algorithm(cfg).round_bounds(cfg.steps)) - 1
            run = Run(point, cfg.seed, where, argv, plain(cfg.to_dict()), rounds, cfg.workers)
            _mark_finished(run, cfg)
            runs.append(run)
    return runs


def _resolve(config: str | None, sets: list[str], point: Point) -> RunConfig:
    """The point's config (the base seed), with what the algorithm and codec refuse."""
    flag = "--baseline" if point.baseline else "--grid/--random"
    try:
        cfg = load_config(config, [*sets, *point.sets])
        check_algorithm(cfg)
        run_codec(cfg)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{flag} {', '.join(point.sets) or '(the base config)'}: {e}") \
            from None


def _mark_finished(run: Run, cfg: RunConfig) -> None:
    """A run whose folder holds it finished is ``skipped``; a folder that holds another run
    (finished or not) is refused before anything starts, naming the differing key."""
    fix = f"use another --out, or delete {run.dir} to run it again"
    found = RunDir(run.dir, flag="the sweep's run folder", fix=fix).claim(cfg, existing="resume")
    if found != "finished":
        return
    run.status, run.summary = "skipped", json.loads((run.dir / "summary.json").read_text())
    facts = run.dir / "run.json"
    if facts.is_file():
        run.wall_s = json.loads(facts.read_text()).get("process_wall_s")


def auto_jobs(sample: RunConfig | None = None) -> int:
    """Processes at once: the cores this process may use, divided by each run's threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # threads = "torch" leaves the count to torch, which each run's OMP_NUM_THREADS=1 makes 1
    threads = 1 if sample is None else resolve_threads(sample, resolve_device(sample.device))
    threads = threads or 1
    return max(1, (cores or 1) // threads)


def execute(runs: list[Run], jobs: int, console: Console, progress: bool = True) -> None:
    """Runs the ``todo`` runs, ``jobs`` at a time, with a live bar per running run."""
    todo = [r for r in runs if r.status == "todo"]
    skipped = len(runs) - len(todo)
    if skipped:
        console.print(f"{skipped} of {len(runs)} runs finished before: skipped")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}  # one thread each: several processes share the cores
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console,
                   disable=not progress)
    running: dict[int, tuple[Run, subprocess.Popen, int, float]] = {}
    with bar:
        total = bar.add_task("[bold]sweep", total=len(runs), completed=skipped, note="runs")
        try:
            while todo or running:
                while todo and len(running) < jobs:
                    run = todo.pop(0)
                    run.dir.mkdir(parents=True, exist_ok=True)
                    with open(run.dir / "run.log", "w") as log:  # the child keeps its copy
                        p = subprocess.Popen(run.argv, stdout=log, stderr=subprocess.STDOUT,
                                             env=env, stdin=subprocess.DEVNULL)
                    task = bar.add_task(f"{run.point.name} seed {run.seed}", total=run.rounds,
                                        note="rounds")
                    running[p.pid] = (run, p, task, time.perf_counter())
                time.sleep(0.5)
                for pid, (run, p, task, t0) in list(running.items()):
                    bar.update(task, completed=_rounds_done(run))
                    if p.poll() is None:
                        continue
                    del running[pid]
                    bar.remove_task(task)
                    _finished(run, p.returncode, time.perf_counter() - t0, console)
                    bar.advance(total)
        finally:  # interrupted: stop what this sweep started; finished runs stay on disk
            for run, p, _, _ in running.values():
                p.terminate()
                p.wait()


def _rounds_done(run: Run) -> int:
    """Rounds in the run's ``metrics.jsonl``, reading only what was appended since the last
    call (a DDP run writes a row per step: rereading the file would grow with the run)."""
    path = run.dir / "metrics.jsonl"
    if path.is_file():
        with open(path, "rb") as f:
            f.seek(run.bytes_seen)
            new = f.read()
        complete = new.rfind(b"\n") + 1  # a line being written counts once it ends
        run.rows_seen += new.count(b"\n", 0, complete)
        run.bytes_seen += complete
    return run.rows_seen // max(1, run.workers)


def _finished(run: Run, rc: int, wall_s: float, console: Console) -> None:
    run.wall_s = wall_s
    summary = run.dir / "summary.json"
    if rc == 0 and summary.is_file():
        run.status, run.summary = "done", json.loads(summary.read_text())
        write_json(run.dir / "run.json", {"process_wall_s": wall_s, "argv": run.argv})
        console.print(f"[green]done[/] {run.point.name} seed {run.seed}: eval loss "
                      f"{run.summary['final_eval_loss']:.4f} in {wall_s:.0f} s")
        return
    tail = (run.dir / "run.log").read_text(errors="replace").strip().splitlines()[-5:]
    run.status, run.error = "failed", "\n".join(tail)
    console.print(f"failed {run.point.name} seed {run.seed} (exit {rc}); the end of "
                  f"{run.dir / 'run.log'}:\n" + "\n".join(f"  {line}" for line in tail),
                  highlight=False, markup=False)
