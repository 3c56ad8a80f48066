"""When nothing fails, the real runtime gives the simulator's global parameters and bytes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from islands.core.config import load_config
from islands.sim.runner import Simulation
from tests.integration.conftest import TINY, assert_final_equal, final_state, free_port


def _sim(overrides):
    sim = Simulation(load_config(None, overrides))
    summary = sim.run()
    return sim, summary


def summary_hash(run: Path) -> str:
    return json.loads((run / "w0" / "summary.json").read_text())["final_hash"]


def test_launch_4_workers_diloco_recipe_matches_sim(tmp_path, procs):
    """4 DiLoCo workers with a data-parallel phase, an H schedule and an outer lr schedule,
    through `islands launch`: every worker ends with the simulator's global parameters, bytes
    (per worker) and rounds."""
    overrides = [*TINY, "workers=4", "algorithm.name=diloco", "codec.name=identity",
                 "algorithm.ddp_steps=3", "algorithm.sync_every=[[0, 4], [10, 6]]",
                 "outer.lr=[[0, 0.3], [3, 0.7]]"]
    argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "launch"]
    for o in overrides:
        argv += ["--set", o]
    p = procs.start("launch", argv + ["--out", str(tmp_path / "launch")])
    sim, summary = _sim(overrides)  # while the workers start
    assert p.wait(timeout=150) == 0
    lines = p.stdout.read().splitlines()  # one JSON object per line: each worker's, the job's
    assert len(lines) == 5 and sorted(json.loads(x)["worker"] for x in lines[:-1]) == [0, 1, 2, 3]
    assert json.loads(lines[-1])["final_hashes"] == [summary_hash(tmp_path / "launch")]
    assert "abort" not in procs.stderr(p)  # the workers leave as they finish: no abort
    merged = json.loads((tmp_path / "launch" / "summary.json").read_text())
    assert len(merged["final_hashes"]) == 1
    assert merged["coordinator"]["rounds_committed"] == summary["rounds"]
    assert merged["rounds"] == summary["rounds"] == 3 + 4  # then rounds at 3, 7, 11, 17 -> 20
    for d in [tmp_path / "launch" / f"w{i}" for i in range(4)] + [tmp_path / "launch"]:
        assert_final_equal(d, sim.final_state, str(d))
    # bytes: each worker's count equals the simulator's accounting for that worker
    assert merged["bytes_sent_by_worker"] == summary["bytes_sent_by_worker"]
    assert merged["bytes_sent_total"] == summary["bytes_sent_total"]
    assert merged["final_eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)


@pytest.mark.skipif(shutil.which("torchrun", path=sys.prefix + "/bin") is None,
                    reason="torchrun not installed")
def test_torchrun_fixed_group_matches_sim(tmp_path, procs):
    overrides = [*TINY, "workers=2", "algorithm.name=diloco"]
    argv = [sys.prefix + "/bin/torchrun", "--nproc-per-node", "2", "--master-port",
            str(free_port()), "-m", "islands.cli.runtime_cmd", "run"]
    for o in overrides:
        argv += ["--set", o]
    p = procs.start("torchrun", argv + ["--out", str(tmp_path / "tr")])
    # --out is shared: each rank writes its own folder below it
    sim, summary = _sim(overrides)  # while the workers start
    assert p.wait(timeout=150) == 0
    for i in range(2):
        assert_final_equal(tmp_path / "tr" / f"w{i}", sim.final_state, f"w{i}")
        got = json.loads((tmp_path / "tr" / f"w{i}" / "summary.json").read_text())
        assert got["bytes_sent_total"] == summary["bytes_sent_by_worker"][i]


@pytest.mark.parametrize("workers", [2, 3])
def test_a_trusted_job_reduces_with_gloo_s_own_all_reduce(tmp_path, procs, workers):
    """runtime.trust = cluster: the plain mean of a lossless codec goes through gloo's
    all_reduce. With 2 workers the result is the simulator's bit for bit (each sum has two
    terms, so its order cannot matter, and halving is exact); with 3 gloo sums in its own
    order, so the parameters agree up to float rounding."""
    import torch

    overrides = [*TINY, f"workers={workers}", "algorithm.name=diloco", "runtime.trust=cluster"]
    argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "launch", "--out",
            str(tmp_path / "launch")] + [a for o in overrides for a in ("--set", o)]
    p = procs.start("launch", argv)
    sim, summary = _sim(overrides)
    assert p.wait(timeout=150) == 0
    merged = json.loads((tmp_path / "launch" / "summary.json").read_text())
    assert len(merged["final_hashes"]) == 1
    if workers == 2:
        assert_final_equal(tmp_path / "launch", sim.final_state, "native, 2 workers")
    else:
        got = final_state(tmp_path / "launch")
        for k, v in sim.final_state.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert "collective starts" in procs.stderr(p)
    # the ring's volume per worker, no headers: below the butterfly's, which counts them
    n, params = workers, merged["params"]
    ring = 2 * (n - 1) * 4 * params // n
    assert merged["bytes_sent_by_worker"][0] == ring * summary["rounds"]
