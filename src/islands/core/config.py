"""Typed run configuration: the loader, its messages, and :class:`RunConfig`.

A run is a :class:`RunConfig` built in Python, loaded from a TOML file with :func:`load_config`,
and adjusted with dotted overrides (``algorithm.sync_every=100``). Core owns the loader (this
module; plain values, overrides and type checks in :mod:`islands.core.values`) and the
sections every run has (:mod:`islands.core.sections`); each component (task, algorithm, codec,
aggregator) declares its own section beside its code and registers it by name
(:mod:`islands.core.registry`), so ``[algorithm] name = "diloco"`` builds DiLoCo's section and
``[outer]`` exists only for the algorithms that read it.

Every unknown key, wrong type or out-of-range value raises
:class:`~islands.core.errors.ConfigError` naming the dotted key, the value and what is allowed
(with the closest allowed name: "did you mean"), before anything runs. A key of a component
that is not chosen is refused when it is set to anything but its default (``model.n_layer``
on the digits CNN; ``codec.block`` on ``topk``), except a section another *algorithm* reads
(``[outer]`` under DDP): that warns and is dropped, because a sweep compares algorithms under
one base config (its DDP baseline gets the DiLoCo points' ``[outer]``). ``config.json``
(:meth:`RunConfig.to_dict`) records only the sections the run's components read.
``None`` means off.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from islands.core import registry
from islands.core.errors import ConfigError, IslandsWarning
from islands.core.registry import KINDS, Entry, did_you_mean
from islands.core.sections import (
    COMPONENT_BASES,
    AggregatorConfig,
    AlgorithmConfig,
    AttackConfig,
    CodecConfig,
    ComputeConfig,
    DataConfig,
    Fault,
    InitConfig,
    InnerConfig,
    NetworkConfig,
    RuntimeConfig,
    TaskConfig,
    WorkerCompute,
    WorkerLink,
    check,
    listed,
    points,
)
from islands.core.values import (
    coerce,
    describe,
    first_difference,
    flatten,
    none_spelling,
    parse_overrides,
    plain_value,
    set_dotted,
    type_ok,
)


def _default(kind: str):
    return lambda: registry.lookup(kind, registry.default_name(kind)).config()


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
        task, algorithm, codec, aggregator: the components' sections, each the class its
            ``name`` registered.
        model, outer, topology: sections a component reads (the ``byte_gpt`` task's GPT,
            DiLoCo's outer optimizer, the gossip algorithms' graph); None when no chosen
            component reads them.
        data, inner, init, network, compute, runtime, attack: the sections core owns
            (:mod:`islands.core.sections`); ``data`` is the class the task reads.
        config_dir: the folder of the TOML file this was loaded from (task paths resolve from
            it); not part of the run's identity, never saved.
    """

    seed: int = 0
    workers: int = 4
    steps: int = 500
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 50
    name: str | None = None
    threads: int | Literal["auto", "torch"] = "auto"
    task: TaskConfig = field(default_factory=_default("task"))
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    init: InitConfig = field(default_factory=InitConfig)
    algorithm: AlgorithmConfig = field(default_factory=_default("algorithm"))
    outer: Any = None
    topology: Any = None
    aggregator: AggregatorConfig = field(default_factory=_default("aggregator"))
    codec: CodecConfig = field(default_factory=_default("codec"))
    network: NetworkConfig = field(default_factory=NetworkConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    faults: tuple[Fault, ...] = ()
    config_dir: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check(self.workers >= 1, "workers", self.workers, "must be >= 1")
        check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check(self.eval_every >= 1, "eval_every", self.eval_every, "must be >= 1")
        check(self.threads in ("auto", "torch") or self.threads >= 1, "threads", self.threads,
              "must be >= 1, 'auto' or 'torch'")
        for section, items in (("network", self.network.worker), ("compute", self.compute.worker)):
            for i, w in enumerate(items):
                check(0 <= w.id < self.workers, f"{section}.worker[{i}].id", w.id,
                      f"must name a worker in [0, {self.workers - 1}] (workers = {self.workers})")
        for i, f in enumerate(self.faults):
            f.check(i, self.workers)
        self.attack.ids(self.workers)
        _normalize(self)

    @property
    def label(self) -> str:
        return self.name or self.algorithm.name

    def entry(self, kind: str) -> Entry:
        """The registered component this config chose for ``kind``."""
        return component_entry(kind, getattr(self, kind).name)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as ``config.json`` holds it: the sections the run reads."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "config_dir" or (value is None and f.name in _owned_names()):
                continue
            out[f.name] = (dataclasses.asdict(value) if dataclasses.is_dataclass(value)
                           else [dataclasses.asdict(v) for v in value] if f.name == "faults"
                           else copy.deepcopy(value))
        return out

    def replace(self, **overrides: Any) -> RunConfig:
        """Returns a validated copy with dotted-key overrides (``{"algorithm.name": "ddp"}``)."""
        data = self.to_dict()
        for key, value in overrides.items():
            set_dotted(data, key, value)
        return from_dict(data, config_dir=self.config_dir)

    def with_task_object(self, name: str) -> RunConfig:
        """This config for a task passed as an object (``simulate(cfg, task=...)``) whose
        name is not a built-in's: ``task.name`` becomes ``"object:<name>"`` and the sections
        only the named task read are dropped (refused if they were set)."""
        if name in registry.names("task"):
            return self
        data = self.to_dict()
        data["task"] = {"name": f"object:{name}"}
        return from_dict(data, config_dir=self.config_dir)


# --- which component reads what -----------------------------------------------------------------


def component_entry(kind: str, name: str) -> Entry:
    """The entry ``<kind>.name = name`` chooses; a task may also be an import path (or a
    task object's ``"object:<name>"``), which reads the base ``[data]`` only."""
    if kind != "task" or name in registry.names("task"):
        return registry.lookup(kind, name)
    if ":" in name:
        return Entry("task", name, TaskConfig, {"data": DataConfig})
    known = registry.names("task")
    raise ConfigError(f"task.name ({name!r}) must be one of {known} or an import path "
                      "'module:factory' (e.g. 'mypkg.tasks:make_task' or 'tasks.py:make_task')"
                      f"{did_you_mean(name, known, quote=True)}")


def _owned_names() -> set[str]:
    """Every top-level section some component reads (besides its own)."""
    return {s for kind in KINDS for e in registry.entries(kind) for s in e.sections} - {"data"}


def _owners(section: str) -> list[Entry]:
    return [e for kind in KINDS for e in registry.entries(kind) if section in e.sections]


def sections_read(chosen: dict[str, Entry]) -> dict[str, type]:
    """The further sections the chosen components read (``data``: the base unless the task
    reads more)."""
    out: dict[str, type] = {"data": DataConfig}
    for kind in KINDS:
        out.update(chosen[kind].sections)
    return out


def _normalize(cfg: RunConfig) -> None:
    """Makes each component's section the class its name registered, builds the sections the
    chosen components read (defaults where absent) and drops the others (refusing, or for an
    algorithm's, warning about, what was set in them)."""
    chosen = {}
    for kind in KINDS:
        section = getattr(cfg, kind)
        entry = component_entry(kind, section.name)
        if type(section) is not entry.config:
            section = _rebuild(entry.config, section, kind, _siblings(kind, entry.config))
            object.__setattr__(cfg, kind, section)
        chosen[kind] = entry
    read = sections_read(chosen)
    for name in sorted(_owned_names() | {"data"}):
        value = getattr(cfg, name)
        if name in read:
            cls = read[name]
            if value is None:
                value = cls()
            elif type(value) is not cls:
                value = _rebuild(cls, value, name, _section_siblings(name, cls), chosen)
            object.__setattr__(cfg, name, value)
        elif value is not None:
            _unread_section(name, _as_dict(value), chosen)
            object.__setattr__(cfg, name, None)


def _as_dict(value) -> dict:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


def _rebuild(cls: type, value, prefix: str, others, chosen: dict | None = None):
    return _build(cls, _as_dict(value), prefix, others=others, chosen=chosen)


def _siblings(kind: str, cls: type) -> list[tuple[str, type]]:
    """The other registered classes of a component's section: ``(who reads them, class)``."""
    return [(f"{kind} {e.name!r}", e.config) for e in registry.entries(kind)
            if e.config is not cls]


def _section_siblings(section: str, cls: type) -> list[tuple[str, type]]:
    return [(f"{e.kind} {e.name!r}", e.sections[section]) for e in _owners(section)
            if e.sections[section] is not cls]


def _chosen_phrase(kind: str, chosen: dict[str, Entry] | None) -> str:
    if chosen is None or kind not in chosen:
        return f"the chosen {kind}"
    return f"{kind} {chosen[kind].name!r}"


def _unread_section(name: str, data: dict, chosen: dict[str, Entry]) -> None:
    """A section no chosen component reads: what was set in it is refused (a task's) or warned
    about (an algorithm's); defaults pass silently."""
    owners = _owners(name)
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a table, got {data!r}")
    defaults = _as_dict(owners[0].sections[name]()) if owners else {}
    readers = ", ".join(f"{e.kind} {e.name!r}" for e in owners)
    for key, value in data.items():
        if key not in defaults:
            raise ConfigError(f"unknown key {name}.{key} in [{name}]"
                              f"{did_you_mean(key, defaults, prefix=name + '.')}; "
                              f"allowed: {', '.join(sorted(defaults))}")
        if plain_value(value) == plain_value(defaults[key]):
            continue
        kind = owners[0].kind
        message = (f"{name}.{key} ({value!r}) is read by {readers} only; "
                   f"{_chosen_phrase(kind, chosen)} does not read it")
        if all(e.kind == "algorithm" for e in owners):
            warnings.warn(IslandsWarning(message + ", so it is ignored"), stacklevel=4)
            continue
        hint = " (settings of your own model go in [task.kwargs])" if kind == "task" else ""
        raise ConfigError(f"{message}: remove it{hint}")


# --- building sections from plain data -----------------------------------------------------------


def _component_base(hint: Any) -> str | None:
    """The kind when ``hint`` is a component's base section (built by its ``name``)."""
    for kind, base in COMPONENT_BASES.items():
        if hint is base:
            return kind
    return None


def build_component(kind: str, data: Any, prefix: str | None = None):
    """A component's section from plain data, the class chosen by its ``name``
    (``build_component("codec", {"name": "int8", "block": 128})``)."""
    prefix = prefix or kind
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a table, got {data!r}")
    name = data.get("name", registry.default_name(kind))
    if not isinstance(name, str):
        raise ConfigError(f"{prefix}.name ({name!r}) must be str")
    cls = component_entry(kind, name).config
    return _build(cls, data, prefix, others=_siblings(kind, cls))


def _build(cls: type, data: Any, prefix: str, *, others=(), chosen: dict | None = None) -> Any:
    """Builds dataclass ``cls`` from ``data``, refusing unknown keys (with the closest one) and
    keys that belong to ``others`` (``(who reads them, class)``) unless at their defaults."""
    where = f"[{prefix}]" if prefix else "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            _foreign_key(cls, name, value, key, where, fields, others, chosen,
                         data.get("name"))
            continue
        hint = hints[name]
        kind = _component_base(hint)
        if kind is not None:
            kwargs[name] = build_component(kind, value, key)
            continue
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
            continue
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and args and (
                dataclasses.is_dataclass(args[0]) or _component_base(args[0])):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key} ({value!r}) must be a list of tables ([[{key}]])")
            item = _component_base(args[0])
            kwargs[name] = tuple(build_component(item, v, f"{key}[{i}]") if item
                                 else _build(args[0], v, f"{key}[{i}]")
                                 for i, v in enumerate(value))
            continue
        value = none_spelling(value, hint)
        if not type_ok(value, hint):
            raise ConfigError(f"{key} ({value!r}) must be {describe(hint)}")
        kwargs[name] = coerce(value, hint)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a missing required field such as `id`
        raise ConfigError(f"{where}: {e}") from None


