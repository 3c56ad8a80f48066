"""The worker and the algorithm interface shared by every member of the DiLoCo family.

A :class:`Worker` is one model replica with its inner optimizer, its codec and its copy of the
committed global state. An :class:`Algorithm` never calls a collective itself; it says

* **contribute**: what each worker puts into the round's collectives (a flat tensor, its
  weight, a tag; :class:`Contribution`), and
* **apply**: what the worker does with the reduced results (an outer optimizer step, a load),

and the engine (``islands.engine``) issues the collectives with the worker's codec and the
algorithm's aggregator, gets back handles, waits on them and calls ``apply``. A blocking
algorithm's handles are waited on at once; an overlapped one (``overlaps``) has its round's
collectives cross the wire during the next round, which starts where :meth:`Algorithm.restart`
puts it. The simulator drives all workers in one process, the
real runtime one per process; both go through the same engine:

    bounds = algorithm.round_bounds(steps)                  # once: where each round starts
    for each round r:
        algorithm.begin_round(group_of_all, workers, r)    # e.g. an outer lr schedule
        algorithm.refresh(r, members)                      # stale workers get the state
        for each of the round's inner steps s:
            worker.backward(loss, batch) for each participant
            if algorithm.syncs_gradients_at(s): contribute -> reduce -> apply   (DDP)
            worker.apply() for each participant
        if the round's last step synced gradients: algorithm.after_gradient_round(worker)
        else: contribute -> reduce -> apply                 (the round's sync)

Model state beyond parameters: persistent buffers (BatchNorm's running statistics) are part of
every sync (the engine averages them with the contribution's weights, exact fp32) and of the
shared state; parameters with ``requires_grad=False`` are never sent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parameters_to_vector

from islands.aggregators import mean
from islands.algorithms import schedule
from islands.algorithms.schedule import SyncEvery
from islands.codecs.base import Codec
from islands.core import memory

Aggregator = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@torch.no_grad()
def copy_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copies consecutive slices of ``flat`` into ``tensors`` in place (cast to their dtype;
    rounded for integer tensors such as BatchNorm's ``num_batches_tracked``).

    Unlike ``vector_to_parameters`` this never makes the tensors views of ``flat``: a worker's
    parameters aliasing the global state would let inner steps silently rewrite it.
    """
    offset = 0
    for t in tensors:
        n = t.numel()
        piece = flat[offset:offset + n].view_as(t)
        t.copy_(piece if t.is_floating_point() else piece.round())
        offset += n
    assert offset == flat.numel(), (offset, flat.numel())


