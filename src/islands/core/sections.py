"""The config sections core owns, and the base classes of the components' own sections.

Core owns what every run has: ``[data]``'s partition (every task deals its data with it),
``[inner]`` (the built-in loop's optimizer, also handed to a user's loop), ``[init]``,
``[network]`` and ``[compute]`` (the simulator's world) and ``[runtime]`` (the real one's).
``[task]``, ``[algorithm]``, ``[codec]`` and ``[aggregator]`` are chosen by their ``name``: each
component subclasses the base below beside its code and registers it
(:mod:`islands.core.registry`), adding its own keys.

The helpers :func:`check` and :func:`points` are for every section's validation: a message
names the dotted key, the value, the rule and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from islands.core.errors import ConfigError


def check(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raises ``ConfigError("<key> (<value>) <rule>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} ({value!r}) {rule}")


def listed(points_: tuple) -> list:
    return [list(p) for p in points_]


def points(key: str, value, what: str, kind: type) -> tuple:
    """Validates ``[[x, v], ...]`` (x: ints from 0, increasing) and returns it as tuples."""
    example = "[[0, 10], [100, 25]]" if kind is int else "[[0, 0.1], [10, 0.7]]"
    x_name = "step" if key.startswith("algorithm.") else "outer step"
    pairs = [tuple(p) for p in value]
    check(bool(pairs) and pairs[0][0] == 0, key, listed(pairs),
          f"must be a number or [[{x_name}, {what}], ...] pairs starting at {x_name} 0, "
          f"e.g. {example}")
    check(all(b[0] > a[0] for a, b in zip(pairs, pairs[1:])), key, listed(pairs),
          f"needs each {x_name} larger than the one before (e.g. {example})")
    return tuple((int(x), kind(v)) for x, v in pairs)


# --- the bases of the components' sections ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What is trained: a built-in task or the user's own (see ``islands.tasks``).

    Attributes:
        name: ``"byte_gpt"`` (a byte-level GPT on text, configured by ``[model]`` and
            ``[data]``), ``"digits_cnn"`` (a small CNN with BatchNorm on scikit-learn's bundled
            8x8 digits), or the import path of a factory that returns a ``Task``:
            ``"mypkg.tasks:make_task"`` or ``"path/to/tasks.py:make_task"``; a relative path,
            and a module beside the config, resolve from the config file's folder.
        kwargs: keyword arguments passed to the task's factory, as a TOML table
            (``[task.kwargs]``).
    """

    kind: ClassVar[str] = "task"
    name: str = "byte_gpt"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    """Which member of the DiLoCo family runs; each registers a subclass with its own keys
    (``islands.algorithms``).

    Attributes:
        name: ``"ddp"``, ``"local_sgd"`` or ``"diloco"`` (see ``islands.core.registry``).
    """

    kind: ClassVar[str] = "algorithm"
    # keys of other algorithms this one accepts and ignores without a word (DDP syncs every
    # step, so a base config's sync_every is no mistake in a sweep's DDP baseline)
    tolerated: ClassVar[frozenset[str]] = frozenset()
    name: str = "diloco"

    def wire_codec(self, codec: CodecConfig) -> CodecConfig:
        """The codec the workers encode with: the run's ``[codec]`` section, unless the
        algorithm brings its own (SparseLoCo's compressor), refusing a ``[codec]`` it would
        ignore."""
        return codec