def _foreign_key(cls, name, value, key, where, fields, others, chosen, chosen_name) -> None:
    """A key ``cls`` does not have: dropped when another component reads it and it is at that
    component's default (or ``cls`` tolerates it); refused otherwise."""
    if name in getattr(cls, "tolerated", ()):
        return
    readers = [(who, o) for who, o in others if name in {f.name for f in dataclasses.fields(o)}]
    if readers:
        default = {f.name: f for f in dataclasses.fields(readers[0][1])}[name].default
        if plain_value(value) == plain_value(default):
            return
        kind = getattr(cls, "kind", None)
        section = key.rsplit(".", 1)[0]
        if kind is not None:
            names = ", ".join(w.split(" ", 1)[1] for w, _ in readers)
            choose = (f"set {kind}.name = {names}" if len(readers) == 1
                      else f"set {kind}.name to one of {names}")
            mine = chosen_name or fields["name"].default
            raise ConfigError(f"{key} ({value!r}) is read by {', '.join(w for w, _ in readers)} "
                              f"only; {kind}.name = {mine!r} does not read it: remove it, or "
                              f"{choose}")
        raise ConfigError(f"{key} ({value!r}) is read by {readers[0][0]} only; "
                          f"{_chosen_phrase('task', chosen)} does not read [{section}]'s "
                          f"{name}: remove it")
    allowed = sorted(set(fields) | set(getattr(cls, "tolerated", ()))
                     | set(getattr(cls, "extra_keys", ())))
    dotted = key.rsplit(".", 1)[0] + "." if "." in key else ""
    raise ConfigError(f"unknown key {key} in {where}{did_you_mean(name, allowed, prefix=dotted)}; "
                      f"allowed: {', '.join(allowed)}")


