"""The scenario runner: many workers in one process, a network model and a virtual clock.

``simulate(cfg)`` is a pure function of the config (and its seed): same losses, same bytes,
same virtual time on every run. It writes the run directory when given one.

Run it: ``islands sim CONFIG.toml --out runs/x`` or ``islands.simulate(cfg, out_dir="runs/x")``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from islands.algorithms import Worker, build_algorithm
from islands.algorithms.base import copy_into
from islands.codecs import build_codec
from islands.collectives.butterfly import Group
from islands.core.config import RunConfig
from islands.core.seeding import derive_seed
from islands.data import ByteData
from islands.metrics.run_dir import RunDir
from islands.models import GPT
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda when available; asking for cuda without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from islands.core.errors import ConfigError

        raise ConfigError("device ('cuda') is not available on this machine; use 'cpu' or 'auto'")
    return torch.device(name)


def make_inner(model: torch.nn.Module, cfg: RunConfig):
    """The inner optimizer (decay on matrices only, as nanoGPT) and its lr schedule."""
    c = cfg.inner
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if c.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas)
    else:
        opt = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)

    def factor(step: int) -> float:
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - c.warmup_steps) / max(1, cfg.steps - c.warmup_steps))
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def initial_model(cfg: RunConfig, device: torch.device) -> GPT:
    """The parameters every worker starts from: the seed's random initialization, trained
    ``init.warm_start_steps`` steps when a warm start is asked for (a function of the config)."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model).to(device)
    if cfg.init.warm_start_steps:
        trained = warm_start(cfg, device)
        with torch.no_grad():
            for p, w in zip(model.parameters(), trained, strict=True):
                p.copy_(w)
    return model


# (seed, model, data, inner, init, device) -> warm-start parameters: the runs of one process
# (the main job's four, a benchmark's grid) train the shared warm start once.
_WARM_STARTS: dict[str, list[torch.Tensor]] = {}


def warm_start(cfg: RunConfig, device: torch.device) -> list[torch.Tensor]:
    """The parameters after ``init.warm_start_steps`` steps of one worker alone.

    The inner optimizer runs at a constant lr after its warm-up (a pretraining that stops
    partway, not one that decayed into a minimum), on every training chunk, with a batch
    stream of its own (seed-derived, so it never replays the batches of the run's workers).
    The validation files are never seen. Cached per process.
    """
    d = cfg.to_dict()
    key = json.dumps([d[k] for k in ("seed", "model", "data", "inner", "init")] + [str(device)],
                     sort_keys=True)
    if key not in _WARM_STARTS:
        steps = cfg.init.warm_start_steps
        pre = cfg.replace(**{"workers": 1, "steps": steps, "inner.schedule": "constant",
                             "init.warm_start_steps": 0})
        data = ByteData(pre.data, workers=1, block_size=pre.model.block_size,
                        seed=derive_seed(cfg.seed, "warm-start"))
        worker = build_worker(pre, data, 0, initial_model(pre, device))
        for step in range(steps):
            x, y = data.train_batch(0, step)
            worker.backward(x.to(device), y.to(device))
            worker.apply()
        _WARM_STARTS[key] = [p.detach().clone() for p in worker.model.parameters()]
    return _WARM_STARTS[key]


def build_worker(cfg: RunConfig, data: ByteData, worker_id: int, base: GPT) -> Worker:
    """One worker: a copy of ``base``, its inner optimizer and schedule, its own codec."""
    model = copy.deepcopy(base)
    opt, sched = make_inner(model, cfg)
    codec = build_codec(cfg.codec)
    codec.bind_layout([p.shape for p in model.parameters() if p.requires_grad])
    return Worker(worker_id, model, opt, codec, scheduler=sched,
                  grad_clip=cfg.inner.grad_clip, dataset_bytes=data.worker_bytes(worker_id))


def build_workers(cfg: RunConfig, data: ByteData, device: torch.device) -> list[Worker]:
    """Identical initial replicas (from the seed), each with its optimizer and codec."""
    base = initial_model(cfg, device)
    return [build_worker(cfg, data, i, base) for i in range(cfg.workers)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, flat: torch.Tensor, batches, device) -> float:
    """Mean validation loss of the parameters ``flat`` (loaded into ``model``)."""
    copy_into(flat, list(model.parameters()))
    model.eval()
    losses = [float(model(x.to(device), y.to(device))[1]) for x, y in batches]
    return sum(losses) / len(losses)


