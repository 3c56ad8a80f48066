"""A full disk is a clear error, never a broken file: a run whose ``--out`` fills up writes its
final parameters and summary first and exits 2 naming the path and the bytes; workers whose
``--checkpoint-dir`` fills up stop with exit 2 naming the last good checkpoint, which verifies.
Each disk is a tmpfs of a few hundred kB mounted for the test (root only) and unmounted after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from islands.core.config import load_config
from islands.runtime import checkpoint
from islands.tasks import build_task
from tests.integration.conftest import TINY

USER = ["task.name='tests.user_task:make_task'", "device=cpu", "data.batch_size=16"]


@pytest.fixture
def small_disk(tmp_path):
    """``make(name, kb)``: a tmpfs of ``kb`` kB at ``tmp_path/name``; unmounted afterwards."""
    mounted: list[Path] = []

    def make(name: str, kb: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"this machine cannot mount a tmpfs: {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _no_temp_files(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if ".tmp." in p.name or p.name.startswith(".")]
    assert left == [], left


def test_a_full_out_keeps_the_final_parameters_and_summary_and_every_row_whole(small_disk,
                                                                              procs):
    """DDP writes a row per step per worker: 600 rows do not fit in 120 kB beside the final
    files. The run trains to the end, writes final.safetensors and summary.json, keeps the
    rows that did not fit out of the room those need, and exits 2 saying how many and why."""
    out = small_disk("out", 120)
    sets = [*USER, "workers=2", "steps=300", "algorithm.name=ddp", "eval_every=100"]
    argv = [sys.executable, "-m", "islands.cli.main", "sim", "--no-progress", "--out", str(out)]
    p = procs.start("sim", argv + [a for s in sets for a in ("--set", s)])
    assert p.wait(timeout=120) == 2
    err = procs.stderr(p)
    assert "metrics.jsonl" in err and "no space left on device" in err and "bytes needed" in err
    assert "Traceback" not in err
    model = build_task(load_config(None, sets)).model()
    model.load_state_dict(load_file(out / "final.safetensors"))  # whole, and the model's
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics_rows_unwritten"] > 0 and summary["steps"] == 300
    text = (out / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert text.endswith("\n") and 0 < len(rows) == 600 - summary["metrics_rows_unwritten"]
    _no_temp_files(out)


def test_a_full_checkpoint_dir_stops_the_workers_clearly_and_keeps_the_last_good_one(
        small_disk, procs, tmp_path):
    """Checkpoints every round, all kept: a 2 MB tmpfs fills at the second or third round.
    Each worker stops with exit 2 naming the checkpoint it could not write and the last good
    one; no temp file is left; what is there verifies; each run directory is written."""
    ck = small_disk("ck", 2048)
    sets = [*TINY, "workers=2", "runtime.checkpoint_every=1", "runtime.keep_checkpoints=off",
            "runtime.heartbeat_timeout_s=5.0"]
    argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "launch", "--out",
            str(tmp_path / "job"), "--checkpoint-dir", str(ck)]
    p = procs.start("launch", argv + [a for s in sets for a in ("--set", s)])
    assert p.wait(timeout=120) == 2
    err = procs.stderr(p)
    assert "cannot write the checkpoint" in err and "no space left on device" in err
    assert "the last good checkpoint is" in err and "Traceback" not in err
    _no_temp_files(ck)
    for w in (ck / "w0", ck / "w1"):
        files = sorted(w.glob("round-*.safetensors"))
        assert files, w
        for f in files:  # every checkpoint there is whole and verifies
            tensors, facts = checkpoint.load(f)
            checkpoint.verify(f, checkpoint.shared_part(tensors), facts, rounds=4)
    for i in (0, 1):
        summary = json.loads((tmp_path / "job" / f"w{i}" / "summary.json").read_text())
        assert "no space left on device" in summary["error"]
        assert load_file(tmp_path / "job" / f"w{i}" / "final.safetensors")
