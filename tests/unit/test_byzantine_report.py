"""The Byzantine benchmark's report: each cell against the clean mean run of its own machine,
and the batches' bookkeeping (``--skip-done``)."""

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "byzantine.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("byzantine_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(agg, attack, k, loss, machine=None, banned=(), attackers=()):
    row = {"workers": 8, "aggregator": agg, "attack": attack, "attackers": k, "seed": 0,
           "final_eval_loss": loss, "bytes_sent_per_worker": 1.0,
           "bytes_received_per_worker": 1.0, "banned": [{"worker": w} for w in banned],
           "attacker_ids": list(attackers), "error": None, "wall_s": 1.0}
    if machine is not None:
        row["machine"] = machine
    return row


def test_each_cell_is_against_the_clean_mean_run_of_its_own_machine(bench):
    rows = [_row("mean", "none", 0, 2.0),                     # a machine not recorded
            _row("median", "noise", 2, 2.2),
            _row("mean", "none", 0, 1.0, machine="B"),
            _row("krum", "none", 0, 1.1, machine="B"),
            _row("krum", "alie", 1, 1.5, machine="C")]       # C has no clean mean run
    lines = {(x["aggregator"], x["attack"]): x for x in bench.summarize(rows)}
    assert lines["median", "noise"]["pct"] == pytest.approx(10.0)
    assert lines["krum", "none"]["pct"] == pytest.approx(10.0)
    assert not lines["krum", "alie"]["baseline"] and math.isnan(lines["krum", "alie"]["pct"])
    assert bench._pct(lines["krum", "alie"]) == "no clean"
    assert bench._pct(lines["median", "noise"]) == "+10.0"
    assert sorted(bench.baselines(rows)) == [
        "clean mean run, 8 workers, seed 0: 1.0000 on B",
        "clean mean run, 8 workers, seed 0: 2.0000 on a machine not recorded"]


def test_an_honest_worker_banned_is_named_and_an_attacker_is_not(bench):
    rows = [_row("mean", "none", 0, 1.0),
            _row("bulyan", "alie", 2, 1.0, banned=(5, 7), attackers=(6, 7))]
    line = next(x for x in bench.summarize(rows) if x["aggregator"] == "bulyan")
    assert line["banned"] == [5, 7] and line["honest_banned"] == [5]


def test_skip_done_leaves_out_what_ran_and_refuses_a_missing_file(bench, tmp_path):
    import json

    done = tmp_path / "done.json"
    done.write_text(json.dumps({"rows": [
        {**_row("krum", "none", 0, 1.0)},
        {**_row("krum", "alie", 1, math.nan), "error": "ValueError: no"}]}))
    own = tmp_path / "own.json"  # the batch's own --json, not written yet: resumable
    assert bench.cells_done([str(done), str(own)], own) == {(8, "krum", "none", 0, 0)}
    with pytest.raises(SystemExit, match="no such file"):
        bench.cells_done([str(done), str(tmp_path / "typo.json")], own)
