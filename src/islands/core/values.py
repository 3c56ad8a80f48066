"""Plain config values: TOML values and dotted overrides, type checks against a field's type
hint and their messages, comparing and flattening config dicts. Knows no section: the loader
(:mod:`islands.core.config`) builds sections with these.
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from islands.core.errors import ConfigError


def type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in args)
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
            return all(type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(type_ok(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "omitted"
    args = typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {describe(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(describe(a) for a in args) + "]"
    return getattr(hint, "__name__", str(hint))


def none_spelling(value: Any, hint: Any) -> Any:
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


def coerce(value: Any, hint: Any) -> Any:
    if hint is float and isinstance(value, int):
        return float(value)
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def plain_value(value):
    """Values as TOML would give them, for comparing with defaults (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    return value



def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: `algorithm.name=diloco`


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
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


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first dotted key where two config dicts differ: ``(key, a's value, b's value)``
    (a missing key is None), or None when they agree."""
    fa, fb = flatten(a), flatten(b)
    for key in list(fa) + [k for k in fb if k not in fa]:
        if fa.get(key) != fb.get(key):
            return key, fa.get(key), fb.get(key)
    return None


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
