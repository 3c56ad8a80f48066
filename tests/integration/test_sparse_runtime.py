"""SparseLoCo, MuLoCo and the robust rules on real processes (and Sybil attackers, who share
their update through a folder): ``islands launch`` ends with the simulator's global
parameters and bytes (the all-gather's upload and download per worker),
and a worker that joins mid-run, with an empty accumulator, is taken in and ends on the same
state as the others."""

from __future__ import annotations

import json
import signal

import pytest

from islands.core.config import load_config
from islands.sim.runner import Simulation
from tests.integration.conftest import (
    TINY,
    assert_final_equal,
    last_round,
    launch_argv,
    metrics,
    wait_until,
)
from tests.integration.test_churn import assert_hashes_agree

SPARSELOCO = ["algorithm.name=sparseloco", "algorithm.chunk=256", "algorithm.density=0.05"]
MULOCO = ["algorithm.name=diloco", "inner.optimizer=muon", "codec.name=quant", "codec.bits=2",
          "codec.error_feedback=true"]


# robust rules: per shard in the butterfly (CenteredClip with its centers per process), and a
# whole-vector rule over the all-gather
MEDIAN = ["algorithm.name=diloco", "aggregator.name=median"]
CENTERED_CLIP = ["algorithm.name=diloco", "aggregator.name=centered_clip"]
KRUM = ["algorithm.name=diloco", "aggregator.name=krum", "aggregator.f=0"]
# every sync verified: each member recomputes a shard it does not own, from the payloads the
# others send it again (signed, like every message of an open job)
VERIFIED = ["algorithm.name=diloco", "aggregator.name=median", "aggregator.verify=1.0"]
# every message over islands' framed streams instead of gloo's pairs
STREAMS = ["algorithm.name=diloco", "aggregator.name=median", "runtime.wire=streams"]
# two Sybil identities (workers 1 and 2) sending one update, which they share through the
# launch's folder; the clone filter in front of CenteredClip
SYBIL = ["algorithm.name=diloco", "aggregator.name=centered_clip", "aggregator.clones=0.999",
         "attack.name=sybil", "attack.attackers=2"]


@pytest.mark.parametrize("method, workers", [(SPARSELOCO, 3), (MULOCO, 2), (MEDIAN, 3),
                                             (CENTERED_CLIP, 3), (KRUM, 3), (VERIFIED, 3),
                                             (STREAMS, 3), (SYBIL, 3)],
                         ids=["sparseloco", "muloco", "median", "centered_clip", "krum",
                              "median+verify", "streams", "sybil"])
def test_launch_ends_with_the_simulators_parameters_and_bytes(tmp_path, procs, method, workers):
    overrides = [*TINY, f"workers={workers}", *method]
    p = procs.start("launch", launch_argv(tmp_path / "launch", overrides))
    sim = Simulation(load_config(None, overrides))
    summary = sim.run()  # while the workers start
    assert p.wait(timeout=150) == 0
    merged = json.loads((tmp_path / "launch" / "summary.json").read_text())
    assert merged["rounds"] == summary["rounds"] == 4
    for i in range(workers):
        assert_final_equal(tmp_path / "launch" / f"w{i}", sim.final_state, f"w{i}")
    assert merged["bytes_sent_by_worker"] == summary["bytes_sent_by_worker"]
    assert merged["bytes_received_per_worker"] == summary["bytes_received_per_worker"]
    assert merged["final_eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)


def test_a_sparseloco_joiner_is_taken_in_with_an_empty_accumulator(tmp_path, procs, coordinator):
    over = ["workers=3", "steps=5000", *SPARSELOCO]
    coord = coordinator(join_timeout_s=4.0)
    addr, out = f"127.0.0.1:{coord.port}", tmp_path / "run"
    ws = {i: procs.worker(i, addr, out, over) for i in (0, 1)}
    wait_until(lambda: min(last_round(out / f"w{i}") for i in (0, 1)) >= 2, 90, "round 2")
    ws[2] = procs.worker(2, addr, out, over)  # joins the running job
    wait_until(lambda: last_round(out / "w2") >= 2, 60, "the joiner's commits")
    first = metrics(out / "w2")[0]
    assert first["participants"] == [0, 1, 2] and first["round"] >= 2
    assert "accumulator starts empty" in procs.stderr(ws[2])
    for p in ws.values():
        p.send_signal(signal.SIGTERM)
    assert all(p.wait(timeout=30) == 0 for p in ws.values())
    assert_hashes_agree([out / f"w{i}" for i in range(3)])
