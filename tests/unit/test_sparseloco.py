"""SparseLoCo: the config builds DiLoCo with an all-gather, plain outer SGD and the chunked
top-k + 2-bit compressor under a decaying accumulator; a run's update is the paper's rule
computed by hand, its bytes the documented formula, and the accumulator stays per worker."""

from __future__ import annotations

import math

import pytest
import torch

from islands.algorithms import DiLoCo, build_algorithm
from islands.codecs import Chain, ErrorFeedback, Quant
from islands.collectives.butterfly import MESSAGE_HEADER_BYTES
from islands.core.errors import ConfigError
from islands.engine import check_config, run_codec
from islands.sim.runner import Simulation
from tests.conftest import tiny_config

SPARSE = ["algorithm.name='sparseloco'", "algorithm.sync_every=5", "algorithm.chunk=256",
          "algorithm.density=0.05", "workers=3", "steps=15", "eval_every=15"]


def test_the_config_is_diloco_gathering_with_plain_sgd_and_its_own_compressor():
    cfg = tiny_config(*SPARSE)
    algorithm = build_algorithm(cfg)
    assert algorithm.name == "diloco" and algorithm.collective == "all_gather"
    assert (cfg.outer.lr, cfg.outer.momentum, cfg.outer.nesterov) == (1.0, 0.0, False)
    codec = run_codec(cfg)
    assert isinstance(codec, ErrorFeedback) and codec.beta == 0.95
    assert isinstance(codec.inner, Chain)
    assert (codec.inner.first.chunk, codec.inner.first.k) == (256, math.ceil(0.05 * 256))
    assert isinstance(codec.inner.values, Quant) and codec.inner.values.bits == 2


@pytest.mark.parametrize("override, fragment", [
    ("codec.name='int8'", "codec.name ('int8', error_feedback = False) is not read by "
                          "algorithm.name = 'sparseloco'"),
    ("algorithm.density=0", "algorithm.density (0.0) must be in (0, 1]"),
    ("algorithm.bits=9", "algorithm.bits (9) must be in [1, 8]"),
    ("algorithm.beta=1.5", "algorithm.beta (1.5) must be in [0, 1]"),
])
def test_bad_settings_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as e:
        check_config(tiny_config(*SPARSE, override))  # as every run does before it starts
    assert fragment in str(e.value)


def test_an_outer_momentum_under_the_accumulator_is_warned_about():
    from islands.core.errors import IslandsWarning

    with pytest.warns(IslandsWarning, match=r"outer.momentum \(0.9\) under algorithm.name = "
                                            r"'sparseloco': its accumulator replaces"):
        build_algorithm(tiny_config(*SPARSE, "outer.momentum=0.9", "outer.nesterov=true"))


def test_the_codec_section_may_add_entropy_coding_around_it():
    codec = run_codec(tiny_config(*SPARSE, "codec.entropy=true"))
    assert codec.name.startswith("entropy(error_feedback(")


def _compress(e: torch.Tensor, sizes: list[int], k: int, chunk: int, bits: int,
              block: int) -> torch.Tensor:
    """The textbook compressor, one chunk and one block at a time: top-k of |e| in each chunk
    of each parameter tensor (positions ascending, chunk after chunk), then a sign and a
    (bits - 1)-bit magnitude bin between the block's min and max kept |value|."""
    sent, start = [], 0
    for size in sizes:
        for a in range(start, start + size, chunk):
            piece = e[a:min(a + chunk, start + size)]
            sent.append(torch.topk(piece.abs(), min(k, piece.numel())).indices.sort().values + a)
        start += size
    sent = torch.cat(sent)
    out, levels = torch.zeros_like(e), 2 ** (bits - 1)
    for b in range(0, sent.numel(), block):
        where = sent[b:b + block]
        v = e[where]
        lo, hi = v.abs().min(), v.abs().max()
        width = (hi - lo) / levels
        bins = ((v.abs() - lo) / width).floor().clamp(0, levels - 1) if width > 0 else \
            torch.zeros_like(v)
        out[where] = torch.where(v < 0, -1.0, 1.0) * (lo + (bins + 0.5) * width)
    return out