def from_dict(data: dict[str, Any], *, config_dir: str | None = None) -> RunConfig:
    """Builds and validates a :class:`RunConfig` from plain data (as parsed from TOML/JSON).

    Args:
        config_dir: the folder task paths resolve from (that of the TOML file).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a table, got {data!r}")
    chosen = {kind: component_entry(kind, _name_in(data, kind)) for kind in KINDS}
    read = sections_read(chosen)
    kwargs: dict[str, Any] = {}
    top = {k: v for k, v in data.items() if k not in read and k not in _owned_names()}
    if top:
        plain = _build(_top_level(), top, "", chosen=chosen)
        kwargs.update({name: getattr(plain, name) for name in top})
    for name, cls in read.items():
        if name in data:
            kwargs[name] = _build(cls, data[name], name, others=_section_siblings(name, cls),
                                  chosen=chosen)
    for name in _owned_names() - set(read):
        if name in data:
            _unread_section(name, data[name], chosen)
    try:
        return RunConfig(**kwargs, config_dir=config_dir)
    except TypeError as e:
        raise ConfigError(f"the top level: {e}") from None


def _name_in(data: dict, kind: str) -> str:
    section = data.get(kind, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{kind} must be a table, got {section!r}")
    name = section.get("name", registry.default_name(kind))
    if not isinstance(name, str):
        raise ConfigError(f"{kind}.name ({name!r}) must be str")
    return name


_TOP_LEVELS: dict[frozenset, type] = {}


def _top_level() -> type:
    """RunConfig's own fields as a plain dataclass (no owned sections, no ``config_dir``): what
    the loader builds the top level with. Its ``extra_keys`` are the owned sections, so an
    unknown key's message lists every key a config may have."""
    owned = frozenset(_owned_names())
    if owned not in _TOP_LEVELS:
        hints = typing.get_type_hints(RunConfig)
        keep = [f for f in dataclasses.fields(RunConfig)
                if f.name != "config_dir" and f.name not in owned]
        made = dataclasses.make_dataclass(
            "RunConfig", [(f.name, hints[f.name], dataclasses.field(
                default=f.default, default_factory=f.default_factory)) for f in keep],
            kw_only=True, namespace={"__module__": __name__, "extra_keys": owned})
        _TOP_LEVELS[owned] = made
    return _TOP_LEVELS[owned]


