"""Tasks: the digits CNN and a user's task train in the simulator; buffers are synced by the
documented rule, frozen parameters never sent; the helpers' data is deterministic and dealt by
the partitioners; the aggregator named in the config reaches the collective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import islands
from islands.collectives.butterfly import Group
from islands.core.errors import DataError, IslandsWarning, TaskError
from islands.core.sections import DataConfig
from islands.sim.runner import Simulation
from tests.conftest import tiny_config
from tests.user_task import make_task

USER = ["task.name='tests.user_task:make_task'", "data.batch_size=16", "device='cpu'"]
DIGITS = ["task.name=digits_cnn", "data.batch_size=32", "data.partition=dirichlet",
          "data.alpha=0.5", "device='cpu'"]


@pytest.mark.parametrize("algo", ["ddp", "local_sgd", "diloco"])
def test_digits_buffers_are_identical_on_every_worker_after_a_sync(algo):
    """BatchNorm's running statistics drift apart during local steps (each worker sees other
    labels); after the sync every worker holds the same mean, in its shared state and in its
    model's BatchNorm layers."""
    cfg = islands.load_config(None, [*DIGITS, "workers=3", "steps=3", "eval_every=3",
                                     "algorithm.sync_every=3", f"algorithm.name={algo}"])
    engine = Simulation(cfg).build()
    workers = engine.workers

    def buffers(w):
        return torch.cat([b.reshape(-1).float() for b in w.model.buffers()])

    if algo == "ddp":  # synced at every step: look inside the first one
        for w in workers:
            w.backward(engine.task.loss, engine.partition.batch(w.id, 0), 32)
        before = [buffers(w) for w in workers]
        engine.step(Group(engine.transport, (0, 1, 2)), workers)
    else:
        engine.train(0, (0, 1, 2))
        before = [buffers(w) for w in workers]
        engine.end_round(Group(engine.transport, (0, 1, 2)), workers)
    after = [buffers(w) for w in workers]
    assert not torch.equal(before[0], before[1])  # they did drift apart
    assert all(torch.equal(a, after[0]) for a in after)
    mean = torch.stack(before).mean(dim=0)  # the rule: the plain mean here (diloco, ddp)
    if algo != "local_sgd":  # (local_sgd weighs by samples: equal here, so the same mean)
        torch.testing.assert_close(after[0], mean, rtol=1e-6, atol=1e-6)
    states = [engine.algorithm.shared_state(w) for w in workers]
    assert all(torch.equal(s["global_buffers"], after[0]) for s in states)


def test_digits_cnn_reports_accuracy():
    s = islands.simulate(islands.load_config(None, [*DIGITS, "workers=2", "steps=20",
                                                    "algorithm.sync_every=10",
                                                    "eval_every=10"]))
    assert 0 < s["final_eval_accuracy"] <= 1 and math.isfinite(s["final_eval_loss"])
    assert [sorted(p) for p in s["eval_curve"]][0] == sorted(
        ["step", "worker", "eval_loss", "accuracy", "bytes_sent_per_worker", "virtual_time_s"])


def test_frozen_parameters_are_never_sent_and_buffers_are_counted():
    cfg = islands.load_config(None, [*USER, "workers=2", "steps=4", "algorithm.sync_every=2",
                                     "eval_every=4"])
    sim = Simulation(cfg)
    s = sim.run()
    model = sim.workers[0].model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    buffers = sum(b.numel() for b in model.buffers())
    assert sum(p.numel() for p in frozen) == 72 and s["params"] == trainable
    # per sync and worker: two all-reduces (parameters, buffers), each sending half of the
    # fp32 values (2(n-1)/n with n = 2) and 2(n-1) = 2 headers of 16 bytes
    per_sync = (trainable * 4 + 2 * 16) + (buffers * 4 + 2 * 16)
    assert s["bytes_sent_per_worker"] == 2 * per_sync
    from islands.engine import initial_model

    start = initial_model(cfg, sim.task, torch.device("cpu"))
    assert torch.equal(frozen[0], start[0].weight)  # never changed
    assert not torch.equal(model[1].weight, start[1].weight)  # while the rest trained


def test_user_task_by_import_path_trains_under_every_algorithm(tmp_path):
    losses = {}
    for algo in ("ddp", "local_sgd", "diloco"):
        s = islands.simulate(islands.load_config(None, [
            *USER, "workers=2", "steps=100", "algorithm.sync_every=5", "eval_every=50",
            f"algorithm.name={algo}", "task.kwargs={hidden = 12}", "inner.lr=0.01"]),
            tmp_path / algo)
        losses[algo] = s["final_eval_loss"]
        assert s["task"] == "user_mlp" and s["final_eval_accuracy"] > 0.5  # 4 noisy classes
        assert s["eval_curve"][-1]["eval_loss"] < s["eval_curve"][0]["eval_loss"]
        assert "accuracy" in (tmp_path / algo / "metrics.jsonl").read_text()
    file_form = islands.simulate(islands.load_config(None, [
        *USER, "task.name='tests/user_task.py:make_task'", "workers=2", "steps=100",
        "algorithm.sync_every=5", "eval_every=50", "task.kwargs={hidden = 12}",
        "inner.lr=0.01"]))
    assert file_form["final_eval_loss"] == losses["diloco"]