def test_a_run_applies_the_papers_rule_to_the_pseudo_gradients(monkeypatch):
    """Three rounds of three workers, replayed by hand from each round's pseudo-gradients:
    e ← β e + Δ; c = Q(TopK_chunk(e)); e ← e − c; θ ← θ − lr · mean c."""
    deltas: list[dict[int, torch.Tensor]] = []
    start: list[torch.Tensor] = []
    original = DiLoCo.contribute

    def spy(self, worker, observers=()):
        out = original(self, worker, observers)
        if not start:
            start.append(worker.global_params.detach().clone())
        if len(deltas) == 0 or worker.id in deltas[-1]:
            deltas.append({})
        deltas[-1][worker.id] = out[0].tensor.clone()
        return out

    monkeypatch.setattr(DiLoCo, "contribute", spy)
    sim = Simulation(tiny_config(*SPARSE))
    sim.run()
    theta = start[0]
    sizes = [p.numel() for p in sim.workers[0].params]
    assert len(deltas) == 3 and all(len(d) == 3 for d in deltas)
    acc = {i: torch.zeros_like(theta) for i in range(3)}
    k = math.ceil(0.05 * 256)
    for round_deltas in deltas:
        cs = []
        for i, delta in sorted(round_deltas.items()):
            acc[i] = 0.95 * acc[i] + delta
            c = _compress(acc[i], sizes, k, 256, 2, 256)
            acc[i] = acc[i] - c
            cs.append(c)
        theta = theta - 1.0 * torch.stack(cs).mean(0)
    got = sim.workers[0].global_params.detach()
    torch.testing.assert_close(got, theta, rtol=0, atol=1e-6)
    for w, shared in zip(sim.workers, sim.shared_states):  # one state, own accumulators
        assert torch.equal(w.global_params.detach(), got)
        residual = w.codec.state_dict()[f"residual/w{w.id}/pseudo-gradient"]
        torch.testing.assert_close(residual, acc[w.id], rtol=0, atol=1e-6)
        assert set(shared) == {"global_params"}  # the hash covers no accumulator


def test_bytes_are_the_formula_and_the_download_is_counted():
    """Per round each worker sends its payload (values at 2 bits, a float32 (lo, hi) per 256
    values, offsets at 8 bits for chunks of 256, each tensor chunked on its own) plus a header
    to each of the 2 others, and receives as much."""
    sim = Simulation(tiny_config(*SPARSE, "algorithm.index='packed'"))
    summary = sim.run()
    n = summary["params"]
    k = math.ceil(0.05 * 256)
    sizes = [p.numel() for p in sim.workers[0].params]
    kept = sum((t // 256) * k + min(k, t % 256) for t in sizes)
    payload = (math.ceil(kept * 2 / 8) + 8 * math.ceil(kept / 256)
               + math.ceil(kept * 8 / 8))
    per_round = 2 * (payload + MESSAGE_HEADER_BYTES)
    assert summary["bytes_sent_by_worker"] == [3 * per_round] * 3
    assert summary["bytes_received_per_worker"] == 3 * per_round
    dense = 4 * n
    assert payload < dense / 50  # 5% of the values at 2 + 8 bits, a (lo, hi) per 256


def test_rice_coded_offsets_send_fewer_bytes_for_the_same_training():
    packed = Simulation(tiny_config(*SPARSE, "algorithm.index='packed'"))
    rice = Simulation(tiny_config(*SPARSE))  # the default
    a, b = packed.run(), rice.run()
    assert b["final_eval_loss"] == a["final_eval_loss"]  # the offsets are coded losslessly
    assert torch.equal(packed.final_params, rice.final_params)
    assert b["bytes_sent_per_worker"] < a["bytes_sent_per_worker"]


def test_a_joiner_in_the_fault_plan_starts_with_an_empty_accumulator(monkeypatch):
    """Worker 2 joins at round 2 of 3: its first contribution goes in with no residual, and
    every worker ends on the same global parameters."""
    seen: dict[int, int] = {}
    original = ErrorFeedback._encode

    def spy(self, x, key, offset):
        worker = int(key.split("/")[0][1:])
        if worker not in seen:
            seen[worker] = len(self.residuals)  # residual streams before its first encode
        return original(self, x, key, offset)

    monkeypatch.setattr(ErrorFeedback, "_encode", spy)
    sim = Simulation(tiny_config(*SPARSE, 'faults=[{kind = "join", worker = 2, round = 2}]'))
    summary = sim.run()
    assert [e["members"] for e in summary["epochs"]] == [[0, 1], [0, 1, 2]]
    assert seen == {0: 0, 1: 0, 2: 0}
    assert all(torch.equal(s["global_params"], sim.shared_states[0]["global_params"])
               for s in sim.shared_states)


def test_the_accumulator_is_saved_in_the_workers_checkpoint_and_outside_the_hash(tmp_path):
    from islands.runtime import checkpoint, state

    sim = Simulation(tiny_config(*SPARSE))
    sim.run()
    w = sim.workers[1]
    residual = w.codec.state_dict()["residual/w1/pseudo-gradient"]
    assert residual.abs().sum() > 0
    path = tmp_path / "ck.safetensors"
    shared = sim.shared_states[1]
    checkpoint.save(path, shared, {"round": 3, "hash": state.digest(shared)}, w)
    tensors, facts = checkpoint.load(path)
    assert set(checkpoint.shared_part(tensors)) == {"global_params"}  # what the hash covers
    fresh = Simulation(tiny_config(*SPARSE)).build().workers[1]
    assert not fresh.codec.state_dict()  # a new process: an empty accumulator
    checkpoint.restore_worker(fresh, checkpoint.worker_part(tensors), facts["worker"])
    assert torch.equal(fresh.codec.state_dict()["residual/w1/pseudo-gradient"], residual)
