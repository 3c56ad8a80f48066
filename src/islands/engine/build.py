"""Building a run's pieces from its config: the task, the device, the workers' initial model,
inner optimizers and codecs, the shared warm start; :func:`check_config`, which builds each
component once so a bad setting fails before anything runs, naming its key; and
:func:`assemble`, the one builder of a run's engine and workers, for the simulator, a runtime
worker and the drop-in alike.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from islands.algorithms import Algorithm, Worker, build_algorithm, check_algorithm
from islands.algorithms.schedule import h_at
from islands.codecs import Codec, build_codec
from islands.core.config import RunConfig
from islands.core.errors import ConfigError, IslandsWarning
from islands.core.sections import InnerConfig
from islands.core.seeding import derive_seed
from islands.engine.attacks import Attack
from islands.engine.loop import Engine
from islands.engine.muon import MuonAdamW, hidden_matrices
from islands.metrics.run_dir import RunDir
from islands.tasks import Partition, Task, build_task, checked_loss, to_device
from islands.transports.base import Transport


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda when available; asking for cuda without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device ('cuda') is not available on this machine; use 'cpu' or 'auto'")
    return torch.device(name)


def resolve_threads(cfg: RunConfig, device: torch.device) -> int | None:
    """The CPU thread count ``threads`` asks for (``auto``: 1 on the CPU, torch's default on a
    GPU; ``torch``: None, leave torch alone; see :class:`~islands.core.config.RunConfig`)."""
    if cfg.threads == "torch":
        return None
    if cfg.threads != "auto":
        return int(cfg.threads)
    return 1 if device.type == "cpu" else torch.get_num_threads()


@contextlib.contextmanager
def threads(cfg: RunConfig, device: torch.device):
    """Runs the block with :func:`resolve_threads` torch threads, then restores the count."""
    before, wanted = torch.get_num_threads(), resolve_threads(cfg, device)
    if wanted is not None:
        torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        if wanted is not None:
            torch.set_num_threads(before)


def check_config(cfg: RunConfig, task: Task | None = None) -> Task:
    """Builds every component a config names once (task, codec, algorithm, aggregator,
    device), so a bad setting fails before anything runs; returns the task. (Settings no
    chosen component reads were refused when the config was loaded.)

    Raises:
        ConfigError: naming the key, the value and the fix.
    """
    run_codec(cfg)
    _check_rows(cfg, check_algorithm(cfg))
    _check_verify(cfg)
    resolve_device(cfg.device)
    _warn_rounds(cfg)
    task = task if task is not None else build_task(cfg)
    if cfg.attack.name != "none":
        _check_attack(cfg)
        Attack(cfg.attack, cfg.workers, classes=getattr(task, "classes", None))
    return task


def _check_rows(cfg: RunConfig, algorithm) -> None:
    """Refuses a rule that a sync's rows cannot carry from the start (Krum's ``f`` with
    fewer than ``2f + 3`` of them, a trim that cuts every row): a sync aggregates the round's
    participants (all workers, or FedAvg's sample). With fewer rows later (bans, clones) the
    rule tolerates what they allow."""
    rows = len(algorithm.participants(0, tuple(range(cfg.workers))))
    breakdown = getattr(algorithm.aggregator, "breakdown", None)  # (the mean: a function)
    try:
        if breakdown is not None:
            breakdown(rows)
    except NotImplementedError:  # a rule that does not say
        pass
    except ValueError as e:
        raise ConfigError(f"aggregator.name = {cfg.aggregator.name!r} with {rows} rows a sync "
                          f"(workers = {cfg.workers}): {e}") from None


def _check_attack(cfg: RunConfig) -> None:
    """Refuses an attack on an algorithm whose syncs the simulator cannot yet carry out again
    without a refused sender."""
    a, name = cfg.algorithm, cfg.attack.name
    if a.name == "async_local_sgd":
        raise ConfigError("attack.name: attacks on async_local_sgd are not supported yet "
                          "(its posts bypass the round's collectives); use a synchronous "
                          "algorithm or attack.name = 'none'")
    if getattr(a, "overlap", "none") != "none" or a.name == "streaming_diloco":
        raise ConfigError(f"attack.name ({name!r}) with a sync that overlaps the next round "
                          f"({a.name}) is not supported yet: use blocking diloco")
    refused = name in ("nan", "forged_weight", "lying_aggregator")  # banned mid-sync
    if refused and (a.name == "ddp" or getattr(a, "ddp_steps", 0)):
        raise ConfigError(f"attack.name ({name!r}) is refused mid-step, which a data-parallel "
                          "step cannot yet be carried out again after: use diloco (with "
                          "ddp_steps = 0) or another attack")


def _check_verify(cfg: RunConfig) -> None:
    """A verifier recomputes a shard's aggregate bit for bit: only from lossless payloads and
    with a rule that carries no state."""
    if not cfg.aggregator.verify:
        return
    codec, rule = run_codec(cfg), cfg.aggregator.build()
    if codec.raw_tensor is None:
        raise ConfigError(f"aggregator.verify ({cfg.aggregator.verify}) needs a lossless codec "
                          f"(the verifier recomputes the aggregate bit for bit); codec "
                          f"{codec!r} is not: use codec.name = 'identity', or verify = 0")
    if getattr(rule, "stateful", False):
        raise ConfigError(f"aggregator.verify ({cfg.aggregator.verify}): {rule!r} carries "
                          "state from round to round, so another member cannot recompute its "
                          "aggregate; use algorithm.collective = 'all_gather' (every member "
                          "aggregates every row itself: no owner to trust) or another rule")


def _warn_rounds(cfg: RunConfig) -> None:
    """Warns where the round settings would silently not do what they say."""
    a = cfg.algorithm
    if not hasattr(a, "sync_every"):  # DDP: every step is a round
        return
    ddp_steps = getattr(a, "ddp_steps", 0)
    if ddp_steps >= cfg.steps:
        warnings.warn(IslandsWarning(
            f"algorithm.ddp_steps ({ddp_steps}) >= steps ({cfg.steps}): the whole run is "
            "the data-parallel phase and no DiLoCo round happens; lower it"), stacklevel=3)
        return
    first = h_at(a.sync_every, ddp_steps)
    if ddp_steps + first <= cfg.steps:
        return
    if isinstance(a.sync_every, int) and not ddp_steps:
        warnings.warn(IslandsWarning(
            f"algorithm.sync_every ({a.sync_every}) > steps ({cfg.steps}): no round of "
            f"{a.sync_every} inner steps completes; the run is one shortened round of "
            f"{cfg.steps} steps ending in the only sync"), stacklevel=3)
    else:
        warnings.warn(IslandsWarning(
            f"algorithm.sync_every: the first round after step {ddp_steps} has H = {first} "
            f"but only {cfg.steps - ddp_steps} steps are left (steps = {cfg.steps}); the "
            "run ends in one shortened round"), stacklevel=3)


def run_codec(cfg: RunConfig) -> Codec:
    """A fresh codec for one worker: the one ``[codec]`` names, or the algorithm's own
    (SparseLoCo's compressor; ``AlgorithmConfig.wire_codec``)."""
    return build_codec(cfg.algorithm.wire_codec(cfg.codec))


def inner_optimizer(model: nn.Module, cfg: RunConfig):
    """The inner optimizer and lr schedule the simulator builds for ``cfg``: ``[inner]``'s
    AdamW (betas, weight decay on parameters of 2+ dimensions only, as nanoGPT), SGD, or Muon
    on the hidden matrices with AdamW on the rest (:class:`~islands.engine.muon.MuonAdamW`,
    one optimizer: its groups are Muon's, then AdamW's with and without weight decay), and a
    ``LambdaLR`` of the linear warm-up then the constant or cosine schedule over ``steps``.
    Step the scheduler once per inner step (``trainer.step()`` does, and clips at
    ``inner.grad_clip``). Frozen parameters (``requires_grad=False``) are left out.

    Returns:
        ``(optimizer, scheduler)``.
    """
    c = cfg.inner
    opt = _optimizer(model, c)

    def factor(step: int) -> float:
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - c.warmup_steps) / max(1, cfg.steps - c.warmup_steps))
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _optimizer(model: nn.Module, c: InnerConfig) -> torch.optim.Optimizer:
    """``[inner]``'s optimizer over the trainable parameters (see :func:`inner_optimizer`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    muon = {id(p) for p in hidden_matrices(model)} if c.optimizer == "muon" else set()
    rest = [p for p in trainable if id(p) not in muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas)
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)
    if not muon:
        warnings.warn(IslandsWarning(
            f"inner.optimizer ('muon'): {type(model).__name__} has no hidden matrices (weights "
            "of nn.Linear layers other than the last and than embeddings), so AdamW trains "
            "every parameter; use 'adamw' to say so"), stacklevel=3)
    return MuonAdamW([{"params": [p for p in trainable if id(p) in muon],
                       "weight_decay": c.weight_decay}], groups,
                     lr=c.lr, betas=c.betas, momentum=c.muon_momentum, ns_steps=c.muon_ns_steps)


def initial_model(cfg: RunConfig, task: Task, device: torch.device, *,
                  task_key: str | None = None) -> nn.Module:
    """The model every worker starts from: the task's model built right after seeding torch
    with the run's seed, trained ``init.warm_start_steps`` steps when a warm start is asked
    for (so a function of the config and the task).

    Args:
        task_key: identifies the task for the warm-start cache (default: its config).
    """
    torch.manual_seed(cfg.seed)
    model = task.model().to(device)
    if cfg.init.warm_start_steps:
        model.load_state_dict(warm_start(cfg, task, device, task_key=task_key))
    return model


# (seed, task, model, data, inner, init, device) -> warm-start state: the runs of one process
# (the main job's four, a benchmark's grid) train the shared warm start once.
_WARM_STARTS: dict[str, tuple[Task, dict[str, torch.Tensor]]] = {}


def warm_start(cfg: RunConfig, task: Task, device: torch.device, *,
               task_key: str | None = None) -> dict[str, torch.Tensor]:
    """The model's state after ``init.warm_start_steps`` steps of one worker alone.

    The inner optimizer runs at a constant lr after its warm-up (a pretraining that stops
    partway, not one that decayed into a minimum), on all the training data, with a batch
    stream of its own (seed-derived, so it never replays the batches of the run's workers).
    The validation data is never seen. Cached per process.
    """
    steps = cfg.init.warm_start_steps
    # one worker alone: the run's per-worker settings (links, step times, faults) name
    # workers it does not have
    pre = cfg.replace(**{"workers": 1, "steps": steps, "inner.schedule": "constant",
                         "init.warm_start_steps": 0, "network.worker": [],
                         "compute.worker": [], "faults": [], "attack.name": "none",
                         "inner.optimizer": cfg.init.warm_start_optimizer or cfg.inner.optimizer})
    d = pre.to_dict()
    key = json.dumps([d[k] for k in ("seed", "task", "model", "data", "inner")]
                     + [steps, str(device), task_key, torch.get_num_threads()], sort_keys=True,
                     default=str)  # (the thread count changes the float sums)
    if key not in _WARM_STARTS:
        data = task.data(1, derive_seed(cfg.seed, "warm-start"), pre.data)
        worker = build_worker(pre, 0, initial_model(pre, task, device), data_size=0)
        for step in range(steps):
            batch = to_device(data.batch(0, step), device)
            worker.backward(checked_loss(task.loss), batch, task.batch_size(batch))
            worker.apply()
        state = {k: v.detach().clone() for k, v in worker.model.state_dict().items()}
        _WARM_STARTS[key] = (task, state)  # the task is kept so its id is never reused
    return _WARM_STARTS[key][1]


def build_worker(cfg: RunConfig, worker_id: int, base: nn.Module, *, data_size: int) -> Worker:
    """One worker: a copy of ``base``, its inner optimizer and schedule, its own codec."""
    model = copy.deepcopy(base)
    opt, sched = inner_optimizer(model, cfg)
    codec = run_codec(cfg)
    codec.bind_layout([p.shape for p in model.parameters() if p.requires_grad])
    return Worker(worker_id, model, opt, codec, scheduler=sched,
                  grad_clip=cfg.inner.grad_clip, data_size=data_size)


def fresh_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The shared state of a worker of ``model`` before any round (what
    ``Algorithm.shared_state`` gives once it is built and attached: no outer state yet)."""
    probe = Worker(-1, model, None, None)
    state = {"global_params": probe.flat_params()}
    if probe.buffers:
        state["global_buffers"] = probe.flat_buffers()
    return state


def attach(algorithm: Algorithm, worker: Worker) -> None:
    """Prepares ``worker`` for ``algorithm``: its global state, and its committed buffers."""
    algorithm.attach(worker)
    flat = worker.flat_buffers()
    worker.global_buffers = None if flat is None else flat.clone()


@dataclass
class Assembly:
    """A run's pieces, built once from its config by :func:`assemble`, the same way wherever
    the run happens: the simulator (every worker in one process), a runtime worker (one) and
    the drop-in (the user's model and optimizer).

    Attributes:
        algorithm: the run's algorithm; every worker built here is attached to it.
        base: the model every worker starts from (the drop-in: the user's model itself).
        device: where the model and batches live.
        task: trains and evaluates (None: the user's own loop).
        partition: the task's training data for ``cfg.workers`` workers (None without one).
    """

    cfg: RunConfig
    algorithm: Algorithm
    base: nn.Module
    device: torch.device
    task: Task | None = None
    partition: Partition | None = None

    def worker(self, worker_id: int) -> Worker:
        """Worker ``worker_id`` of a task's run: a copy of the initial model with the run's
        inner optimizer and codec, attached to the algorithm."""
        w = build_worker(self.cfg, worker_id, self.base,
                         data_size=self.partition.size(worker_id))
        attach(self.algorithm, w)
        return w

    def user_worker(self, worker_id: int, optimizer: torch.optim.Optimizer, scheduler, *,
                    data_size: int) -> Worker:
        """The drop-in's worker: the user's model (``base``, not a copy) and optimizer, with
        the run's codec, attached to the algorithm."""
        codec = run_codec(self.cfg)
        codec.bind_layout([p.shape for p in self.base.parameters() if p.requires_grad])
        w = Worker(worker_id, self.base, optimizer, codec, scheduler=scheduler,
                   grad_clip=self.cfg.inner.grad_clip, data_size=data_size)
        attach(self.algorithm, w)
        return w

    def engine(self, transport: Transport, workers: list[Worker], clock, *,
               out: RunDir | None = None, step_time_s: dict[int, float] | None = None,
               evaluate: Callable[[nn.Module], dict] | None = None) -> Engine:
        """The run's engine over ``workers`` (those this process drives; a runtime worker
        adds its own once built), with a copy of the initial model to evaluate on (the
        user's loop: only with ``evaluate``)."""
        evaluates = self.task is not None or evaluate is not None
        return Engine(self.cfg, self.algorithm, transport, workers, task=self.task,
                      partition=self.partition, device=self.device, clock=clock,
                      step_time_s=step_time_s,
                      eval_model=copy.deepcopy(self.base) if evaluates else None, out=out,
                      evaluate=evaluate)


def assemble(cfg: RunConfig, task: Task | None = None, *, model: nn.Module | None = None,
             task_key: str | None = None) -> Assembly:
    """A run's pieces from its config: with a ``task`` (checked by :func:`check_config`), its
    data for ``cfg.workers`` workers and the initial model (seeded, warm-started); with the
    user's ``model`` instead (the drop-in), that model on its own device.

    Args:
        task_key: identifies the task for the warm-start cache (default: its config).
    """
    if (task is None) == (model is None):
        raise ValueError("assemble() takes a task or the user's model, exactly one")
    if model is not None:
        return Assembly(cfg, build_algorithm(cfg), model, next(model.parameters()).device)
    device = resolve_device(cfg.device)
    partition = task.data(cfg.workers, cfg.seed, cfg.data)
    base = initial_model(cfg, task, device, task_key=task_key)
    return Assembly(cfg, build_algorithm(cfg), base, device, task, partition)
