"""A brand-new worker joining, a diverged worker repaired from the majority, a coordinator
restart, and stop-and-resume from checkpoints with identical results."""

from __future__ import annotations

import json
import signal
import sys
import time

import torch

from islands.core.config import load_config
from islands.engine import initial_model
from islands.runtime import checkpoint, state
from islands.tasks import build_task
from tests.integration.conftest import (
    TINY,
    assert_final_equal,
    checkpointed_run,
    final_state,
    free_port,
    last_round,
    metrics,
    wait_until,
)
from tests.integration.test_churn import assert_hashes_agree


def test_hash_repair_and_brand_new_join(tmp_path, procs, coordinator):
    over = ["workers=4", "steps=5000"]
    cfg = load_config(None, [*TINY, *over])
    model = initial_model(cfg, build_task(cfg), torch.device("cpu"))
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bad = tmp_path / "diverged.safetensors"  # worker 2 starts from different parameters
    diverged = {"global_params": flat + 0.01}  # (a valid checkpoint of another state)
    checkpoint.save(bad, diverged, {"round": 0, "hash": state.digest(diverged),
                                    "worker_id": -1})
    # the first round waits for workers 0-2 (up to 4 s for a 4th, which comes later)
    coord = coordinator(join_timeout_s=4.0)
    addr = f"127.0.0.1:{coord.port}"
    out = tmp_path / "run"
    ws = {i: procs.worker(i, addr, out, over) for i in (0, 1)}
    ws[2] = procs.worker(2, addr, out, over, ["--resume", str(bad)])
    wait_until(lambda: min(last_round(out / f"w{i}") for i in range(3)) >= 2, 90, "round 2")
    assert coord.hash_mismatches >= 1
    assert "repaired from worker" in procs.stderr(ws[2])

    ws[3] = procs.worker(3, addr, out, over)  # never seen before
    wait_until(lambda: last_round(out / "w3") >= 1, 60, "the new worker's commits")
    assert metrics(out / "w3")[0]["participants"] == [0, 1, 2, 3]
    for p in ws.values():
        p.send_signal(signal.SIGTERM)
    assert all(p.wait(timeout=30) == 0 for p in ws.values())
    assert_hashes_agree([out / f"w{i}" for i in range(4)])
    for i in range(4):  # each ends on a committed state (SIGTERMs race by a round)
        final = json.loads((out / f"w{i}" / "summary.json").read_text())["final_hash"]
        assert final == metrics(out / f"w{i}")[-1]["hash"]


def test_coordinator_restart(tmp_path, procs):
    port = free_port()
    coord_argv = [sys.executable, "-m", "islands.cli.runtime_cmd", "coordinator", "--port",
                  str(port), "--host", "127.0.0.1"]
    coord = procs.start("coordinator", coord_argv)
    addr = f"127.0.0.1:{port}"
    out = tmp_path / "run"
    over = ["workers=2", "steps=5000"]
    ws = {i: procs.worker(i, addr, out, over) for i in range(2)}
    wait_until(lambda: min(last_round(out / f"w{i}") for i in range(2)) >= 3, 90, "round 3")
    status = procs.start("status", [sys.executable, "-m", "islands.cli.runtime_cmd", "status",
                                    "--coordinator", addr])
    assert status.wait(timeout=30) == 0
    st = json.loads(status.stdout.read())
    assert st["members"] == [0, 1] and st["last_round"] >= 2
    coord.send_signal(signal.SIGKILL)
    coord.wait()
    time.sleep(1.0)
    r = last_round(out / "w0")
    procs.start("coordinator2", coord_argv)
    wait_until(lambda: last_round(out / "w0") >= r + 3, 60, "progress after the restart")
    for p in ws.values():
        p.send_signal(signal.SIGTERM)
    assert all(p.wait(timeout=30) == 0 for p in ws.values())
    assert_hashes_agree([out / "w0", out / "w1"])


def test_stop_and_resume_gives_identical_results(tmp_path, procs, coordinator):
    over = ["workers=2", "steps=30"]
    full, part, ck = tmp_path / "full", tmp_path / "part", tmp_path / "ck"
    checkpointed_run(procs, coordinator, 2, full, ck, over)
    c2 = coordinator()
    ws = [procs.worker(i, f"127.0.0.1:{c2.port}", part, over,
                       ["--resume", str(ck / f"w{i}" / "round-3.safetensors")]) for i in range(2)]
    assert all(p.wait(timeout=90) == 0 for p in ws)
    for i in range(2):
        assert_final_equal(part / f"w{i}", final_state(full / f"w{i}"), f"w{i}")
    assert [r["round"] for r in metrics(part / "w0")] == [3, 4, 5]
    assert [r["hash"] for r in metrics(part / "w0")] == [r["hash"] for r in metrics(full / "w0")
                                                         ][3:]
