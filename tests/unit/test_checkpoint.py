"""Checkpoints: round trip, atomic replacement under SIGKILL, clear errors on bad files."""

from __future__ import annotations

import pytest
import torch

from islands.algorithms import DiLoCo
from islands.algorithms.base import Worker
from islands.codecs.cast import Identity
from islands.core.errors import ConfigError
from islands.core.files import remove_temp
from islands.runtime import checkpoint, state


def _worker(seed: int = 0) -> tuple[DiLoCo, Worker]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w = Worker(0, model, opt, Identity())
    algo = DiLoCo(2)
    algo.attach(w)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    w.global_params.grad = w.global_params.detach() - w.flat_params()
    w.outer.step()
    return algo, w


def test_round_trip_restores_shared_and_worker_state(tmp_path):
    algo, w = _worker()
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, algo.shared_state(w), {"round": 7}, w)
    tensors, facts = checkpoint.load(path)
    assert facts["round"] == 7
    algo2, w2 = _worker(seed=1)
    state.load(algo2, w2, checkpoint.shared_part(tensors))
    checkpoint.restore_worker(w2, checkpoint.worker_part(tensors), facts["worker"])
    assert state.digest(algo.shared_state(w)) == state.digest(algo2.shared_state(w2))
    a, b = w.inner.state_dict()["state"], w2.inner.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConfigError, match="not a valid islands checkpoint"):
        checkpoint.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.safetensors")


def _saved(tmp_path, **facts):
    algo, w = _worker()
    shared = algo.shared_state(w)
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, shared, {"round": 3, "hash": state.digest(shared), **facts}, w)
    return path


def test_a_resume_is_verified_against_its_hash_its_values_and_the_runs_rounds(tmp_path):
    path = _saved(tmp_path)
    tensors, facts = checkpoint.load(path)
    checkpoint.verify(path, checkpoint.shared_part(tensors), facts, rounds=10)  # good
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the tensor bytes
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    tensors, facts = checkpoint.load(bad)
    with pytest.raises(ConfigError, match="hashes to .* its metadata says .*: the file is "
                                          "corrupt"):
        checkpoint.verify(bad, checkpoint.shared_part(tensors), facts, rounds=10)
    tensors, facts = checkpoint.load(path)
    with pytest.raises(ConfigError, match=r"round 999 in its metadata is outside this run's "
                                          r"rounds 0..10"):
        checkpoint.verify(path, checkpoint.shared_part(tensors), {**facts, "round": 999}, 10)
    nan = {k: v.clone() for k, v in checkpoint.shared_part(tensors).items()}
    nan["global_params"][0] = float("nan")
    with pytest.raises(ConfigError, match="global_params holds NaN/Inf"):
        checkpoint.verify(path, nan, {**facts, "hash": state.digest(nan)}, 10)
    with pytest.raises(ConfigError, match="no shared-state hash or round"):
        checkpoint.verify(path, checkpoint.shared_part(tensors), {"round": 3}, 10)


def test_old_checkpoints_are_pruned_and_temp_files_of_a_killed_write_removed(tmp_path):
    algo, w = _worker()
    for r in range(1, 6):
        checkpoint.save_round(tmp_path, r, algo.shared_state(w), {"round": r}, None, keep=2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["round-4.safetensors",
                                                          "round-5.safetensors"]
    (tmp_path / ".round-6.safetensors.tmp.1234").write_bytes(b"half a file")
    assert remove_temp(tmp_path) == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == ["round-4.safetensors",
                                                          "round-5.safetensors"]