def persistent_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers saved in ``state_dict`` (running statistics), in registration order;
    non-persistent buffers (constant masks, caches) are not model state and never synced."""
    keys = set(model.state_dict(keep_vars=True))
    return [b for name, b in model.named_buffers() if name in keys]


def load_buffers(worker: Worker, state: dict[str, torch.Tensor], reset: bool) -> None:
    """The committed buffers of a shared state (if it has any), into the worker's copy and,
    with ``reset``, into its model."""
    if "global_buffers" in state:
        worker.global_buffers = state["global_buffers"].detach().clone()
        if reset:
            worker.load_flat_buffers(worker.global_buffers)


class Worker:
    """One replica: model, inner optimizer and schedule, codec, committed global state.

    Args:
        id: worker index.
        model: this worker's model replica.
        inner: its inner optimizer (state kept across rounds, never synchronized).
        codec: its codec (may hold per-worker state such as error-feedback residuals).
        scheduler: optional lr scheduler stepped once per inner step.
        grad_clip: max gradient norm, or None.
        data_size: size of the worker's data partition (FedAvg's n_k).
    """

    def __init__(self, id: int, model: nn.Module, inner: torch.optim.Optimizer, codec: Codec,
                 *, scheduler=None, grad_clip: float | None = None, data_size: int = 0) -> None:
        self.id = id
        self.model = model
        self.inner = inner
        self.codec = codec
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.data_size = data_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = persistent_buffers(model)
        self.global_params: torch.Tensor | None = None  # committed global state, flat
        self.global_buffers: torch.Tensor | None = None  # committed buffers, flat fp32
        self.outer: torch.optim.Optimizer | None = None
        self.samples = 0  # samples trained since the last sync
        self.steps = 0  # inner steps taken in total
        self._kept: dict[str, torch.Tensor] = {}

    def kept(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of ``like``'s length, dtype and device, the same one at each call for
        ``name`` (a new one when those change): a collective's result written into it
        spares new pages at every sync (:attr:`Contribution.out`). Its values are the last
        writer's."""
        return memory.kept(self._kept, name, like.numel(), like.dtype, like.device)

    def flat_params(self) -> torch.Tensor:
        return parameters_to_vector(self.params).detach()

    def load_flat(self, flat: torch.Tensor) -> None:
        """Copies ``flat`` into the parameters (never aliases: ``flat`` stays untouched)."""
        copy_into(flat, self.params)

    def flat_grads(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.params])

    def load_flat_grads(self, flat: torch.Tensor) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        copy_into(flat, [p.grad for p in self.params])

    def flat_buffers(self) -> torch.Tensor | None:
        """The persistent buffers as one fp32 vector (None: the model has none)."""
        if not self.buffers:
            return None
        return torch.cat([b.detach().reshape(-1).float() for b in self.buffers])

    def load_flat_buffers(self, flat: torch.Tensor) -> None:
        copy_into(flat, self.buffers)

    def backward(self, loss_fn: Callable[[nn.Module, object], torch.Tensor], batch,
                 samples: int) -> float:
        """Forward and backward of ``loss_fn(model, batch)``; returns the loss. Gradients stay
        in ``.grad``; ``samples`` counts toward FedAvg's sample weights."""
        self.model.train()
        loss = loss_fn(self.model, batch)
        self.inner.zero_grad(set_to_none=False)
        loss.backward()
        self.samples += samples
        return float(loss.detach())

    def apply(self) -> None:
        """Clips and applies the gradients in ``.grad`` with the inner optimizer."""
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.inner.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1


@dataclass
class Contribution:
    """What one worker puts into one collective of a sync.

    Attributes:
        tensor: flat 1-D tensor, the same length on every worker.
        weight: aggregation weight (None: the plain mean, every worker alike; then every
            worker of the collective must give None).
        tag: names the stream (keys codec state such as error-feedback residuals).
        collective: how the engine combines it: ``"all_reduce"`` (the butterfly: each shard
            aggregated by its owner, then re-encoded and gathered), ``"all_gather"`` (each
            worker's whole tensor to every other, encoded once, the aggregator over whole
            rows on every worker: sparse contributions, whole-vector rules) or
            ``"neighbours"`` (gossip: the worker's row of a mixing matrix applied to what its
            neighbours send, :mod:`islands.collectives.neighbours`; no aggregator, no weight).
        mixing: ``"neighbours"``: this worker's row of the mixing matrix, ``{worker j: W_ij}``
            (itself included; the weights sum to 1).
        send_to: ``"neighbours"``: the workers whose rows name this one (its receivers).
        steps: ``"neighbours"``: gossip steps (each one exchange on the last one's result).
        segments: ``"neighbours"``: the lengths of the tensors ``tensor`` joins, to correct
            each one's variance after mixing (variance-corrected averaging); empty: none.
        out: ``"all_reduce"``: a buffer of ``tensor``'s length the result may be written
            into, kept by the algorithm from sync to sync (:meth:`Worker.kept`), where its
            ``apply`` holds nothing of the result after it returns and no other sync of the
            tag is in flight; None: a new tensor each sync.
    """

    tensor: torch.Tensor
    weight: float | None = None
    tag: str = "all-reduce"
    collective: str = "all_reduce"
    mixing: dict[int, float] | None = None
    send_to: tuple[int, ...] = ()
    steps: int = 1
    segments: tuple[int, ...] = ()
    out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.collective not in COLLECTIVES:
            raise ValueError(f"collective ({self.collective!r}) must be one of {COLLECTIVES}")
        if (self.collective == "neighbours") != (self.mixing is not None):
            raise ValueError("a 'neighbours' contribution, and only one, needs its mixing row")


