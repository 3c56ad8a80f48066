"""The README's drop-in example, as a user runs it: its ``train.py`` and ``run.toml`` blocks
copied into a folder, ``torchrun --nproc-per-node 2 train.py algorithm.name=...`` there, and
the simulator on the same ``run.toml``: for ddp, local_sgd and diloco the job's
``final.safetensors`` (and each worker's) equals the simulator's on every tensor, and the
README's one-liner loads it into the user's model."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from islands.core.config import load_config
from islands.sim.runner import Simulation
from tests.integration.conftest import assert_final_equal, final_state, free_port

README = Path(__file__).parents[2] / "README.md"


def readme_block(lang: str, first_line: str) -> str:
    """The README's fenced ``lang`` block whose first line is ``first_line``."""
    for body in re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"README.md has no ```{lang} block starting {first_line!r}")


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text(readme_block("python", "# train.py"))
    (tmp_path / "run.toml").write_text(readme_block("toml", "# run.toml"))
    return tmp_path


def test_the_readme_dropin_loop_ends_at_the_simulators_parameters(user_folder, procs):
    algos = ("ddp", "local_sgd", "diloco")
    runs = {}
    for algo in algos:  # side by side: each torchrun is 3 processes that mostly wait
        argv = [sys.prefix + "/bin/torchrun", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "train.py", f"algorithm.name={algo}"]
        runs[algo] = procs.start(f"torchrun-{algo}", argv, cwd=user_folder)
    for algo in algos:
        # from the config file's folder: train.py:make_task resolves there, wherever we are
        sim = Simulation(load_config(user_folder / "run.toml", [f"algorithm.name={algo}"]))
        sim.run()
        assert runs[algo].wait(timeout=120) == 0, algo
        job = user_folder / "runs" / f"{algo}-job"
        for d in (job, job / "w0", job / "w1"):
            assert_final_equal(d, sim.final_state, f"{algo}: {d.name}")
        for d in (job / "w0", job / "w1", job):
            assert (d / "loss.png").stat().st_size > 10_000, d
    # the README's one-liner, with the user's model
    namespace = {"__name__": "readme"}
    exec(compile(readme_block("python", "# train.py"), "train.py", "exec"), namespace)
    model = namespace["Net"]()
    import safetensors.torch

    loader = readme_block("python", "model.load_state_dict(")
    exec(loader.replace("runs/", f"{user_folder}/runs/"),
         {"model": model, "safetensors": safetensors})
    want = final_state(user_folder / "runs" / "diloco-job")
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