class Simulation:
    """One simulated run. Construct, then :meth:`run`.

    Args:
        cfg: the run's config.
        out_dir: where to write the run directory (None: nowhere).
        on_round: called after every round with a dict of progress facts.
    """

    def __init__(self, cfg: RunConfig, out_dir: str | Path | None = None,
                 on_round: Callable[[dict], None] | None = None) -> None:
        self.cfg = cfg
        self.out = RunDir(out_dir) if out_dir is not None else None
        self.on_round = on_round

    def run(self) -> dict:
        cfg, started = self.cfg, time.perf_counter()
        device = resolve_device(cfg.device)
        data = ByteData(cfg.data, workers=cfg.workers, block_size=cfg.model.block_size,
                        seed=cfg.seed)
        workers = build_workers(cfg, data, device)
        algorithm = build_algorithm(cfg)
        for w in workers:
            algorithm.attach(w)
        clock = VirtualClock(cfg.workers)
        network = NetworkModel.from_config(cfg.network)
        transport = SimTransport(cfg.workers, network, clock)
        everyone = Group(transport, tuple(range(cfg.workers)))
        step_time = {w.id: w.step_time_s for w in cfg.compute.worker}
        eval_model = copy.deepcopy(workers[0].model)
        val = data.val_batches()
        if self.out:
            self.out.start(cfg)

        H = algorithm.sync_every
        rounds = math.ceil(cfg.steps / H)
        curve = [self._eval_point(0, algorithm, workers, eval_model, val, device, transport,
                                  clock, freshest=0)]
        last_loss = float("nan")
        for r in range(rounds):
            ids = algorithm.participants(r, everyone.members)
            algorithm.begin_round(everyone, workers, r)
            active = [workers[i] for i in ids]
            group = Group(transport, ids)
            sent0, recv0 = list(transport.bytes_sent), list(transport.bytes_received)
            first, last = r * H, min(cfg.steps, (r + 1) * H)
            losses = {w.id: [] for w in active}
            for step in range(first, last):
                for w in active:
                    x, y = data.train_batch(w.id, step)
                    losses[w.id].append(w.backward(x.to(device), y.to(device)))
                    clock.compute(w.id, step_time.get(w.id, cfg.compute.step_time_s))
                algorithm.after_backward(group, active)
                for w in active:
                    w.apply()
            algorithm.sync(group, active, r)
            last_loss = sum(sum(v) / len(v) for v in losses.values()) / len(losses)
            point = None
            if last // cfg.eval_every > first // cfg.eval_every or r == rounds - 1:
                point = self._eval_point(last, algorithm, workers, eval_model, val, device,
                                         transport, clock, freshest=ids[0])
                curve.append(point)
            if self.out:
                self.out.log_round(r, last, ids, losses, transport, sent0, recv0, clock, point)
            if self.on_round:
                self.on_round({"round": r + 1, "rounds": rounds, "step": last,
                               "train_loss": last_loss,
                               "eval_loss": curve[-1]["eval_loss"],
                               "bytes_sent_per_worker": sum(transport.bytes_sent) / cfg.workers})

        summary = self._summary(curve, last_loss, rounds, transport, clock, workers,
                                time.perf_counter() - started)
        self.final_params = algorithm.global_state(workers[curve[-1]["worker"]]).clone()
        self.shared_states = [algorithm.shared_state(w) for w in workers]
        if self.out:
            self.out.finish(summary)
        return summary

    @staticmethod
    def _eval_point(step, algorithm, workers, eval_model, val, device, transport, clock,
                    freshest) -> dict:
        flat = algorithm.global_state(workers[freshest])
        return {"step": step, "worker": freshest,
                "eval_loss": evaluate(eval_model, flat, val, device),
                "bytes_sent_per_worker": sum(transport.bytes_sent) / len(workers),
                "virtual_time_s": clock.makespan_s}

    def _summary(self, curve, last_loss, rounds, transport, clock, workers, wall) -> dict:
        cfg = self.cfg
        n = cfg.workers
        return {
            "name": cfg.label,
            "algorithm": cfg.algorithm.name,
            "workers": n,
            "steps": cfg.steps,
            "rounds": rounds,
            "sync_every": 1 if cfg.algorithm.name == "ddp" else cfg.algorithm.sync_every,
            "codec": cfg.codec.name,
            "params": sum(p.numel() for p in workers[0].params),
            "final_eval_loss": curve[-1]["eval_loss"],
            "final_train_loss": last_loss,
            "bytes_sent_per_worker": sum(transport.bytes_sent) / n,
            "bytes_received_per_worker": sum(transport.bytes_received) / n,
            "bytes_sent_by_worker": list(transport.bytes_sent),
            "bytes_sent_total": sum(transport.bytes_sent),
            "virtual_time_s": clock.makespan_s,
            "compute_utilization": clock.utilization(),
            "eval_curve": curve,
            "wall_time_s": wall,
            "seed": cfg.seed,
        }


def simulate(cfg: RunConfig, out_dir: str | Path | None = None,
             on_round: Callable[[dict], None] | None = None) -> dict:
    """Runs one simulation and returns its summary (see :class:`Simulation`)."""
    return Simulation(cfg, out_dir, on_round).run()