@dataclass(frozen=True, kw_only=True)
class CodecConfig:
    """How contributions are encoded on the wire; each codec registers a subclass with its
    own settings (``islands.codecs``). Settings of another codec are refused, so a typo never
    silently runs the wrong experiment.

    Attributes:
        name: ``identity`` (fp32), ``fp16``, ``bf16``, ``int8``, ... (``islands.codecs``).
        error_feedback: wrap the codec in error feedback (residual kept per worker).
        error_feedback_beta: the residual's decay per round, in [0, 1] (1: plain error
            feedback; SparseLoCo's accumulator uses 0.95).
        entropy: follow the codec with a lossless entropy stage.
    """

    kind: ClassVar[str] = "codec"
    tolerated: ClassVar[frozenset[str]] = frozenset()
    name: str = "identity"
    error_feedback: bool = False
    error_feedback_beta: float = 1.0
    entropy: bool = False


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """How each shard's contributions are combined; each aggregator registers a subclass
    (``islands.aggregators``).

    Attributes:
        name: ``"mean"`` (weighted by the algorithm's weights: samples for local_sgd).
        clip_norm: every rule clips each row to this L2 norm first (None: no clipping).
        ban_after: the ban rule (``islands.engine.judge``): a worker whose influence on the
            aggregate stays under ``ban_below`` times the round's median influence for this
            many syncs in a row is excluded from the job (None: never).
        ban_below: the ban rule's threshold, a fraction of the median influence.
        verify: the chance that a sync's butterfly is verified (each member recomputes one
            shard it does not own from the same inputs; a lying owner is banned:
            ``islands.collectives.verify``); 0: never. Needs a lossless codec and a rule
            without state.
        clones: a Sybil defence in front of the rule: rows whose cosine similarity to an
            earlier row exceeds this count as its clones, and only the first of each group
            is aggregated (None: off; e.g. 0.999). Honest pseudo-gradients are far less alike.
    """

    kind: ClassVar[str] = "aggregator"
    tolerated: ClassVar[frozenset[str]] = frozenset()
    name: str = "mean"
    clip_norm: float | None = None
    ban_after: int | None = 5
    ban_below: float = 0.25
    verify: float = 0.0
    clones: float | None = None

    def __post_init__(self) -> None:
        """Validates the keys every aggregator has (a rule with keys of its own calls this
        first)."""
        check(self.clip_norm is None or self.clip_norm > 0, "aggregator.clip_norm",
              self.clip_norm, f"must be > 0 for {self.name} (the largest L2 norm a "
              "contribution keeps), or None for no clipping")
        check(self.clones is None or 0 < self.clones < 1, "aggregator.clones", self.clones,
              "must be in (0, 1): the cosine similarity above which rows count as clones "
              "(e.g. 0.999), or unset")
        check(0 <= self.verify <= 1, "aggregator.verify", self.verify,
              "must be in [0, 1]: the chance a sync is verified")
        check(self.ban_after is None or self.ban_after >= 1, "aggregator.ban_after",
              self.ban_after, "must be >= 1 (syncs in a row), or unset to never ban")
        check(0 < self.ban_below < 1, "aggregator.ban_below", self.ban_below,
              "must be in (0, 1): a fraction of the round's median influence")


COMPONENT_BASES: dict[str, type] = {"task": TaskConfig, "algorithm": AlgorithmConfig,
                                    "codec": CodecConfig, "aggregator": AggregatorConfig}