def test_a_task_object_from_python():
    from tests.user_task import make_task

    task = make_task()
    cfg = islands.load_config(None, ["workers=2", "steps=10", "algorithm.sync_every=5",
                                     "data.batch_size=8", "device='cpu'"])
    a = islands.simulate(cfg, task=task)
    b = islands.simulate(cfg, task=make_task())
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert a == b and a["task"] == "user_mlp"


def test_dataset_partitions_deal_every_index_and_skew_by_label():
    x, y = torch.randn(400, 3), torch.arange(400) % 4
    task = islands.from_dataset(nn.Linear(3, 4), TensorDataset(x, y), TensorDataset(x, y),
                                criterion=nn.CrossEntropyLoss())
    for kind in ("iid", "dirichlet", "by_source"):
        part = task.data(4, 0, DataConfig(partition=kind, alpha=0.1, batch_size=8))
        dealt = np.concatenate(part.parts)
        assert sorted(dealt.tolist()) == list(range(400))
    skew = task.data(4, 0, DataConfig(partition="dirichlet", alpha=0.1, batch_size=8))
    label_sets = [set(y[p].tolist()) for p in skew.parts]
    assert min(len(s) for s in label_sets) < 4  # some worker misses some labels
    iid = task.data(4, 0, DataConfig(batch_size=8))
    assert all(set(y[p].tolist()) == {0, 1, 2, 3} for p in iid.parts)


def test_dataset_batches_are_a_function_of_seed_worker_step_and_cover_each_epoch():
    x, y = torch.arange(40.0)[:, None], torch.zeros(40, dtype=torch.long)
    task = islands.from_dataset(nn.Linear(1, 2), TensorDataset(x, y), TensorDataset(x, y),
                                criterion=nn.CrossEntropyLoss())
    a, b = (task.data(2, 7, DataConfig(batch_size=4)) for _ in range(2))
    assert torch.equal(a.batch(1, 3)[0], b.batch(1, 3)[0])
    assert not torch.equal(a.batch(1, 3)[0], task.data(2, 8, DataConfig(batch_size=4))
                           .batch(1, 3)[0])
    # 20 items per worker, batches of 4: steps 0-4 are one epoch, a permutation of the share
    seen = torch.cat([a.batch(0, s)[0] for s in range(5)]).reshape(-1)
    assert sorted(seen.tolist()) == sorted(x[a.parts[0]].reshape(-1).tolist())


def test_the_partitions_that_fix_a_batch_say_its_samples_and_a_loader_says_none():
    """What the coordinator bounds a samples report with (``data.samples_per_step``): every
    batch of the text's and a dataset's partitions holds that many samples, as the task
    counts them; a loader's batches may vary, so it says nothing."""
    cfg = tiny_config()
    text = islands.tasks.ByteGPT(cfg.model, cfg.data, seed=0)
    x, y = torch.arange(30.0)[:, None], torch.zeros(30, dtype=torch.long)  # 15 a worker
    dataset = islands.from_dataset(nn.Linear(1, 2), TensorDataset(x, y), TensorDataset(x, y),
                                   criterion=nn.CrossEntropyLoss())
    for task, part in ((text, text.data(2, 0, cfg.data)),
                       (dataset, dataset.data(2, 0, DataConfig(batch_size=4)))):
        assert {task.batch_size(part.batch(w, s)) for w in (0, 1) for s in range(6)} == {
            part.samples_per_step}
    loader = islands.from_loader(nn.Linear(1, 1), lambda w, n, seed: [(x,)], [(x,)],
                                 loss=lambda m, b: m(b[0]).pow(2).mean())
    assert getattr(loader.data(2, 0, DataConfig()), "samples_per_step", None) is None


def test_dirichlet_without_labels_is_a_clear_error():
    data = [torch.randn(3) for _ in range(50)]  # items without labels
    task = islands.from_dataset(nn.Linear(3, 1), data, data, loss=lambda m, b: m(b).mean())
    with pytest.raises(DataError, match="needs the training labels: pass labels="):
        task.data(2, 0, DataConfig(partition="dirichlet"))