# what a Contribution may ask the engine for: a collective over every member, or gossip
GLOBAL_COLLECTIVES = ("all_reduce", "all_gather")
COLLECTIVES = (*GLOBAL_COLLECTIVES, "neighbours")


class Algorithm(ABC):
    """A member of the DiLoCo family. Subclasses set ``name`` and implement
    :meth:`contribute` and :meth:`apply`.

    Args:
        sync_every: inner steps per round (H): an int, or an H schedule ``[[step, H], ...]``
            (see :mod:`islands.algorithms.schedule`).
        aggregator: combines each shard's contributions (see ``islands.aggregators``).

    Attributes:
        syncs_gradients: the sync runs between backward and the optimizer step of every
            inner step (DDP), not once at the end of the round; :meth:`syncs_gradients_at`
            may say so for some steps only (a data-parallel phase).
    """

    name = "algorithm"
    syncs_gradients = False
    # every member holds the same global parameters after a committed round (hashed,
    # transferred to joiners); False for gossip: each worker's are its own, and the run
    # evaluates their average and reports the consensus distance
    shares_parameters = True
    # after the run's last round, every member's global parameters are averaged exactly
    # (a gossip run's single final merge)
    final_merge = False
    overlaps = False  # the round's sync lands during the next round (see restart)
    # no rounds: each worker posts its update when it finishes (the engine's asynchronous
    # loop; see islands.algorithms.asynchronous)
    asynchronous = False
    # an overlapping algorithm's sync lands this many inner steps after it is issued (None:
    # at the end of the next round, before that round's own sync is issued)
    overlap_steps: int | None = None

    def __init__(self, sync_every: SyncEvery, *, aggregator: Aggregator = mean) -> None:
        schedule.check_sync_every(sync_every)
        self.sync_every = sync_every
        self.aggregator = aggregator

    def syncs_gradients_at(self, step: int) -> bool:
        """Whether inner step ``step`` (0-based, of the run) all-reduces gradients between
        backward and the optimizer step; such a step is a round of its own."""
        return self.syncs_gradients

    def round_bounds(self, steps: int) -> list[int]:
        """The inner step each round starts at, then ``steps`` (the engine asks once)."""
        return schedule.round_bounds(steps, self.sync_every, self.syncs_gradients_at)

    def after_gradient_round(self, worker: Worker) -> None:
        """After a round whose step all-reduced gradients (no round sync): every replica
        holds the same parameters, which an algorithm with its own copy of the global state
        takes as committed (nothing is sent)."""

    def attach(self, worker: Worker) -> None:
        """Prepares a worker's algorithm state (called once, before the first round)."""
        worker.global_params = worker.flat_params().clone()

    def participants(self, round: int, workers: tuple[int, ...]) -> tuple[int, ...]:
        """The workers that train in ``round`` (all of them unless overridden)."""
        return workers

    def begin_round(self, group, workers: list[Worker], round: int) -> None:
        """Runs before a round's inner steps, on the group of all workers."""

    def refresh(self, round: int, members: tuple[int, ...]
                ) -> tuple[int, tuple[int, ...]] | None:
        """``(source, stale workers)``: workers whose global state is out of date before
        ``round`` (they sat the last round out), to receive it from ``source``; the engine
        broadcasts it (exact fp32, counted). None: nobody (the default)."""
        return None

    @abstractmethod
    def contribute(self, worker: Worker, observers: tuple[int, ...] = ()
                   ) -> list[Contribution]:
        """What ``worker`` puts into this sync's collectives, in order.

        Args:
            observers: members of the collective that joined mid-round (they hold the
                committed state and trained nothing): they must weigh 0, and every member
                then gives a weight so all aggregate alike. Only when :meth:`can_observe`.
        """

    @abstractmethod
    def apply(self, worker: Worker, reduced: list[torch.Tensor]) -> None:
        """Applies the reduced results (one per contribution, in order) to ``worker``."""

    def can_observe(self) -> bool:
        """Whether a worker can join a round in flight as a weight-0 observer."""
        return False

    def weight(self, worker: Worker) -> float | None:
        """The aggregation weight ``worker`` contributes with this round, by the algorithm's
        rule (None: the plain mean, every worker alike). The real runtime reports it to the
        coordinator at ``ready``; every receiver then holds each sender to the weight the
        coordinator recorded, never to the sender's own header."""
        return None

    def syncs_again(self, worker: Worker) -> bool:
        """After a blocking sync was applied: whether the round syncs once more (a second
        exchange that needs the first one's result; ``contribute`` then says what it sends).
        False by default."""
        return False

    def restart(self, worker: Worker, settled: bool, averaged: int = 1) -> None:
        """An overlapped algorithm (``overlaps``), after its round's contribution is issued:
        puts the worker where the next round starts. ``settled``: the round's own result has
        landed (the run's last round); otherwise only the previous round's has, and the
        sync in flight combines ``averaged`` members' contributions."""
        raise NotImplementedError(f"{self.name} does not overlap its sync")

    def adopt_in_flight(self, joiner: Worker, member: Worker) -> None:
        """An overlapped algorithm: ``joiner`` took the committed state from ``member`` while
        a sync ``member`` issued is in flight, and will apply its result when it lands (the
        simulator's fault plan); it takes what it needs of ``member``'s bookkeeping for that
        (nothing by default)."""

    def global_state(self, worker: Worker) -> torch.Tensor:
        """The committed global parameters as this worker holds them (flat, fp32)."""
        assert worker.global_params is not None, "attach() the worker first"
        return worker.global_params.detach()

    def shared_state(self, worker: Worker) -> dict[str, torch.Tensor]:
        """Everything that must be identical on every worker after a committed round."""
        state = {"global_params": self.global_state(worker)}
        if worker.global_buffers is not None:
            state["global_buffers"] = worker.global_buffers
        if worker.outer is not None:  # what load_shared_state installs back (outer/<key>)
            for k, v in sorted(worker.outer.state[worker.global_params].items()):
                if torch.is_tensor(v):
                    state[f"outer/{k}"] = v
        return state

    def handover(self, worker: Worker) -> dict[str, torch.Tensor]:
        """What a joiner adopts from ``worker``: the shared state, or, where each worker's
        parameters are its own (``shares_parameters`` False: gossip), that worker's own
        global parameters, buffers and outer state (the same fields)."""
        if self.shares_parameters:
            return self.shared_state(worker)
        return Algorithm.shared_state(self, worker)

    @torch.no_grad()
    def load_shared_state(self, worker: Worker, state: dict[str, torch.Tensor], *,
                          reset_params: bool = True) -> None:
        """Installs ``state`` (another worker's :meth:`shared_state`) as ``worker``'s: the
        global parameters and buffers, and the outer optimizer's state (``outer/<key>``).

        Args:
            reset_params: also load the global parameters into the model (a joiner, an
                abort), not only the committed copy.
        """
        flat = state["global_params"].detach().clone()
        load_buffers(worker, state, reset_params)
        if isinstance(worker.global_params, nn.Parameter):
            worker.global_params.copy_(flat)
        else:
            worker.global_params = flat
        if worker.outer is not None:
            slot = worker.outer.state[worker.global_params]
            slot.clear()
            for k, v in state.items():
                if k.startswith("outer/"):
                    slot[k[len("outer/"):]] = v.detach().clone()
        if reset_params:
            worker.load_flat(flat)
