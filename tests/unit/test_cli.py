"""The command line: one run per `islands sim`, the main job as `islands demo`, compare with
labels, a baseline and per-worker figures, warnings and errors before anything runs."""

from __future__ import annotations

import json

import pytest
import torch

from islands.cli.main import main
from islands.metrics.plots import panels
from tests.conftest import TINY


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


QUICK = [*TINY, "steps=8", "algorithm.sync_every=4", "eval_every=4"]


def test_sim_without_a_config_is_one_run_on_the_defaults(tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["sim", "--out", str(out), "--no-progress",
                 *sets(*QUICK, "workers=2")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["workers"], summary["algorithm"], summary["steps"]) == (2, "diloco", 8)
    assert not (out / "ddp").exists() and not (out / "comparison.json").exists()
    printed = capsys.readouterr().out
    assert "│ diloco" in printed and "│ single" not in printed and "│ ddp" not in printed


def test_demo_runs_four_runs_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "main"
    rc = main(["demo", "--out", str(out), "--no-progress",
               *sets(*QUICK, "init.warm_start_steps=10")])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("ddp", "diloco", "local_sgd", "single", "traffic ÷", "virtual time"):
        assert name in printed
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in rows] == ["ddp", "diloco", "local_sgd", "single"]
    by = {r["name"]: r for r in rows}
    assert by["single"]["workers"] == 1 and by["single"]["bytes_sent_per_worker"] == 0
    assert by["diloco"]["traffic_reduction_vs_ddp"] == 4.0  # H = 4
    assert (out / "comparison.png").stat().st_size > 10_000
    for name in ("ddp", "diloco", "local_sgd", "single"):
        summary = json.loads((out / name / "summary.json").read_text())
        for key in ("algorithm", "workers", "steps", "rounds", "final_eval_loss",
                    "bytes_sent_per_worker", "bytes_sent_total", "virtual_time_s",
                    "compute_utilization", "wall_time_s", "seed", "threads", "train_curve"):
            assert key in summary, key
        assert (out / name / "config.json").is_file() and (out / name / "loss.png").is_file()
        row = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])
        assert {"round", "step", "worker", "train_loss", "bytes_sent", "bytes_received",
                "virtual_time_s"} <= row.keys()


@pytest.mark.parametrize("key", ["workers=8", "algorithm.name=diloco", "name=x"])
def test_demo_refuses_overrides_that_would_erase_its_rows(tmp_path, capsys, key):
    out = tmp_path / "never"
    assert main(["demo", "--out", str(out), *sets(key)]) == 2
    err = capsys.readouterr().err
    assert "islands demo compares" in err and "islands sim --set" in err
    assert not out.exists()


def _runs(tmp_path, names_and_sets):
    for name, extra in names_and_sets:
        assert main(["sim", "--out", str(tmp_path / name), "--no-progress",
                     *sets(*QUICK, "workers=2", *extra)]) == 0


def test_compare_labels_by_directory_with_a_baseline_and_per_worker_figures(tmp_path, capsys):
    _runs(tmp_path, [("h4", []), ("h2", ["algorithm.sync_every=2"]),
                     ("slow", ["compute.worker=[{id = 1, step_time_s = 0.5}]"])])
    capsys.readouterr()
    png = tmp_path / "cmp.png"
    runs = [str(tmp_path / n) for n in ("h4", "h2", "slow")]
    assert main(["compare", *runs, "--out", str(png), "--baseline", str(tmp_path / "h4"),
                 "--per-worker"]) == 0
    printed = capsys.readouterr().out
    for label in ("│ h4", "│ h2", "│ slow", "vs h4", "per worker"):
        assert label in printed, label
    assert "+0.0%" in printed  # the baseline against itself
    assert png.stat().st_size > 10_000
    # the straggler is visible: worker 0 of the slow run waits, worker 1 does not
    slow = json.loads((tmp_path / "slow" / "summary.json").read_text())
    idle = slow["idle_s_by_worker"]
    assert idle[0] > 3 * max(idle[1], 0.01)
    assert main(["compare", *runs, "--baseline", "nowhere"]) == 2
    assert "--baseline 'nowhere' is not one of the runs compared" in capsys.readouterr().err


def test_the_plots_have_time_train_loss_and_the_start_on_the_bytes_axis(tmp_path):
    _runs(tmp_path, [("a", [])])
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    drawn = panels([s], ["a"])
    assert list(drawn) == ["eval loss by steps", "by bytes on the wire",
                           "by virtual time (modelled)", "train loss per round"]
    _, xs, _ = drawn["by bytes on the wire"]["series"][0]
    assert xs[0] == 0 and xs[-1] == s["bytes_sent_per_worker"]  # the step-0 point is drawn
    _, times, _ = drawn["by virtual time (modelled)"]["series"][0]
    assert times[-1] == s["virtual_time_s"]
    _, steps, losses = drawn["train loss per round"]["series"][0]
    assert steps == [4, 8] and len(losses) == s["rounds"]


def test_threads_default_to_one_and_are_restored(tmp_path):
    before = torch.get_num_threads()
    _runs(tmp_path, [("auto", []), ("two", ["threads=2"])])
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["threads"] == 1
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["threads"] == 2
    assert torch.get_num_threads() == before


def test_bad_config_is_rejected_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["sim", "--out", str(out), *sets("algorithm.sync_every=0")])
    assert rc == 2
    assert "algorithm.sync_every (0) must be >= 1" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("bad, words", [
    (["outer.optimizer=adam", "outer.momentum=0.5"], "outer.momentum (0.5) is used by "
                                                     "outer.optimizer = 'sgd' only"),
    (["outer.optimizer=adam", "outer.nesterov=false"], "outer.nesterov (False) is used by"),
    (["outer.kwargs={betas = 0.9}"], "outer.kwargs ({'betas': 0.9}) are refused by"),
])
def test_an_outer_setting_the_optimizer_ignores_is_an_error(tmp_path, capsys, bad, words):
    assert main(["sim", "--out", str(tmp_path / "x"), *sets(*bad)]) == 2
    assert words in capsys.readouterr().err.replace("\n", " ")


@pytest.mark.filterwarnings("default::islands.core.errors.IslandsWarning")
def test_sync_every_beyond_the_run_is_a_warning(tmp_path, capsys):
    assert main(["sim", "--out", str(tmp_path / "x"), "--no-progress",
                 *sets(*TINY, "steps=6", "algorithm.sync_every=50")]) == 0
    err = capsys.readouterr().err.replace("\n", " ")
    assert "warning: algorithm.sync_every (50) > steps (6): no round of 50" in err


def test_missing_corpus_says_which_path(tmp_path, capsys):
    rc = main(["sim", "--out", str(tmp_path / "x"), "--no-progress",
               *sets(*TINY, "data.corpus='/data/nowhere'")])
    assert rc == 2
    assert "/data/nowhere" in capsys.readouterr().err


def test_compare_refuses_a_folder_without_summary(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