def test_loader_factory_is_deterministic_and_rewinds():
    x = torch.arange(32.0)[:, None]

    def loader(worker, workers, seed):
        g = torch.Generator().manual_seed(seed * 100 + worker)
        return torch.utils.data.DataLoader(TensorDataset(x[worker::workers]), batch_size=4,
                                           shuffle=True, generator=g)

    task = islands.from_loader(nn.Linear(1, 1), loader, [(x,)],
                               loss=lambda m, b: m(b[0]).pow(2).mean())
    part = task.data(2, 3, DataConfig())
    forward = [part.batch(1, s)[0].clone() for s in range(9)]  # crosses two epochs
    assert torch.equal(part.batch(1, 2)[0], forward[2])  # rewound: rebuilt and skipped ahead
    assert part.size(1) == 16


def test_the_configured_aggregator_reaches_the_collective(monkeypatch):
    from dataclasses import dataclass

    from islands.aggregators import mean
    from islands.core import registry
    from islands.core.sections import AggregatorConfig

    calls = []

    def spy(stacked, weights=None):
        calls.append(stacked.shape)
        return mean(stacked, weights)

    @dataclass(frozen=True, kw_only=True)
    class SpyConfig(AggregatorConfig):
        name: str = "spy"

        def build(self):
            return spy

    monkeypatch.setitem(registry._ENTRIES["aggregator"], "spy",
                        registry.Entry("aggregator", "spy", SpyConfig))
    s = islands.simulate(tiny_config("workers=2", "steps=4", "algorithm.sync_every=2",
                                     "aggregator.name=spy"))
    assert len(calls) == 2 * 2 and all(c[0] == 2 for c in calls)  # 2 rounds x 2 shards
    assert s["aggregator"] == "spy"


def _regression(out_features: int = 1, **kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x.sum(1)  # (N,)
    ds = TensorDataset(x, y)
    return islands.from_dataset(lambda: nn.Linear(8, out_features), ds, ds, name="reg",
                                **kwargs)


RUN = ["workers=2", "steps=4", "algorithm.sync_every=2", "eval_every=4", "device=cpu"]


def test_a_loss_that_is_not_a_scalar_names_task_loss_and_its_shape():
    from islands.tasks import checked_loss

    per_sample = _regression(loss=lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2)
    with pytest.raises(TaskError, match=r"Task.loss \(evaluating\) must return a scalar loss "
                                        r"\(a 0-dim floating tensor\); it returned a tensor of "
                                        r"shape \(64,\)"):  # the evaluation at step 0 comes first
        islands.simulate(islands.load_config(None, [*RUN, "data.batch_size=16"]),
                         task=per_sample)
    batch = (torch.randn(16, 8), torch.randn(16))
    with pytest.raises(TaskError, match=r"^Task.loss must return .* shape \(16,\)"):
        checked_loss(per_sample.loss)(nn.Linear(8, 1), batch)  # what each inner step calls
    with pytest.raises(TaskError, match=r"Task.loss \(its criterion, evaluating\) must "):
        _regression(criterion=nn.MSELoss(reduction="none")).evaluate(
            nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)))


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch's own, less specific
def test_an_output_that_broadcasts_against_its_targets_warns_once_with_both_shapes():
    task = _regression(criterion=nn.MSELoss())  # (N, 1) predictions against (N,) targets
    cfg = islands.load_config(None, [*RUN, "data.batch_size=16"])
    with pytest.warns(IslandsWarning, match=r"output has shape \(16, 1\) and the targets "
                                            r"\(16,\); MSELoss broadcasts them to \(16, 16\)") \
            as caught:
        islands.simulate(cfg, task=task)
    assert sum(issubclass(w.category, IslandsWarning) for w in caught) == 1


def test_the_share_sampler_gives_the_simulators_batches_from_any_step():
    from torch.utils.data import DataLoader

    from islands.tasks import ShareSampler

    task = make_task()
    cfg = islands.load_config(None, ["task.name='tests.user_task:make_task'", "workers=3",
                                     "steps=30", "data.batch_size=16",
                                     "data.partition=dirichlet"])
    part = task.data(cfg.workers, cfg.seed, cfg.data)
    at = {"step": 7}
    sampler = ShareSampler(task.train, cfg, 2, start=lambda: at["step"])
    assert len(sampler) == 23 and sampler.size == part.size(2)
    for step, (x, y) in enumerate(DataLoader(task.train, batch_sampler=sampler), start=7):
        want = part.batch(2, step)
        assert torch.equal(x, want[0]) and torch.equal(y, want[1]), step


def test_inner_optimizer_is_the_simulators_decay_on_matrices_warmup_and_cosine():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    cfg = islands.load_config(None, ["steps=100", "inner.warmup_steps=10"])
    opt, sched = islands.inner_optimizer(model, cfg)
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [(4, 4)] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 2 and plain["weight_decay"] == 0.0  # biases, norm's bias
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(3e-4) and lrs[9] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-4, rel=0.01)  # cosine to min_lr_ratio at the end
