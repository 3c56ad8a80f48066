"""islands sweep end to end: two processes at a time, each run a real `islands sim`; a second
call skips what is finished; a run that crashes costs only itself and is retried next time."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest

from islands.cli.main import main
from islands.sweep import runner
from tests.integration.conftest import TINY, popen


@pytest.fixture(autouse=True)
def _jobs_from_the_zygote(monkeypatch):
    """The sweep's jobs start as the other tests' processes do (forks of the zygote)."""
    monkeypatch.setattr(runner, "subprocess", SimpleNamespace(
        **{**vars(subprocess), "Popen": lambda argv, **kw: popen(argv, **kw)}))

BASE = [a for s in [*TINY, "workers=2", "steps=8", "algorithm.sync_every=4", "eval_every=4"]
        for a in ("--set", s)]


def test_a_sweep_runs_over_seeds_and_resumes(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", *BASE, "--grid", "outer.lr=0.5,1.0", "--seeds", "2", "--out", str(out),
            "--jobs", "2", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "sweep.json").read_text())
    rows = {r["point"]: r for r in saved["points"]}
    assert set(rows) == {"outer.lr=0.5", "outer.lr=1.0"}
    for name, row in rows.items():
        losses = [json.loads((out / name / f"seed{k}" / "summary.json").read_text())
                  ["final_eval_loss"] for k in (0, 1)]
        assert row["final_eval_losses"] == losses and losses[0] != losses[1]
        assert row["final_eval_loss_mean"] == sum(losses) / 2
    best = min(("outer.lr=0.5", "outer.lr=1.0"), key=lambda n: rows[n]["final_eval_loss_mean"])
    assert saved["best"] == best and rows[best]["best"]
    assert f"best: {best}" in printed and (out / "sweep.png").stat().st_size > 10_000
    stamp = (out / "outer.lr=0.5" / "seed0" / "summary.json").stat().st_mtime_ns
    assert main(argv) == 0  # the same command again: nothing runs
    assert "4 of 4 runs finished before: skipped" in capsys.readouterr().out
    assert (out / "outer.lr=0.5" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "sweep.json").read_text())["points"] == saved["points"]


def test_a_crashing_run_costs_only_itself(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", *BASE, "--grid", "data.corpus='/nowhere','python-stdlib'", "--out",
            str(out), "--jobs", "2", "--no-progress"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "failed data.corpus=nowhere seed 0" in printed and "/nowhere" in printed
    saved = json.loads((out / "sweep.json").read_text())
    status = {r["point"]: r["status"] for r in saved["runs"]}
    assert status == {"data.corpus=nowhere": "failed", "data.corpus=python-stdlib": "done"}
    assert saved["best"] == "data.corpus=python-stdlib"
    assert main(argv) == 1  # retried, the finished one skipped
    assert "1 of 2 runs finished before: skipped" in capsys.readouterr().out
