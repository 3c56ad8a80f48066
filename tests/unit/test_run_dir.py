"""Run directories hold one run: another run, or this one finished, is refused before anything
runs (unless resumed or overwritten); rows are appended whole or not at all; the final
parameters are the model's state_dict, written before the summary."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import islands
from islands.core.errors import ConfigError
from islands.metrics.run_dir import RunDir, read_metrics
from islands.runtime import outputs
from islands.sim.runner import Simulation
from tests.conftest import tiny_config

RUN = ("workers=2", "steps=4", "algorithm.sync_every=2", "eval_every=4")


def test_a_second_run_into_another_runs_folder_is_refused_and_its_rows_stay(tmp_path):
    islands.simulate(tiny_config(*RUN), out_dir=tmp_path)
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 * 2 and len({r["run_id"] for r in rows}) == 1
    with pytest.raises(ConfigError, match=r"holds another run: its steps is 4, this run's is "
                                          r"6: give another folder, or --overwrite"):
        Simulation(tiny_config(*RUN, "steps=6"), tmp_path)
    assert read_metrics(tmp_path) == rows  # nothing was touched


def test_this_run_finished_is_refused_kept_with_resume_and_rerun_with_overwrite(tmp_path):
    cfg = tiny_config(*RUN)
    first = islands.simulate(cfg, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="holds this run, finished .*--resume keeps it"):
        islands.simulate(cfg, out_dir=tmp_path)
    kept = islands.simulate(cfg, out_dir=tmp_path, existing="resume")
    assert kept == json.loads((tmp_path / "summary.json").read_text())
    assert kept["run_id"] == first["run_id"]
    again = islands.simulate(cfg.replace(steps=6), out_dir=tmp_path, existing="overwrite")
    rows = read_metrics(tmp_path)
    assert again["steps"] == 6 and len(rows) == 3 * 2  # only the new run's rows
    assert {r["run_id"] for r in rows} == {again["run_id"]} != {first["run_id"]}


def test_an_unfinished_run_of_the_same_config_starts_over_without_doubling_rows(tmp_path):
    cfg = tiny_config(*RUN)
    islands.simulate(cfg, out_dir=tmp_path)
    (tmp_path / "summary.json").unlink()  # as if it had been killed before the end
    islands.simulate(cfg, out_dir=tmp_path)
    assert len(read_metrics(tmp_path)) == 2 * 2


def test_a_worker_folder_inside_another_runs_directory_is_refused(tmp_path):
    cfg = tiny_config(*RUN)
    islands.simulate(cfg, out_dir=tmp_path / "diloco")
    with pytest.raises(ConfigError, match="lies inside .*the run directory of another run"):
        outputs.claim(RunDir(tmp_path / "diloco" / "w0"), cfg)
    assert not outputs.claim(RunDir(tmp_path / "diloco-job" / "w0"), cfg)  # fresh


def test_the_dropin_default_folder_is_the_jobs_never_the_simulators(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(*RUN)
    islands.simulate(cfg, out_dir="runs/diloco")  # islands sim's default folder
    job = islands.join(config=cfg, worker_id=0, token=b"")  # claims, connects nothing yet
    assert job.out.path.resolve() == tmp_path / "runs" / "diloco-job" / "w0"


def test_rows_are_appended_whole_or_wait_until_there_is_room(tmp_path, monkeypatch):
    out = RunDir(tmp_path)
    out.start(tiny_config())
    out.log({"round": 0})
    real, full = os.pwrite, {"on": True}

    def half_then_full(fd, data, offset):  # a disk that fills in the middle of a row
        if full["on"]:
            real(fd, data[: len(data) // 2], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", half_then_full)
    out.log({"round": 1})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(x)["round"] for x in text.splitlines()] == [0]
    full["on"] = False  # room again: the waiting row goes first, in order
    out.log({"round": 2})
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_final_safetensors_is_the_models_state_dict_with_buffers(tmp_path):
    cfg = islands.load_config(None, ["task.name=digits_cnn", "workers=2", "steps=4",
                                     "algorithm.sync_every=2", "eval_every=4", "device=cpu"])
    sim = Simulation(cfg, tmp_path)
    sim.run()
    state = load_file(tmp_path / "final.safetensors")
    model = sim.task.model()
    assert set(state) == set(model.state_dict())  # BatchNorm's statistics included
    model.load_state_dict(state)  # the README's one-liner
    assert all(torch.equal(state[k], v) for k, v in sim.final_state.items())
    assert any(k.endswith("running_mean") for k in state)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "final.safetensors", "loss.png", "metrics.jsonl",
                     "summary.json"]  # and no temp file


def test_tied_weights_are_saved_under_each_name(tmp_path):
    sim = Simulation(tiny_config(*RUN), tmp_path)
    sim.run()
    state = load_file(tmp_path / "final.safetensors")
    assert torch.equal(state["tok.weight"], state["head.weight"])


def test_the_dropin_refuses_what_it_cannot_honour_before_it_connects(tmp_path):
    with pytest.raises(ConfigError, match=r"init.warm_start_steps \(5\) is not supported by the "
                                          r"drop-in loop \(your code builds the model\)"):
        islands.join(config=tiny_config(*RUN, "init.warm_start_steps=5"), worker_id=0,
                     token=b"", out=tmp_path / "w0")
    assert not (tmp_path / "w0").exists()  # refused before anything was written


def test_a_row_still_being_written_is_left_out_until_it_is_whole(tmp_path):
    """A reader polling a run still going (as the integration tests do) may catch the writer
    in the middle of a line."""
    path = tmp_path / "metrics.jsonl"
    whole = '{"round": 5, "worker": 0}\n{"round": 6, "worker": 0}\n'
    path.write_text(whole + '{"round": 7, "worker": 0, "train_loss"')
    assert [r["round"] for r in read_metrics(tmp_path)] == [5, 6]
    path.write_text(whole + '{"round": 7, "worker": 0}')  # whole, though with no newline
    assert [r["round"] for r in read_metrics(tmp_path)] == [5, 6, 7]
    path.write_text('{"round": 5, "wor\n' + whole)  # a bad line before the last is an error
    with pytest.raises(json.JSONDecodeError):
        read_metrics(tmp_path)
