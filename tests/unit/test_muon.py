"""``inner.optimizer = "muon"``: Muon on the hidden matrices, AdamW on the rest, as one optimizer
(MuLoCo with DiLoCo). Checked against ``torch.optim.Muon`` and ``torch.optim.AdamW`` alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from islands.algorithms import DiLoCo
from islands.core.config import load_config
from islands.core.errors import ConfigError, IslandsWarning
from islands.engine import build_worker, inner_optimizer
from islands.engine.muon import MuonAdamW, hidden_matrices
from islands.models.cnn import DigitsCNN
from islands.models.gpt import GPT, GPTConfig
from islands.runtime import checkpoint, state
from islands.sim.runner import Simulation
from tests.conftest import tiny_config

MUON = load_config(None, ["inner.optimizer=muon", "steps=10"])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16))


def _names(model: nn.Module, params) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


# --- config ---------------------------------------------------------------------------------


def test_the_config_accepts_muon_with_documented_defaults():
    c = MUON.inner
    assert (c.optimizer, c.muon_momentum, c.muon_ns_steps) == ("muon", 0.95, 5)


@pytest.mark.parametrize("override, fragment", [
    ("inner.optimizer=lion", "inner.optimizer ('lion') must be one of 'adamw', 'sgd', 'muon'"),
    ("inner.muon_momentum=1.0", "inner.muon_momentum (1.0) must be in [0, 1)"),
    ("inner.muon_ns_steps=0", "inner.muon_ns_steps (0) must be in [1, 99]"),
    ("inner.muon_ns_steps=2.5", "inner.muon_ns_steps (2.5) must be int"),
])
def test_bad_muon_settings_name_the_key_the_value_and_the_rule(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["inner.optimizer=muon", override])
    assert fragment in str(e.value)


# --- which parameters Muon gets ---------------------------------------------------------------


def test_on_the_gpt_muon_gets_the_blocks_linear_weights_and_adamw_the_rest():
    model = _gpt()
    hidden = _names(model, hidden_matrices(model))
    assert hidden == [f"blocks.{i}.{n}.weight" for i in range(2)
                      for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    opt, _ = inner_optimizer(model, MUON)
    kinds = [(g["optimizer"], g["weight_decay"], _names(model, g["params"]))
             for g in opt.param_groups]
    assert kinds[0] == ("muon", 0.1, hidden)
    # the tied head is tok.weight: on AdamW, once
    assert kinds[1] == ("adamw", 0.1, ["tok.weight", "pos.weight"])
    assert kinds[2][:2] == ("adamw", 0.0) and all(
        p.dim() < 2 for p in opt.param_groups[2]["params"])
    everyone = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(everyone) == sorted(id(p) for p in model.parameters())  # each once


def test_on_an_mlp_the_last_linear_is_the_head_and_frozen_weights_are_left_out():
    model = _mlp()
    assert _names(model, hidden_matrices(model)) == ["0.weight", "2.weight"]
    model[0].weight.requires_grad_(False)
    assert _names(model, hidden_matrices(model)) == ["2.weight"]
    opt, _ = inner_optimizer(model, MUON)
    assert [_names(model, g["params"]) for g in opt.param_groups] == [
        ["2.weight"], ["4.weight"], ["0.bias", "2.bias", "4.bias"]]


def test_a_model_without_hidden_matrices_warns_and_trains_on_adamw():
    model = DigitsCNN()  # conv kernels are 4-D, the only Linear is the classifier
    assert hidden_matrices(model) == []
    with pytest.warns(IslandsWarning, match=r"inner.optimizer \('muon'\): DigitsCNN has no "
                                            "hidden matrices"):
        opt, _ = inner_optimizer(model, MUON)
    assert opt.param_groups[0]["params"] == []
    _grads(model, 0)
    opt.step()  # the empty Muon group is harmless


# --- the composite equals its parts --------------------------------------------------------


def _composite(model: nn.Module) -> MuonAdamW:
    hidden = {id(p) for p in hidden_matrices(model)}
    return MuonAdamW([p for p in model.parameters() if id(p) in hidden],
                     [p for p in model.parameters() if id(p) not in hidden],
                     lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), momentum=0.9, ns_steps=4)


def test_a_step_equals_muon_on_the_matrices_and_adamw_on_the_rest():
    model = _mlp()
    alone = copy.deepcopy(model)
    opt = _composite(model)
    hidden = {id(p) for p in hidden_matrices(alone)}
    muon = torch.optim.Muon([p for p in alone.parameters() if id(p) in hidden], lr=0.01,
                            weight_decay=0.1, momentum=0.9, ns_steps=4,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for p in alone.parameters() if id(p) not in hidden], lr=0.01,
                              weight_decay=0.1, betas=(0.9, 0.95))
    for step in range(3):
        _grads(model, step)
        _grads(alone, step)
        opt.step()
        muon.step()
        adamw.step()
        for a, b in zip(model.parameters(), alone.parameters()):
            assert torch.equal(a, b)
    assert not torch.equal(model[0].weight, _mlp()[0].weight)  # it did move
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_the_state_dict_round_trips_into_a_fresh_optimizer():
    model = _gpt()
    opt, _ = inner_optimizer(model, MUON)
    for step in range(3):
        _grads(model, step)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())  # as saved: a loaded state_dict aliases its tensors
    assert sorted(sd["state"]) == list(range(len(list(model.parameters()))))
    assert set(sd["state"][0]) == {"momentum_buffer"}  # Muon's first, then AdamW's
    assert set(sd["state"][len(sd["state"]) - 1]) == {"step", "exp_avg", "exp_avg_sq"}
    twin = copy.deepcopy(model)
    fresh, _ = inner_optimizer(twin, MUON)
    fresh.load_state_dict(sd)
    for m, o in ((model, opt), (twin, fresh)):
        _grads(m, 3)
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_a_deepcopy_steps_like_the_original():
    model = _mlp()
    opt = _composite(model)
    _grads(model, 0)
    opt.step()
    twin, twin_opt = copy.deepcopy((model, opt))  # torch.save and pickling go the same way
    for m, o in ((model, opt), (twin, twin_opt)):
        _grads(m, 1)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_the_lr_schedule_scales_both_parts_also_after_a_load():
    model = _mlp()
    opt = _composite(model)
    factor = {"now": 0.5}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factor["now"])
    assert [g["lr"] for g in opt.param_groups] == [0.005, 0.005]
    _grads(model, 0)
    opt.step()
    opt.load_state_dict(opt.state_dict())  # new group dicts: the parts must follow
    factor["now"] = 0.0
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    _grads(model, 1)
    opt.step()  # lr 0: no update, no decay, in either part
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- in a run -------------------------------------------------------------------------------


def test_muloco_runs_end_to_end_and_the_workers_agree():
    cfg = tiny_config("inner.optimizer=muon", "algorithm.name=diloco", "workers=2", "steps=4",
                      "algorithm.sync_every=2", "eval_every=4")
    sim = Simulation(cfg)
    summary = sim.run()
    assert math.isfinite(summary["final_eval_loss"])
    assert isinstance(sim.workers[0].inner, MuonAdamW)
    a, b = (s["global_params"] for s in sim.shared_states)
    assert torch.equal(a, b)


def _trained_worker(steps: int):
    torch.manual_seed(0)
    w = build_worker(MUON, 0, _mlp(), data_size=0)
    DiLoCo(2).attach(w)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for _ in range(steps):
        w.backward(lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), (x, y), 8)
        w.apply()
    return w, (x, y)


def test_a_checkpoint_and_a_joiners_handover_restore_the_inner_state(tmp_path):
    w, batch = _trained_worker(3)
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, {"global_params": w.global_params}, {"round": 1}, w)
    tensors, facts = checkpoint.load(path)  # the param groups went through JSON
    restored, _ = _trained_worker(0)
    restored.load_flat(w.flat_params())
    checkpoint.restore_worker(restored, checkpoint.worker_part(tensors), facts["worker"])
    loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    for v in (w, restored):
        v.backward(loss, batch, 8)
        v.apply()
    assert torch.equal(w.flat_params(), restored.flat_params())
    joiner, _ = _trained_worker(0)
    assert state.adopt_inner(joiner, state.inner_state(w))
    mine, theirs = joiner.inner.state_dict()["state"], w.inner.state_dict()["state"]
    assert set(mine[0]) == {"momentum_buffer"} and set(mine) == set(theirs)
    assert all(torch.equal(mine[i][k], theirs[i][k]) for i in theirs for k in theirs[i])


def test_a_muon_run_can_start_from_the_warm_start_adamw_runs_share():
    from islands.engine.build import warm_start
    from islands.tasks import build_task

    base = ["init.warm_start_steps=3"]
    adamw = tiny_config(*base)
    shared = tiny_config(*base, "inner.optimizer='muon'", "init.warm_start_optimizer='adamw'")
    own = tiny_config(*base, "inner.optimizer='muon'")
    task = build_task(adamw)
    a, b, c = (warm_start(x, task, torch.device("cpu")) for x in (adamw, shared, own))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # warm-started with Muon: another one
