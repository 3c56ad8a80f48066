"""islands sweep without starting a process: the points of a grid and of random draws, the
plan (commands, folders, finished runs skipped, a changed config refused), the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from islands.core.errors import ConfigError
from islands.metrics.compare import make_console
from islands.sweep import report, runner, space, sweep
from tests.conftest import TINY

BASE = [*TINY, "workers=2", "steps=8", "algorithm.sync_every=4", "eval_every=4"]


def test_grid_values_are_toml_and_commas_in_brackets_do_not_split():
    grid = space.parse_grid(["outer.lr=0.5,0.7", "algorithm.sync_every=50,[[0,10],[100,25]]"])
    assert grid["algorithm.sync_every"] == ["50", "[[0,10],[100,25]]"]
    pts = space.points(grid, [], 0, 0)
    assert [p.sets for p in pts] == [
        ("outer.lr=0.5", "algorithm.sync_every=50"),
        ("outer.lr=0.5", "algorithm.sync_every=[[0,10],[100,25]]"),
        ("outer.lr=0.7", "algorithm.sync_every=50"),
        ("outer.lr=0.7", "algorithm.sync_every=[[0,10],[100,25]]")]
    assert pts[1].name == "outer.lr=0.5,algorithm.sync_every=0-10_100-25"
    assert len({p.name for p in pts}) == 4
    assert space.points({}, [], 0, 0)[0].name == "base"
    paths = space.points(space.parse_grid(["data.corpus='a/b','ab'"]), [], 0, 0)
    assert paths[0].name == "data.corpus=ab" and paths[1].name.startswith("data.corpus=ab~")


def test_random_draws_are_seeded_in_range_and_typed():
    ranges = space.parse_random(["inner.lr=1e-3:1e-2:log", "algorithm.sync_every=10:50"])
    a = space.points({}, ranges, 6, search_seed=3)
    assert a == space.points({}, ranges, 6, search_seed=3)  # the same command, the same runs
    assert a != space.points({}, ranges, 6, search_seed=4)
    for p in a:
        lr, h = (s.split("=")[1] for s in p.sets)
        assert 1e-3 <= float(lr) <= 1e-2 and 10 <= int(h) <= 50
    crossed = space.points({"outer.lr": ["0.5", "1.0"]}, ranges, 3, 0)
    assert len(crossed) == 6


@pytest.mark.parametrize("kwargs, words", [
    ({"grid": ["outer.lr"]}, "--grid 'outer.lr' must look like key=v1,v2,..."),
    ({"grid": ["outer.lr=0.5,"]}, "--grid 'outer.lr=0.5,' must look like key=v1,v2,..."),
    ({"grid": ["outer.lr=0.5", "outer.lr=0.7"]}, "--grid outer.lr=... is given twice"),
    ({"random": ["outer.lr=0.5"]}, "--random 'outer.lr=0.5' must look like key=lo:hi"),
    ({"random": ["outer.lr=1:0.5"]}, "lo (1) must be below hi (0.5)"),
    ({"random": ["inner.lr=0:1:log"]}, "a log range needs lo > 0"),
    ({"grid": ["outer.lr=0.5"], "random": ["outer.lr=0.1:1"]}, "in both --grid and --random"),
    ({"grid": ["seed=1,2"]}, "seeds come from --seeds N"),
    ({"grid": ["outer.lr=-1,0.5"]}, "--grid/--random outer.lr=-1: outer.lr (-1.0) must be > 0"),
    ({"grid": ["outer.lrr=1"]}, "--grid/--random outer.lrr=1: unknown key outer.lrr"),
    ({"baseline": ["algorithm.name=nope"]}, "--baseline algorithm.name=nope: algorithm.name"),
    ({"jobs": "many"}, "--jobs ('many') must be 'auto' or a number >= 1"),
    ({"seeds": 0}, "--seeds (0) must be >= 1"),
    ({"by": ["workers=2,4"], "grid": ["workers=8"]}, "workers is in --by and in --grid"),
    ({"by": ["workers"]}, "--by 'workers' must look like key=v1,v2,..."),
])
def test_errors_name_the_flag_and_the_fix(tmp_path, kwargs, words):
    with pytest.raises(ConfigError) as e:
        sweep(None, sets=BASE, out=tmp_path, console=make_console(), dry_run=True, **kwargs)
    assert words in str(e.value)


def _plan(tmp_path, seeds=2, extra=()):
    pts = space.points(space.parse_grid(["outer.lr=0.5,1.0"]), [], 0, 0)
    return runner.plan(None, [*BASE, *extra], pts, seeds, tmp_path)


def _finish(run: runner.Run, loss: float = 3.0) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "config.json").write_text(json.dumps(run.config))
    (run.dir / "summary.json").write_text(json.dumps({"final_eval_loss": loss}))


def test_plan_runs_every_point_and_seed_as_islands_sim(tmp_path):
    runs = _plan(tmp_path)
    assert [(r.point.name, r.seed) for r in runs] == [
        ("outer.lr=0.5", 0), ("outer.lr=0.5", 1), ("outer.lr=1.0", 0), ("outer.lr=1.0", 1)]
    r = runs[3]
    assert r.dir == tmp_path / "outer.lr=1.0" / "seed1"
    assert r.argv[1:4] == ["-m", "islands.cli.main", "sim"]
    assert r.argv[-5:] == ["--set", "seed=1", "--out", str(r.dir), "--no-progress"]
    assert "outer.lr=1.0" in r.argv and "steps=8" in r.argv
    assert r.config["outer"]["lr"] == 1.0 and r.config["seed"] == 1
    assert r.rounds == 2 and r.workers == 2 and all(x.status == "todo" for x in runs)


def test_finished_runs_are_skipped_and_a_changed_config_is_refused(tmp_path):
    first = _plan(tmp_path)
    _finish(first[0], 2.5)
    again = _plan(tmp_path)
    assert [r.status for r in again] == ["skipped", "todo", "todo", "todo"]
    assert again[0].summary == {"final_eval_loss": 2.5}
    with pytest.raises(ConfigError) as e:
        _plan(tmp_path, extra=["steps=12"])
    assert str(first[0].dir) in str(e.value) and "its steps is 8, this run's is 12" in str(e.value)
    assert "use another --out, or delete" in str(e.value)
    (first[1].dir).mkdir(parents=True)  # started, never finished (a crash): run again
    assert _plan(tmp_path)[1].status == "todo"


def test_a_finished_run_with_an_infinite_setting_is_skipped(tmp_path):
    """config.json stores inf as null (JSON has no inf); the plan compares like with like."""
    from islands.core.config import load_config
    from islands.metrics.run_dir import RunDir

    extra = ["network.bandwidth_bps=inf"]
    first = _plan(tmp_path, extra=extra)[0]
    RunDir(first.dir).start(load_config(None, [*BASE, *extra, "outer.lr=0.5", "seed=0"]))
    (first.dir / "summary.json").write_text(json.dumps({"final_eval_loss": 2.0}))
    assert _plan(tmp_path, extra=extra)[0].status == "skipped"


def test_auto_jobs_with_threads_left_to_torch_is_one_per_core():
    from islands.core.config import load_config

    assert runner.auto_jobs(load_config(None, ["threads='torch'"])) == runner.auto_jobs()


def test_report_marks_the_best_point_and_compares_with_the_baseline(tmp_path):
    pts = [space.Point(("algorithm.name=ddp",), "baseline", baseline=True),
           space.Point(("outer.lr=0.5",), "a"), space.Point(("outer.lr=1.0",), "b"),
           space.Point(("outer.lr=2.0",), "c")]
    runs = []
    losses = {"baseline": [2.0, 2.2], "a": [2.1, 2.3], "b": [1.9, 2.1], "c": [1.0, None]}
    for p in pts:
        for seed, loss in enumerate(losses[p.name]):
            run = runner.Run(p, seed, tmp_path / p.name / str(seed), [], {}, 2, 2)
            if loss is None:
                run.status = "failed"
            else:
                run.status = "done"
                run.summary = {"final_eval_loss": loss, "virtual_time_s": 1.0,
                               "bytes_sent_per_worker": 100.0 if p.baseline else 4.0,
                               "eval_curve": [{"step": 0, "eval_loss": 5.0},
                                              {"step": 8, "eval_loss": loss}]}
            runs.append(run)
    rows = report.point_rows(runs)
    by = {r["point"]: r for r in rows}
    assert by["b"]["best"] and not by["c"]["best"]  # c lost a seed: not a candidate
    assert by["b"]["final_eval_loss_mean"] == pytest.approx(2.0)
    assert by["b"]["final_eval_loss_std"] == pytest.approx(0.1414, abs=1e-4)
    assert by["a"]["loss_vs_baseline"] == pytest.approx(2.2 / 2.1 - 1)
    assert by["a"]["traffic_reduction_vs_baseline"] == 25.0
    assert by["c"]["failed"] == [1] and by["c"]["finished"] == 1
    report.write(rows, runs, tmp_path, {"seeds": 2})
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["best"] == "b" and len(saved["runs"]) == 8
    assert Path(tmp_path / "sweep.png").stat().st_size > 10_000


def test_by_cells_give_each_cell_its_baseline_and_its_best(tmp_path):
    pts = space.in_cells({"workers": ["2", "4"]}, space.points(
        space.parse_grid(["outer.lr=0.5,1.0"]), [], 0, 0),
        space.baseline_point(["algorithm.name=ddp"]))
    assert [(p.name, p.baseline) for p in pts] == [
        ("workers=2/baseline", True), ("workers=2/outer.lr=0.5", False),
        ("workers=2/outer.lr=1.0", False), ("workers=4/baseline", True),
        ("workers=4/outer.lr=0.5", False), ("workers=4/outer.lr=1.0", False)]
    assert pts[3].sets == ("workers=4", "algorithm.name=ddp") and pts[3].own == pts[3].sets[1:]
    runs = runner.plan(None, BASE, pts, 1, tmp_path)
    assert runs[3].config["workers"] == 4 and runs[3].config["algorithm"]["name"] == "ddp"
    assert runs[4].dir == tmp_path / "workers=4" / "outer.lr=0.5" / "seed0"
    loss = {"baseline": 2.0, "outer.lr=0.5": 1.5, "outer.lr=1.0": 1.8}
    for run in runs:  # the best differs between the cells
        value = loss[run.point.name.split("/")[1]] + (0.5 if run.point.name.endswith(
            "0.5") and run.point.cell == "workers=4" else 0)
        run.status, run.summary = "done", {"final_eval_loss": value, "virtual_time_s": 1.0,
                                           "bytes_sent_per_worker": 1.0, "eval_curve": []}
    rows = report.point_rows(runs)
    assert [r["point"] for r in rows if r["best"]] == ["workers=2/outer.lr=0.5",
                                                        "workers=4/outer.lr=1.0"]
    assert rows[4]["loss_vs_baseline"] == pytest.approx(0.0)  # 2.0 against the cell's 2.0


def test_listed_points_are_recipes_and_min_traffic_bounds_the_best(tmp_path):
    pts = space.parse_points(["", "algorithm.ddp_steps=8 algorithm.sync_every=[[0, 4], [8, 2]]"])
    assert pts[0].sets == () and pts[0].name == "base"
    assert pts[1].sets == ("algorithm.ddp_steps=8", "algorithm.sync_every=[[0, 4], [8, 2]]")
    with pytest.raises(ConfigError, match="--point 'outer.lr' must be key=value sets"):
        space.parse_points(["outer.lr"])
    with pytest.raises(ConfigError, match="--min-traffic .* give --baseline too"):
        sweep(None, sets=BASE, min_traffic=25, out=tmp_path, console=make_console(),
              dry_run=True)
    base, a, b = (space.Point(("algorithm.name=ddp",), "baseline", baseline=True),
                  space.Point(("x=1",), "a"), space.Point(("x=2",), "b"))
    runs = []
    for p, loss, sent in ((base, 2.0, 100.0), (a, 1.8, 10.0), (b, 1.9, 2.0)):
        run = runner.Run(p, 0, tmp_path / p.name, [], {}, 1, 1, status="done")
        run.summary = {"final_eval_loss": loss, "virtual_time_s": 1.0,
                       "bytes_sent_per_worker": sent, "eval_curve": []}
        runs.append(run)
    assert [r["best"] for r in report.point_rows(runs)] == [False, True, False]
    assert [r["best"] for r in report.point_rows(runs, 25)] == [False, False, True]


def test_progress_counts_rounds_from_what_was_appended(tmp_path):
    run = runner.Run(None, 0, tmp_path, [], {}, 10, 2)
    assert runner._rounds_done(run) == 0  # no metrics.jsonl yet
    (tmp_path / "metrics.jsonl").write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    assert runner._rounds_done(run) == 1 and run.rows_seen == 2  # the half line waits
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b': 3}\n{"a": 4}\n')
    assert runner._rounds_done(run) == 2 and run.rows_seen == 4
