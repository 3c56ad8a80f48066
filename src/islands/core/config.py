"""Typed run configuration: frozen, keyword-only dataclasses loadable from TOML.

A run is a :class:`RunConfig` built in Python, loaded from a TOML file with :func:`load_config`,
and adjusted with dotted overrides (``algorithm.sync_every=100``). Every unknown key, wrong type
or out-of-range value raises :class:`~islands.core.errors.ConfigError` naming the dotted key,
the value and what is allowed, before anything runs. ``None`` means off.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from islands.core.errors import ConfigError


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} ({value!r}) {rule}")


BUILTIN_TASKS = ("byte_gpt", "digits_cnn")


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What is trained: a built-in task or the user's own (see ``islands.tasks``).

    Attributes:
        name: ``"byte_gpt"`` (a byte-level GPT on text, configured by ``[model]`` and
            ``[data]``), ``"digits_cnn"`` (a small CNN with BatchNorm on scikit-learn's bundled
            8x8 digits), or the import path of a factory that returns a ``Task``:
            ``"mypkg.tasks:make_task"`` or ``"path/to/tasks.py:make_task"``.
        kwargs: keyword arguments passed to the task's factory, as a TOML table
            (``[task.kwargs]``).
    """

    name: str = "byte_gpt"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.name in BUILTIN_TASKS or ":" in self.name, "task.name", self.name,
               f"must be one of {list(BUILTIN_TASKS)} or an import path 'module:factory' "
               "(e.g. 'mypkg.tasks:make_task' or 'tasks.py:make_task')")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Byte-level GPT (nanoGPT-like), the ``byte_gpt`` task's model. Defaults stay under 2M
    parameters for 2 CPU cores.

    Attributes:
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: width of the residual stream.
        block_size: context length in bytes.
        dropout: dropout probability (0 keeps runs exactly reproducible on any device).
    """

    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            _check(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "must be >= 1")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd,
               f"must be a multiple of model.n_head ({self.n_head})")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How the training data is split across workers and batched (every task), and where the
    ``byte_gpt`` task's bytes come from (``corpus`` .. ``chunk_bytes``).

    Attributes:
        corpus: ``"python-stdlib"`` (the ``.py`` files of the running Python's standard
            library, no download), ``"python-docs"`` (English prose: the Python reference
            topics pydoc shows, shipped with CPython, about 465 kB) or a path to a text file
            or a folder of text files.
        partition: ``"iid"``, ``"dirichlet"`` (label skew: over source folders for text, over
            labels for a labelled dataset; see ``alpha``) or ``"by_source"`` (each worker
            gets different files, or a contiguous run of the dataset).
        alpha: Dirichlet concentration for ``partition = "dirichlet"``; small is more skewed.
        batch_size: sequences per worker per inner step.
        val_fraction: share of files held out for validation (chosen by a hash of the path).
        max_bytes: cap on corpus bytes read (None: all). Keeps start-up fast.
        eval_batches: validation batches per evaluation.
        chunk_bytes: granularity of partitioning; sampled windows never cross a chunk.
    """

    corpus: str = "python-stdlib"
    partition: Literal["iid", "dirichlet", "by_source"] = "iid"
    alpha: float = 0.5
    batch_size: int = 8
    val_fraction: float = 0.05
    max_bytes: int | None = 8_000_000
    eval_batches: int = 8
    chunk_bytes: int = 4096

    def __post_init__(self) -> None:
        _check(self.alpha > 0, "data.alpha", self.alpha, "must be > 0")
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        _check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction,
               "must be in (0, 1)")
        _check(self.max_bytes is None or self.max_bytes >= 10_000, "data.max_bytes",
               self.max_bytes, "must be >= 10000 or omitted for the whole corpus")
        _check(self.eval_batches >= 1, "data.eval_batches", self.eval_batches, "must be >= 1")
        _check(self.chunk_bytes >= 64, "data.chunk_bytes", self.chunk_bytes, "must be >= 64")


@dataclass(frozen=True, kw_only=True)
class InnerConfig:
    """The optimizer each worker runs locally for every inner step.

    Attributes:
        optimizer: ``"adamw"`` or ``"sgd"``.
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        betas: AdamW betas.
        momentum: SGD momentum (0: plain SGD).
        warmup_steps: linear warm-up length in inner steps.
        schedule: ``"constant"`` after warm-up, or ``"cosine"`` decay to ``min_lr_ratio``.
        min_lr_ratio: final lr as a fraction of ``lr`` for the cosine schedule.
        grad_clip: max global gradient norm (None: off).
    """

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.0
    warmup_steps: int = 20
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "inner.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "inner.weight_decay", self.weight_decay, "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "inner.betas", self.betas,
               "must be two numbers in [0, 1)")
        _check(0 <= self.momentum < 1, "inner.momentum", self.momentum, "must be in [0, 1)")
        _check(self.warmup_steps >= 0, "inner.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "inner.min_lr_ratio", self.min_lr_ratio,
               "must be in [0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, "inner.grad_clip", self.grad_clip,
               "must be > 0 or omitted (off)")


