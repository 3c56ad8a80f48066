"""Seeds where a claim is made: runs that differ only by seed are grouped, mean ± std."""

from __future__ import annotations

import json
import statistics

import pytest

from islands.cli.main import main
from islands.metrics.seeds import group_by_seed, group_label, mean_std, seed_rows
from tests.unit.test_cli import QUICK, sets


def test_grouping_ignores_the_seed_only():
    base = {"seed": 0, "workers": 2, "algorithm": {"name": "diloco", "sync_every": 4}}
    other_h = {**base, "algorithm": {"name": "diloco", "sync_every": 2}}
    configs = [base, {**base, "seed": 1}, other_h, {**other_h, "seed": 7}, {**base, "seed": 2}]
    assert group_by_seed(configs) == [[0, 1, 4], [2, 3]]
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(statistics.stdev([1, 2, 4]))
    assert mean_std([3.0]) == (3.0, None)
    assert group_label(["ddp-s0", "ddp-s1"]) == "ddp"
    assert group_label(["runs/p1/seed0", "runs/p1/seed1"]) == "runs/p1"
    assert group_label(["a", "b"]) == "a +1" and group_label(["h4"]) == "h4"


def test_compare_prints_mean_and_std_over_seeds(tmp_path, capsys):
    dirs = []
    for name, extra in (("ddp", ["algorithm.name=ddp"]), ("dil", [])):
        for seed in (0, 1):
            out = tmp_path / f"{name}-s{seed}"
            assert main(["sim", "--out", str(out), "--no-progress",
                         *sets(*QUICK, "workers=2", f"seed={seed}", *extra)]) == 0
            dirs.append(out)
    single = tmp_path / "dil-h2"  # another config: a group of its own
    assert main(["sim", "--out", str(single), "--no-progress",
                 *sets(*QUICK, "workers=2", "algorithm.sync_every=2")]) == 0
    capsys.readouterr()
    assert main(["compare", *map(str, dirs), str(single), "--out",
                 str(tmp_path / "c.png")]) == 0
    printed = capsys.readouterr().out
    assert "over seeds" in printed
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    losses = [s["final_eval_loss"] for s in summaries]
    assert losses[0] != losses[1]  # the seeds do differ
    ddp_mean, ddp_std = mean_std(losses[:2])
    dil_mean, dil_std = mean_std(losses[2:])
    assert f"{ddp_mean:.4f} ± {ddp_std:.4f}" in printed
    assert f"{dil_mean:.4f} ± {dil_std:.4f}" in printed
    assert f"{100 * (dil_mean / ddp_mean - 1):+.1f}%" in printed
    configs = [json.loads((d / "config.json").read_text()) for d in [*dirs, single]]
    rows = seed_rows([*summaries, json.loads((single / "summary.json").read_text())], configs,
                     ["ddp-s0", "ddp-s1", "dil-s0", "dil-s1", "dil-h2"])
    assert [(r["label"], r["seeds"]) for r in rows] == [("ddp", [0, 1]), ("dil", [0, 1]),
                                                        ("dil-h2", [0])]
    assert rows[1]["baseline"] == "ddp" and rows[2]["final_eval_loss_std"] is None