# --- the sections core owns -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How the training data is split across workers and batched: what every task reads
    (the ``byte_gpt`` task adds its corpus keys: ``islands.data.TextDataConfig``).

    Attributes:
        partition: ``"iid"``, ``"dirichlet"`` (label skew: over source folders for text, over
            labels for a labelled dataset; see ``alpha``) or ``"by_source"`` (each worker
            gets different files, or a contiguous run of the dataset).
        alpha: Dirichlet concentration for ``partition = "dirichlet"``; small is more skewed.
        batch_size: samples per worker per inner step.
    """

    partition: Literal["iid", "dirichlet", "by_source"] = "iid"
    alpha: float = 0.5
    batch_size: int = 8

    def __post_init__(self) -> None:
        check(self.alpha > 0, "data.alpha", self.alpha, "must be > 0")
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class InnerConfig:
    """The optimizer each worker runs locally for every inner step (``islands.inner_optimizer``
    builds it for a user's own loop).

    Attributes:
        optimizer: ``"adamw"``, ``"sgd"`` or ``"muon"``: Muon on the hidden matrices (the
            weights of every ``nn.Linear`` layer except the last one, the head, and any tied
            to an embedding) and AdamW on everything else (embeddings, the head, biases,
            norms, convolution kernels), as one optimizer (``islands.engine.muon``). Muon's
            step is scaled to AdamW's update size (``adjust_lr_fn="match_rms_adamw"``), so
            one ``lr`` and ``weight_decay`` serve both. With ``algorithm.name = "diloco"``
            this is MuLoCo (Therien et al., 2025, arXiv:2505.23725).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW, Muon) or L2 (SGD) weight decay, on parameters of 2 or
            more dimensions only (matrices; not biases or norms), as nanoGPT.
        betas: AdamW betas (also the AdamW part of ``"muon"``).
        momentum: SGD momentum (0: plain SGD).
        muon_momentum: Muon's (Nesterov) momentum, for ``"muon"`` only.
        muon_ns_steps: Muon's Newton-Schulz iterations per step, for ``"muon"`` only.
        warmup_steps: linear warm-up length in inner steps.
        schedule: ``"constant"`` after warm-up, or ``"cosine"`` decay to ``min_lr_ratio`` at
            the run's last inner step.
        min_lr_ratio: final lr as a fraction of ``lr`` for the cosine schedule.
        grad_clip: max global gradient norm (None: off), applied before every inner step.
    """

    optimizer: Literal["adamw", "sgd", "muon"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.0
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    warmup_steps: int = 20
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        check(self.lr > 0, "inner.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "inner.weight_decay", self.weight_decay, "must be >= 0")
        check(all(0 <= b < 1 for b in self.betas), "inner.betas", self.betas,
              "must be two numbers in [0, 1)")
        check(0 <= self.momentum < 1, "inner.momentum", self.momentum, "must be in [0, 1)")
        check(0 <= self.muon_momentum < 1, "inner.muon_momentum", self.muon_momentum,
              "must be in [0, 1) (Muon's usual value: 0.95)")
        check(1 <= self.muon_ns_steps <= 99, "inner.muon_ns_steps", self.muon_ns_steps,
              "must be in [1, 99] (Muon's usual value: 5)")
        check(self.warmup_steps >= 0, "inner.warmup_steps", self.warmup_steps, "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "inner.min_lr_ratio", self.min_lr_ratio,
              "must be in [0, 1]")
        check(self.grad_clip is None or self.grad_clip > 0, "inner.grad_clip", self.grad_clip,
              "must be > 0 or omitted (off)")


@dataclass(frozen=True, kw_only=True)
class InitConfig:
    """Where every worker's parameters start.

    Attributes:
        warm_start_steps: before the run, one model trains alone this many steps (the inner
            optimizer at a constant lr after its warm-up, on all the training data, with its
            own batch stream) and every worker of every algorithm starts from the result, as
            the DiLoCo paper starts from a pretrained checkpoint. 0: start from the random
            initialization of the seed. Not counted in ``steps``, bytes or virtual time.
        warm_start_optimizer: the optimizer of the warm start (None: ``inner.optimizer``).
            ``"adamw"`` gives a Muon run (``inner.optimizer = "muon"``) the warm start AdamW
            runs share, so the two compare from the same checkpoint.
    """

    warm_start_steps: int = 0
    warm_start_optimizer: Literal["adamw", "sgd", "muon"] | None = None

    def __post_init__(self) -> None:
        check(self.warm_start_steps >= 0, "init.warm_start_steps", self.warm_start_steps,
              "must be >= 0 (0: no warm start)")


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
        framing: bytes a link carries per payload byte: 1.0 (the default) counts the payload
            alone; TCP/IPv4 over Ethernet at a 1500-byte MTU sends 1448 payload bytes in
            1514 (TCP with timestamps 32, IP 20, Ethernet 14: what a Linux shaper such as
            ``tc``'s ``tbf`` counts), ``framing = 1.0456``. Byte counts stay the payload's;
            only the time a link takes grows. ACKs on the reverse path are not counted.
        worker: per-worker overrides (``[[network.worker]]`` tables with ``id``).
    """

    bandwidth_bps: float = 100e6
    latency_s: float = 0.05
    framing: float = 1.0
    worker: tuple[WorkerLink, ...] = ()

    def __post_init__(self) -> None:
        check(self.bandwidth_bps > 0, "network.bandwidth_bps", self.bandwidth_bps, "must be > 0")
        check(self.latency_s >= 0, "network.latency_s", self.latency_s, "must be >= 0")
        check(self.framing >= 1, "network.framing", self.framing,
              "must be >= 1 (bytes on the wire per payload byte; 1514/1448 for TCP over "
              "Ethernet)")
        for i, w in enumerate(self.worker):
            for name in ("upload_bps", "download_bps"):
                v = getattr(w, name)
                check(v is None or v > 0, f"network.worker[{i}].{name}", v, "must be > 0")
            check(w.latency_s is None or w.latency_s >= 0, f"network.worker[{i}].latency_s",
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
        commit_time_s: virtual seconds each worker spends on each round's commit besides
            its steps and the wire (real processes: the coordinator's barriers, the shared
            state's hashes), waited for, so counted as communication; 0 models none.
            Measure it as a real job's ``sync_s`` in ``metrics.jsonl`` under DDP (whose
            round is one step that has synced already: what is left is the commit), on any
            link (``benchmarks/wan.py`` does, on loopback). Real processes spend what they
            spend: the runtime ignores it.
        worker: per-worker overrides (``[[compute.worker]]`` tables with ``id``); a slow
            worker is a config value.
    """

    step_time_s: float = 0.1
    commit_time_s: float = 0.0
    worker: tuple[WorkerCompute, ...] = ()

    def __post_init__(self) -> None:
        check(self.step_time_s > 0, "compute.step_time_s", self.step_time_s, "must be > 0")
        check(self.commit_time_s >= 0, "compute.commit_time_s", self.commit_time_s,
              "must be >= 0 (0: a commit takes no time)")
        for i, w in enumerate(self.worker):
            check(w.step_time_s > 0, f"compute.worker[{i}].step_time_s", w.step_time_s,
                  "must be > 0")


ATTACKS = ("none", "sign_flip", "noise", "alie", "ipm", "constant", "label_flip", "stale",
           "nan", "sybil", "lying_aggregator", "forged_weight", "false_accuser")

# each attack's ``scale`` when the config leaves it unset (see AttackConfig)
ATTACK_SCALES = {"sign_flip": 10.0, "noise": 10.0, "alie": 1.0, "ipm": 0.5, "constant": 10.0,
                 "sybil": 1.0, "lying_aggregator": 10.0, "forged_weight": 1e9}


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """Byzantine workers (``[attack]``): which workers attack, from which round, and how
    (``islands.engine.attacks`` carries them out; in the simulator they are omniscient where the
    attack needs it: ALIE and IPM see the honest pseudo-gradients of the round).

    Attributes:
        name: ``"none"``, or the attack every attacker carries out: ``"sign_flip"`` (sends
            ``-scale`` times its pseudo-gradient), ``"noise"`` (Gaussian noise, its standard
            deviation ``scale`` times the RMS of its pseudo-gradient), ``"alie"`` ("a little is
            enough", Baruch et al. 2019: the honest mean minus ``scale * z`` standard
            deviations per coordinate, ``z`` the paper's for the group's size and attackers),
            ``"ipm"`` (inner-product manipulation, Xie et al. 2020: ``-scale`` times the honest
            mean), ``"constant"`` (one fixed random direction of ``scale`` times its
            pseudo-gradient's norm), ``"label_flip"`` (trains honestly on flipped labels:
            ``y -> labels - 1 - y``), ``"stale"`` (its pseudo-gradient of ``delay_rounds``
            rounds ago), ``"nan"`` (NaN values), ``"sybil"`` (every attacker sends one and the
            same update: ``-scale`` times the first attacker's pseudo-gradient),
            ``"lying_aggregator"`` (as a shard's owner in the butterfly, returns ``-scale``
            times the true aggregate), ``"forged_weight"`` (claims aggregation weight
            ``scale``), ``"false_accuser"`` (accuses another member of every sync, each in
            turn from the lowest: on real processes of a forged weight with that member's
            own signed header as the evidence where the round records weights, otherwise
            of a payload that does not decode, its word alone). ``alie``, ``ipm`` and
            ``sybil`` read other workers' updates: in the simulator the honest ones; with
            real processes only the attackers' own, shared through ``shared_dir``.
        attackers: how many workers attack (the highest ids: ``workers - attackers`` on), or
            their ids.
        start_round: the first round they attack (honest before: turning malicious).
        scale: the attack's strength (None: its default, :data:`ATTACK_SCALES`).
        delay_rounds: ``"stale"``: how old its pseudo-gradient is, in rounds.
        seed: draws the attacks' randomness (noise, the constant direction).
        shared_dir: real processes: a folder every attacker can read and write (the
            identities of one adversary colluding), through which ``alie``, ``ipm`` and
            ``sybil`` share each round's honest updates of the attackers (``islands
            launch`` sets one in its run folder). Unused in the simulator, where every
            worker is in one process.
    """

    name: str = "none"
    attackers: int | tuple[int, ...] = 0
    start_round: int = 0
    scale: float | None = None
    delay_rounds: int = 10
    seed: int = 0
    shared_dir: str | None = None

    def __post_init__(self) -> None:
        check(self.name in ATTACKS, "attack.name", self.name,
              f"must be one of {', '.join(ATTACKS)}")
        if not isinstance(self.attackers, int):
            object.__setattr__(self, "attackers", tuple(int(i) for i in self.attackers))
            check(len(set(self.attackers)) == len(self.attackers), "attack.attackers",
                  list(self.attackers), "must name each worker once")
        else:
            check(self.attackers >= 0, "attack.attackers", self.attackers,
                  "must be >= 0 (a count) or a list of worker ids")
        check(self.start_round >= 0, "attack.start_round", self.start_round, "must be >= 0")
        check(self.delay_rounds >= 1, "attack.delay_rounds", self.delay_rounds, "must be >= 1")
        check(self.scale is None or self.scale == self.scale, "attack.scale", self.scale,
              "must be a number (None: the attack's default)")

    def ids(self, workers: int) -> tuple[int, ...]:
        """The attackers' ids in a job of ``workers`` workers (none for ``name = "none"``)."""
        if self.name == "none":
            return ()
        if isinstance(self.attackers, int):
            check(self.attackers < workers, "attack.attackers", self.attackers,
                  f"must leave at least one honest worker (workers = {workers})")
            return tuple(range(workers - self.attackers, workers))
        for i in self.attackers:
            check(0 <= i < workers, "attack.attackers", list(self.attackers),
                  f"must name workers in [0, {workers - 1}] (workers = {workers})")
        return tuple(sorted(self.attackers))

    @property
    def strength(self) -> float:
        """``scale``, or the attack's default."""
        return ATTACK_SCALES.get(self.name, 1.0) if self.scale is None else float(self.scale)


# the [algorithm] keys with which a round draws a sample of the members (FedAvg's C, MoDeST)
SAMPLING_KEYS = ("participation", "sample_fraction")


def present_at_start(faults, workers: int) -> set[int]:
    """The workers a fault plan has present from the start: all but those whose first
    membership event in the plan is a join."""
    first: dict[int, str] = {}
    for f in faults:
        if f.kind in ("crash", "leave", "join"):
            first.setdefault(f.worker, f.kind)
    return {i for i in range(workers) if first.get(i) != "join"}


FAULT_KINDS = ("crash", "leave", "join", "slow", "link", "partition", "heal")
NETWORK_WIDE = ("partition", "heal")  # events of the whole network, not of one worker


@dataclass(frozen=True, kw_only=True)
class Fault:
    """One event of the fault plan (``[[faults]]``), at a round or a virtual time.

    Attributes:
        kind: ``"crash"`` (the worker trains the round but dies before its sync, which
            commits without it), ``"leave"`` (it is gone from the round on), ``"join"``
            (it takes part from the round on, with the committed state from a live member;
            one absent from the start joins so too), ``"slow"`` (its inner steps take
            ``factor`` times as long from then on), ``"link"`` (its link becomes
            ``upload_bps`` / ``download_bps`` / ``latency_s`` from then on), ``"partition"``
            (every link between ``workers`` and the rest is cut from then on: gossip
            exchanges stay on each side; no ``worker``), ``"heal"`` (the cut links are back).
        worker: the worker's id (not for ``partition`` and ``heal``).
        workers: ``partition``: the ids on one side of the cut (the others are the other).
        round: the round it happens at (or ``at_s``).
        at_s: the virtual time it happens at: the first round that starts at or after it
            (a crash: the round the worker is computing at that time).
        factor: ``slow``: the step-time multiplier (against the worker's configured one).
        upload_bps, download_bps, latency_s: ``link``: the new settings (unset: unchanged).
    """

    kind: str
    worker: int | None = None
    workers: tuple[int, ...] | None = None
    round: int | None = None
    at_s: float | None = None
    factor: float | None = None
    upload_bps: float | None = None
    download_bps: float | None = None
    latency_s: float | None = None

    def check(self, i: int, workers: int) -> None:
        key = f"faults[{i}]"
        check(self.kind in FAULT_KINDS, f"{key}.kind", self.kind,
              f"must be one of {', '.join(FAULT_KINDS)}")
        if self.kind in NETWORK_WIDE:
            check(self.worker is None, f"{key}.worker", self.worker,
                  f"is not read by kind = {self.kind!r} (a network event): remove it")
        else:
            check(self.worker is not None and 0 <= self.worker < workers, f"{key}.worker",
                  self.worker, f"must name a worker in [0, {workers - 1}] (workers = "
                  f"{workers})")
        check((self.workers is not None) == (self.kind == "partition"), f"{key}.workers",
              self.workers, "is set for kind = 'partition' only (one side of the cut), and "
              "needed there")
        if self.workers is not None:
            side = set(self.workers)
            check(0 < len(side) < workers and side <= set(range(workers)), f"{key}.workers",
                  list(self.workers), f"must name some but not all of the workers [0, "
                  f"{workers - 1}] (one side of the cut)")
        check((self.round is None) != (self.at_s is None), f"{key}.round", self.round,
              "needs exactly one of round (a round index) and at_s (virtual seconds)")
        check(self.round is None or self.round >= 0, f"{key}.round", self.round, "must be >= 0")
        check(self.at_s is None or self.at_s >= 0, f"{key}.at_s", self.at_s, "must be >= 0")
        check((self.factor is not None) == (self.kind == "slow"), f"{key}.factor", self.factor,
              "is set for kind = 'slow' only, and needed there")
        check(self.factor is None or self.factor > 0, f"{key}.factor", self.factor,
              "must be > 0")
        link = (self.upload_bps, self.download_bps, self.latency_s)
        check(self.kind == "link" or link == (None, None, None), f"{key}.kind", self.kind,
              "must be 'link' to set upload_bps, download_bps or latency_s")
        check(self.kind != "link" or link != (None, None, None), f"{key}.upload_bps", None,
              "kind = 'link' needs upload_bps, download_bps or latency_s")
        for name in ("upload_bps", "download_bps"):
            v = getattr(self, name)
            check(v is None or v > 0, f"{key}.{name}", v, "must be > 0")
        check(self.latency_s is None or self.latency_s >= 0, f"{key}.latency_s",
              self.latency_s, "must be >= 0")


# the [runtime] keys only the coordinator reads: a worker's are checked against the
# coordinator's at join (refused when they differ), or adopted from the first worker by a
# coordinator started without a config
COORDINATOR_KEYS = ("heartbeat_timeout_s", "join_timeout_s", "round_deadline_s", "max_attempts")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """The real multi-process runtime (``islands run`` / ``islands launch`` / ``islands.join``);
    unused by ``sim``.

    The keys in :data:`COORDINATOR_KEYS` are read by the coordinator: give them to the
    coordinator (``islands coordinator --config``) and every worker alike. A coordinator
    started without a config adopts the first worker's; a worker whose values differ from the
    coordinator's is refused at join, naming the key.

    Attributes:
        heartbeat_s: seconds between a worker's heartbeats to the coordinator.
        heartbeat_timeout_s: a worker silent this long is dropped from the membership.
        collective_timeout_s: a collective (or state transfer) waiting this long aborts.
        join_timeout_s: the first round waits this long for ``workers`` workers, then starts
            with those present.
        round_deadline_s: after the first worker reaches a round's ``start`` or its commit
            point (``ready``), wait at most this long for the others, then go on with those
            that arrived; a worker left out (a straggler, or one stuck in a step of its own
            loop) catches up from the committed state at a later round (None: wait for all
            live workers).
        checkpoint_every: write a checkpoint every this many rounds (None: only at the end
            when ``checkpoint_dir`` is given on the command line).
        keep_checkpoints: how many of a worker's newest checkpoints to keep (None: all).
        max_attempts: attempts of one round with the same members before the run fails
            instead of retrying forever (a member blamed for a refused contribution is
            excluded at once, which is a change of members).
        coordinator_timeout_s: a worker that cannot reach its coordinator this long stops
            (exit 3) instead of retrying forever; a coordinator restarted within it is
            rejoined.
        trust: ``"open"`` (the butterfly: every received message checked, a bad one blamed on
            its sender) or ``"cluster"`` (trusted members on one network: a lossless codec
            and the plain mean go through ``torch.distributed.all_reduce``, gloo's or
            NCCL's, after each member checks its own contribution; see ``islands.collectives``).
        wire: how an open job's messages travel between members (with a coordinator):
            ``"streams"`` (TCP connections islands frames and reads itself: a message longer
            than its header said is refused, naming its sender;
            ``islands.transports.streams``) or ``"gloo"`` (gloo's point-to-point pairs, where
            such a message aborts the receiving process inside gloo). A trusted cluster and
            a torchrun group always use gloo's. The same on every worker.
    """

    heartbeat_s: float = 0.1
    heartbeat_timeout_s: float = 1.0
    collective_timeout_s: float = 30.0
    join_timeout_s: float = 60.0
    round_deadline_s: float | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = 3
    max_attempts: int = 5
    coordinator_timeout_s: float = 60.0
    trust: Literal["open", "cluster"] = "open"
    wire: Literal["gloo", "streams"] = "streams"

    def __post_init__(self) -> None:
        for name in ("heartbeat_s", "heartbeat_timeout_s", "collective_timeout_s",
                     "join_timeout_s", "coordinator_timeout_s"):
            check(getattr(self, name) > 0, f"runtime.{name}", getattr(self, name), "must be > 0")
        check(self.heartbeat_timeout_s > 2 * self.heartbeat_s, "runtime.heartbeat_timeout_s",
              self.heartbeat_timeout_s,
              f"must exceed 2 * runtime.heartbeat_s ({self.heartbeat_s}); raise it")
        check(self.round_deadline_s is None or self.round_deadline_s > 0,
              "runtime.round_deadline_s", self.round_deadline_s, "must be > 0 or unset")
        check(self.checkpoint_every is None or self.checkpoint_every >= 1,
              "runtime.checkpoint_every", self.checkpoint_every, "must be >= 1 or unset")
        check(self.keep_checkpoints is None or self.keep_checkpoints >= 1,
              "runtime.keep_checkpoints", self.keep_checkpoints, "must be >= 1 or unset (all)")
        check(self.max_attempts >= 1, "runtime.max_attempts", self.max_attempts, "must be >= 1")