ALGORITHMS = ("ddp", "local_sgd", "diloco")


@dataclass(frozen=True, kw_only=True)
class InitConfig:
    """Where every worker's parameters start.

    Attributes:
        warm_start_steps: before the run, one model trains alone this many steps (the inner
            optimizer at a constant lr after its warm-up, on all the training data, with its
            own batch stream) and every worker of every algorithm starts from the result, as
            the DiLoCo paper starts from a pretrained checkpoint. 0: start from the random
            initialization of the seed. Not counted in ``steps``, bytes or virtual time.
    """

    warm_start_steps: int = 0

    def __post_init__(self) -> None:
        _check(self.warm_start_steps >= 0, "init.warm_start_steps", self.warm_start_steps,
               "must be >= 0 (0: no warm start)")


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    """Which member of the DiLoCo family runs, and how often workers synchronize.

    Attributes:
        name: ``"ddp"`` (gradient all-reduce every inner step), ``"local_sgd"`` (FedAvg:
            average parameters every ``sync_every`` steps) or ``"diloco"``.
        sync_every: inner steps per round (H). Ignored by ``ddp``, which syncs every step. An
            int, or an H schedule: ``[[step, H], ...]`` pairs starting at step 0, meaning
            "from inner step ``step`` on, rounds of ``H`` steps" (``[[0, 10], [100, 25],
            [200, 50]]``: few inner steps per round early, when the parameters move fast). A
            round that starts at step s lasts the H in force at s; a change point inside a
            round takes effect at the next round.
        ddp_steps: a data-parallel phase before DiLoCo (diloco only): the first ``ddp_steps``
            inner steps all-reduce gradients every step, exactly as DDP (each a round of its
            own, bytes counted, virtual time charged); DiLoCo's rounds then start from the
            resulting parameters, which every worker holds alike. 0: off.
        participation: FedAvg's C, the fraction of workers drawn for each round (local_sgd).
        weighting: how local_sgd weights workers: ``"samples"`` (samples trained this round),
            ``"dataset"`` (size of the worker's partition, FedAvg's n_k) or ``"uniform"``.
    """

    name: Literal["ddp", "local_sgd", "diloco"] = "diloco"
    sync_every: int | tuple[tuple[int, int], ...] = 50
    ddp_steps: int = 0
    participation: float = 1.0
    weighting: Literal["samples", "dataset", "uniform"] = "samples"

    def __post_init__(self) -> None:
        if isinstance(self.sync_every, int):
            _check(self.sync_every >= 1, "algorithm.sync_every", self.sync_every, "must be >= 1")
        else:
            object.__setattr__(self, "sync_every", _points("algorithm.sync_every",
                                                           self.sync_every, "H", int))
            _check(all(h >= 1 for _, h in self.sync_every), "algorithm.sync_every",
                   _listed(self.sync_every), "needs every H >= 1")
        _check(self.ddp_steps >= 0, "algorithm.ddp_steps", self.ddp_steps,
               "must be >= 0 (0: no data-parallel phase)")
        _check(self.ddp_steps == 0 or self.name == "diloco", "algorithm.ddp_steps",
               self.ddp_steps, f"is a phase before DiLoCo's rounds; with algorithm.name = "
               f"{self.name!r} remove it (or set algorithm.name = 'diloco')")
        _check(0 < self.participation <= 1, "algorithm.participation", self.participation,
               "must be in (0, 1]")
        _check(self.participation == 1.0 or self.name == "local_sgd", "algorithm.participation",
               self.participation, "below 1 is only supported by algorithm.name = 'local_sgd'")


def _listed(points: tuple) -> list:
    return [list(p) for p in points]


