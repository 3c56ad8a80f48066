"""The real runtime with ``device = "cuda"`` (runs where a GPU is): workers train on the GPU,
exchange over gloo through the CPU, and end with one shared state close to the simulator's."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from islands.core.config import load_config
from islands.sim.runner import Simulation
from tests.integration.conftest import TINY, final_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("algo", ["diloco", "ddp"])
def test_launch_on_the_gpu_matches_the_simulator(tmp_path, procs, algo):
    overrides = [*(o for o in TINY if not o.startswith("device")), "device=cuda", "workers=2",
                 f"algorithm.name={algo}"]
    argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "launch"]
    for o in overrides:
        argv += ["--set", o]
    p = procs.start("launch", argv + ["--out", str(tmp_path / "launch")])
    sim = Simulation(load_config(None, overrides))
    sim.run()
    assert p.wait(timeout=150) == 0
    merged = json.loads((tmp_path / "launch" / "summary.json").read_text())
    assert len(merged["final_hashes"]) == 1
    for i in range(2):
        got = final_state(tmp_path / "launch" / f"w{i}")
        for k, v in sim.final_state.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4)
