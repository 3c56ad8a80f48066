"""Components register their config sections here by name; the loader builds from it.

A *component* is a task, an algorithm, a codec or an aggregator. Each declares, beside its
code, a frozen keyword-only dataclass for its own section (``[algorithm]`` with
``name = "diloco"`` is a :class:`~islands.algorithms.diloco.DiLoCoConfig`) and the further
top-level sections it reads (DiLoCo reads ``[outer]``; the ``byte_gpt`` task reads ``[model]``
and the corpus keys of ``[data]``), and registers them under its name:

    @register("algorithm", "diloco", sections={"outer": OuterConfig})
    @dataclass(frozen=True, kw_only=True)
    class DiLoCoConfig(AlgorithmConfig):
        ...

Core names no component: it knows the kinds, and the loader (:mod:`islands.core.config`)
builds each section with the class the chosen name registered. ``islands`` imports every
component package on import, so the registry is full before any config is read.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from islands.core.errors import ConfigError

KINDS = ("task", "algorithm", "codec", "aggregator")


@dataclass(frozen=True)
class Entry:
    """One registered component.

    Attributes:
        kind: one of :data:`KINDS`.
        name: its name in the config (``algorithm.name = "diloco"``).
        config: the dataclass of its own section.
        sections: further top-level sections it reads, by name, with their dataclasses.
        factory: builds the component from the run's config, where its section does not
            (a task: ``factory(run_config) -> Task``).
    """

    kind: str
    name: str
    config: type
    sections: dict[str, type] = field(default_factory=dict)
    factory: Callable | None = None


_ENTRIES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_DEFAULTS: dict[str, str] = {}


def register(kind: str, name: str, *, sections: dict[str, type] | None = None,
             default: bool = False, factory: Callable | None = None):
    """Class decorator: registers a component's config class under ``name``.

    Args:
        kind: ``"task"``, ``"algorithm"``, ``"codec"`` or ``"aggregator"``.
        name: the value of ``<kind>.name`` that selects it.
        sections: the further top-level sections the component reads.
        default: the component a config gets when it names none of this kind.
        factory: see :attr:`Entry.factory`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind ({kind!r}) must be one of {KINDS}")

    def add(cls: type) -> type:
        _ENTRIES[kind][name] = Entry(kind, name, cls, dict(sections or {}), factory)
        if default:
            _DEFAULTS[kind] = name
        return cls

    return add


def names(kind: str) -> list[str]:
    """The registered names of a kind, sorted."""
    return sorted(_ENTRIES[kind])


def entries(kind: str) -> list[Entry]:
    return [_ENTRIES[kind][n] for n in names(kind)]


def default_name(kind: str) -> str:
    return _DEFAULTS[kind]


def lookup(kind: str, name: str) -> Entry:
    """The entry registered as ``name``.

    Raises:
        ConfigError: ``<kind>.name`` is not registered, with the closest name and all of them.
    """
    found = _ENTRIES[kind].get(name)
    if found is None:
        raise ConfigError(f"{kind}.name ({name!r}) must be one of {names(kind)}"
                          f"{did_you_mean(name, names(kind), quote=True)}")
    return found


def did_you_mean(word: str, allowed, *, prefix: str = "", quote: bool = False) -> str:
    """``" (did you mean X?)"`` for the closest of ``allowed`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1, cutoff=0.6)
    if not close:
        return ""
    shown = repr(close[0]) if quote else f"{prefix}{close[0]}"
    return f" (did you mean {shown}?)"