def _points(key: str, value, what: str, kind: type) -> tuple:
    """Validates ``[[x, v], ...]`` (x: ints from 0, increasing) and returns it as tuples."""
    example = "[[0, 10], [100, 25]]" if kind is int else "[[0, 0.1], [10, 0.7]]"
    x_name = "step" if key.startswith("algorithm.") else "outer step"
    pairs = [tuple(p) for p in value]
    _check(bool(pairs) and pairs[0][0] == 0, key, _listed(pairs),
           f"must be a number or [[{x_name}, {what}], ...] pairs starting at {x_name} 0, "
           f"e.g. {example}")
    _check(all(b[0] > a[0] for a, b in zip(pairs, pairs[1:])), key, _listed(pairs),
           f"needs each {x_name} larger than the one before (e.g. {example})")
    return tuple((int(x), kind(v)) for x, v in pairs)


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    """The outer optimizer DiLoCo applies to the global parameters, fed the pseudo-gradient.

    ``lr`` and ``momentum`` take a number or a schedule over outer steps (the first round's
    outer step is 0, after any data-parallel phase): ``[[outer_step, value], ...]`` points
    joined by straight lines, the last value after the last point. ``lr = [[0, 0.2], [8,
    0.7]]`` warms the outer lr up over 8 outer steps; ``momentum = [[0, 0.0], [4, 0.9]]``
    ramps the momentum. DiLoCo writes the scheduled values into the optimizer's param group
    before each outer step, so any ``torch.optim`` optimizer takes an lr schedule.

    Attributes:
        optimizer: the name of any ``torch.optim`` optimizer (``"sgd"``, ``"adam"``, ...).
        lr: outer learning rate (or its schedule).
        momentum: momentum (SGD only), or its schedule.
        nesterov: Nesterov momentum (SGD only).
        kwargs: any further keyword arguments for the optimizer, as a TOML table.
    """

    optimizer: str = "sgd"
    lr: float | tuple[tuple[int, float], ...] = 0.7
    momentum: float | tuple[tuple[int, float], ...] = 0.9
    nesterov: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch.optim

        names = {n.lower(): n for n in dir(torch.optim)
                 if isinstance(getattr(torch.optim, n), type)
                 and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                 and n != "Optimizer"}
        _check(self.optimizer.lower() in names, "outer.optimizer", self.optimizer,
               f"must name a torch.optim optimizer: one of {sorted(names)}")
        for name in ("lr", "momentum"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                object.__setattr__(self, name, float(value))
            else:
                object.__setattr__(self, name, _points(f"outer.{name}", value, name, float))
        lrs, moms = _values(self.lr), _values(self.momentum)
        _check(all(v > 0 for v in lrs), "outer.lr", self._shown("lr"), "must be > 0")
        _check(all(0 <= v < 1 for v in moms), "outer.momentum", self._shown("momentum"),
               "must be in [0, 1)")
        _check(not self.nesterov or max(moms) > 0, "outer.nesterov", self.nesterov,
               "needs outer.momentum > 0 (set outer.nesterov = false for plain SGD)")

    def _shown(self, name: str):
        value = getattr(self, name)
        return value if isinstance(value, float) else _listed(value)


def _values(setting) -> list[float]:
    return [setting] if isinstance(setting, float) else [v for _, v in setting]


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """How each shard's contributions are combined (see ``islands.aggregators``).

    Attributes:
        name: ``"mean"`` (weighted by the algorithm's weights: samples for local_sgd).
    """

    name: str = "mean"


@dataclass(frozen=True, kw_only=True)
class CodecConfig:
    """How contributions are encoded on the wire (see ``islands.codecs``).

    Settings that do not apply to the chosen codec are rejected, so a typo never silently
    runs the wrong experiment.

    Attributes:
        name: codec name; ``identity`` (fp32), ``fp16``, ``bf16`` and the others registered in
            ``islands.codecs.CODECS``.
        block: values per scale for blockwise codecs (``int8``, ``int4``, ``fp4``).
        fraction: share of values kept by ``topk``/``randomk``.
        count: number of values kept by ``topk``/``randomk`` (instead of ``fraction``).
        rank: rank of the ``powersgd`` approximation.
        stochastic: stochastic rounding for quantizing codecs.
        error_feedback: wrap the codec in error feedback (residual kept per worker).
        entropy: follow the codec with a lossless entropy stage.
    """

    name: str = "identity"
    block: int | None = None
    fraction: float | None = None
    count: int | None = None
    rank: int | None = None
    stochastic: bool | None = None
    error_feedback: bool = False
    entropy: bool = False

    def __post_init__(self) -> None:
        # codec.name is checked against the registry where codecs are built (core imports no
        # component): islands.engine.check_config, before anything runs.
        _check(self.block is None or self.block >= 1, "codec.block", self.block, "must be >= 1")
        _check(self.fraction is None or 0 < self.fraction <= 1, "codec.fraction", self.fraction,
               "must be in (0, 1]")
        _check(self.count is None or self.count >= 1, "codec.count", self.count, "must be >= 1")
        _check(self.rank is None or self.rank >= 1, "codec.rank", self.rank, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class WorkerLink:
    """Per-worker override of the network defaults.

    Attributes:
        id: worker index (0-based).
        upload_bps: upload capacity in bits per second.
        download_bps: download capacity in bits per second.
        latency_s: one-way latency added to each message this worker sends.
    """

    id: int
    upload_bps: float | None = None
    download_bps: float | None = None
    latency_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    """The simulated network: per-worker upload/download caps and latency.

    Attributes:
        bandwidth_bps: default upload and download capacity of every worker, bits per second.
        latency_s: default one-way latency of every message.
        worker: per-worker overrides (``[[network.worker]]`` tables with ``id``).
    """

    bandwidth_bps: float = 100e6
    latency_s: float = 0.05
    worker: tuple[WorkerLink, ...] = ()

    def __post_init__(self) -> None:
        _check(self.bandwidth_bps > 0, "network.bandwidth_bps", self.bandwidth_bps, "must be > 0")
        _check(self.latency_s >= 0, "network.latency_s", self.latency_s, "must be >= 0")
        for i, w in enumerate(self.worker):
            for name in ("upload_bps", "download_bps"):
                v = getattr(w, name)
                _check(v is None or v > 0, f"network.worker[{i}].{name}", v, "must be > 0")
            _check(w.latency_s is None or w.latency_s >= 0, f"network.worker[{i}].latency_s",
                   w.latency_s, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class WorkerCompute:
    """Per-worker override of the compute cost model.

    Attributes:
        id: worker index (0-based).
        step_time_s: virtual seconds this worker needs for one inner step.
    """

    id: int
    step_time_s: float


@dataclass(frozen=True, kw_only=True)
class ComputeConfig:
    """The compute cost model that drives virtual time (deterministic by construction).

    Attributes:
        step_time_s: virtual seconds one inner step takes on every worker.
        worker: per-worker overrides (``[[compute.worker]]`` tables with ``id``); a slow
            worker is a config value.
    """

    step_time_s: float = 0.1
    worker: tuple[WorkerCompute, ...] = ()

    def __post_init__(self) -> None:
        _check(self.step_time_s > 0, "compute.step_time_s", self.step_time_s, "must be > 0")
        for i, w in enumerate(self.worker):
            _check(w.step_time_s > 0, f"compute.worker[{i}].step_time_s", w.step_time_s,
                   "must be > 0")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """The real multi-process runtime (``islands run`` / ``islands launch``); unused by ``sim``.

    Attributes:
        heartbeat_s: seconds between a worker's heartbeats to the coordinator.
        heartbeat_timeout_s: a worker silent this long is dropped from the membership.
        collective_timeout_s: a collective (or state transfer) waiting this long aborts.
        join_timeout_s: the first round waits this long for ``workers`` workers, then starts
            with those present.
        round_deadline_s: after the first worker reaches a round's ``start`` or its commit
            point (``ready``), wait at most this long for the others, then go on with those
            that arrived; a worker left out catches up from the committed state at a later
            round (None: wait for all live workers).
        checkpoint_every: write a checkpoint every this many rounds (None: only at the end
            when ``checkpoint_dir`` is given on the command line).
        keep_checkpoints: how many of a worker's newest checkpoints to keep (None: all).
        max_attempts: attempts of one round with the same members before the run fails
            instead of retrying forever (a member blamed for a refused contribution is
            excluded at once, which is a change of members).
    """

    heartbeat_s: float = 0.1
    heartbeat_timeout_s: float = 1.0
    collective_timeout_s: float = 30.0
    join_timeout_s: float = 60.0
    round_deadline_s: float | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = 3
    max_attempts: int = 5

    def __post_init__(self) -> None:
        for name in ("heartbeat_s", "heartbeat_timeout_s", "collective_timeout_s",
                     "join_timeout_s"):
            _check(getattr(self, name) > 0, f"runtime.{name}", getattr(self, name), "must be > 0")
        _check(self.heartbeat_timeout_s > 2 * self.heartbeat_s, "runtime.heartbeat_timeout_s",
               self.heartbeat_timeout_s,
               f"must exceed 2 * runtime.heartbeat_s ({self.heartbeat_s}); raise it")
        _check(self.round_deadline_s is None or self.round_deadline_s > 0,
               "runtime.round_deadline_s", self.round_deadline_s, "must be > 0 or unset")
        _check(self.checkpoint_every is None or self.checkpoint_every >= 1,
               "runtime.checkpoint_every", self.checkpoint_every, "must be >= 1 or unset")
        _check(self.keep_checkpoints is None or self.keep_checkpoints >= 1,
               "runtime.keep_checkpoints", self.keep_checkpoints, "must be >= 1 or unset (all)")
        _check(self.max_attempts >= 1, "runtime.max_attempts", self.max_attempts, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that defines a run. A simulation is a pure function of this.

    Attributes:
        seed: the one seed; data order, initialization and sampling derive from it.
        workers: number of workers.
        steps: inner steps per worker.
        device: ``"auto"`` (cuda when available), ``"cpu"`` or ``"cuda"``.
        eval_every: evaluate the global parameters every this many inner steps (and at the end).
        name: a label for tables and plots (default: the algorithm's name).
        threads: CPU threads of torch in each process that runs workers (``islands sim``, each
            ``islands run`` worker). ``"auto"``: 1 on the CPU, which is never the slow choice
            (two threads on 2 cores are 1.4x faster on an idle machine and 6x slower when
            another process is busy) and keeps results the same on machines with other core
            counts (the thread count changes the order of float sums); on a GPU, torch's
            default. ``"torch"``: leave torch's own setting alone (all cores, MKL choosing
            its threads per call; what islands did before ``threads`` existed). Changing it
            changes results in the last bits, not their meaning.
    """

    seed: int = 0
    workers: int = 4
    steps: int = 500
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 50
    name: str | None = None
    threads: int | Literal["auto", "torch"] = "auto"
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    init: InitConfig = field(default_factory=InitConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "workers", self.workers, "must be >= 1")
        _check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        _check(self.eval_every >= 1, "eval_every", self.eval_every, "must be >= 1")
        _check(self.threads in ("auto", "torch") or self.threads >= 1, "threads", self.threads,
               "must be >= 1, 'auto' or 'torch'")
        for section, items in (("network", self.network.worker), ("compute", self.compute.worker)):
            for i, w in enumerate(items):
                _check(0 <= w.id < self.workers, f"{section}.worker[{i}].id", w.id,
                       f"must name a worker in [0, {self.workers - 1}] (workers = {self.workers})")

    @property
    def label(self) -> str:
        return self.name or self.algorithm.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> RunConfig:
        """Returns a validated copy with dotted-key overrides (``{"algorithm.name": "ddp"}``)."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return from_dict(data)


# --- loading -----------------------------------------------------------------------------------


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "omitted"
    args = typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_describe(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_describe(a) for a in args) + "]"
    return getattr(hint, "__name__", str(hint))


def _none_spelling(value: Any, hint: Any) -> Any:
    """TOML has no null: for settings that may be off, "off"/"none" (or false, where the
    setting is not itself a bool) mean None."""
    args = typing.get_args(hint)
    if type(None) not in args:
        return value
    if isinstance(value, str) and value.lower() in ("off", "none"):
        return None
    if value is False and bool not in args:
        return None
    return value


def _coerce(value: Any, hint: Any) -> Any:
    if hint is float and isinstance(value, int):
        return float(value)
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]!s} in {where}; "
                          f"allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
            continue
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key} ({value!r}) must be a list of tables ([[{key}]])")
            kwargs[name] = tuple(_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
            continue
        value = _none_spelling(value, hint)
        if not _type_ok(value, hint):
            raise ConfigError(f"{key} ({value!r}) must be {_describe(hint)}")
        kwargs[name] = _coerce(value, hint)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a missing required field such as `id`
        raise ConfigError(f"{where}: {e}") from None


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Builds and validates a :class:`RunConfig` from plain data (as parsed from TOML/JSON)."""
    return _build(RunConfig, data, "")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: `algorithm.name=diloco`


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parses ``["algorithm.sync_every=100", "workers=8"]`` into ``{dotted key: value}``."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} must look like section.key=value, "
                              "e.g. --set algorithm.sync_every=100")
        out[key.strip()] = _parse_value(text.strip())
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Loads a TOML file (or the defaults), applies ``--set`` overrides and validates.

    Args:
        path: a TOML file, or None for the defaults.
        overrides: ``key=value`` strings with dotted keys.
        base: starting values under the file's (used by the main job).
    """
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        for key, value in flatten(loaded).items():
            _set_dotted(data, key, value)
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(data, key, value)
    return from_dict(data)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys (``kwargs`` tables stay whole values)."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.endswith(".kwargs"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
