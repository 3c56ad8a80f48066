"""The command line: the main job end to end (tiny), single runs, compare, and bad input."""

from __future__ import annotations

import json

from islands.cli.main import main
from tests.conftest import TINY


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_main_job_runs_four_runs_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "main"
    rc = main(["sim", "--out", str(out), "--no-progress",
               *sets(*TINY, "steps=8", "algorithm.sync_every=4", "eval_every=4")])
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
                    "compute_utilization", "wall_time_s", "seed"):
            assert key in summary, key
        assert (out / name / "config.json").is_file() and (out / name / "loss.png").is_file()
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        row = json.loads(lines[0])
        assert {"round", "step", "worker", "train_loss", "bytes_sent", "bytes_received",
                "virtual_time_s"} <= row.keys()


def test_sim_with_config_file_and_compare(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('steps = 6\nworkers = 2\n[algorithm]\nname = "local_sgd"\nsync_every = 3\n')
    assert main(["sim", str(cfg), "--out", str(tmp_path / "a"), *sets(*TINY)]) == 0
    assert main(["sim", str(cfg), "--out", str(tmp_path / "b"), "--no-progress",
                 *sets(*TINY, "algorithm.name=diloco")]) == 0
    capsys.readouterr()
    png = tmp_path / "cmp.png"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "local_sgd" in printed and "diloco" in printed and png.is_file()


def test_bad_config_is_rejected_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["sim", "--out", str(out), *sets("algorithm.sync_every=0")])
    assert rc == 2
    assert "algorithm.sync_every (0) must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_missing_corpus_says_which_path(tmp_path, capsys):
    rc = main(["sim", "--out", str(tmp_path / "x"), "--no-progress",
               *sets(*TINY, "data.corpus='/data/nowhere'")])
    assert rc == 2
    assert "/data/nowhere" in capsys.readouterr().err


def test_compare_refuses_a_folder_without_summary(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