# --- files --------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Loads a TOML file (or the defaults), applies ``--set`` overrides and validates.

    Args:
        path: a TOML file, or None for the defaults. Task paths in it resolve from its folder.
        overrides: ``key=value`` strings with dotted keys.
        base: starting values under the file's (used by the main job).
    """
    data: dict[str, Any] = copy.deepcopy(base or {})
    config_dir = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        for key, value in flatten(loaded).items():
            set_dotted(data, key, value)
        config_dir = str(p.resolve().parent)
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(data, key, value)
    return from_dict(data, config_dir=config_dir)


def normalized(stored: dict[str, Any]) -> dict[str, Any]:
    """A saved ``config.json`` as this version records it (the sections its components read,
    as JSON gives them back), so configs written by an older version compare equal when they
    describe the same run; as stored when it does not load (JSON writes inf as null)."""
    import json

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = from_dict(copy.deepcopy(stored))
        except (ConfigError, TypeError, ValueError):
            return stored
    return json.loads(json.dumps(cfg.to_dict(), default=str))


__all__ = ["AggregatorConfig", "AlgorithmConfig", "CodecConfig", "ComputeConfig", "DataConfig",
           "InitConfig", "InnerConfig", "NetworkConfig", "RunConfig", "RuntimeConfig",
           "TaskConfig", "WorkerCompute", "WorkerLink", "build_component", "check",
           "component_entry", "first_difference", "flatten", "from_dict", "listed",
           "load_config", "normalized", "parse_overrides", "points", "sections_read"]
