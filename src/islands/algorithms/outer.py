"""The ``[outer]`` section: the outer optimizer an algorithm applies to the global parameters,
fed the averaged pseudo-gradient through ``.grad`` (DiLoCo reads it; any ``torch.optim``
optimizer, as torchft's ``local_sgd.DiLoCo`` takes one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from islands.algorithms.schedule import largest, value_at
from islands.core.errors import ConfigError
from islands.core.sections import check, listed, points


def _optimizers() -> dict[str, type]:
    """Every ``torch.optim`` optimizer by its lower-case name."""
    return {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
            if isinstance(getattr(torch.optim, n), type)
            and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"}


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
        names = _optimizers()
        check(self.optimizer.lower() in names, "outer.optimizer", self.optimizer,
              f"must name a torch.optim optimizer: one of {sorted(names)}")
        for name in ("lr", "momentum"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                object.__setattr__(self, name, float(value))
            else:
                object.__setattr__(self, name, points(f"outer.{name}", value, name, float))
        lrs, moms = _values(self.lr), _values(self.momentum)
        check(all(v > 0 for v in lrs), "outer.lr", self._shown("lr"), "must be > 0")
        check(all(0 <= v < 1 for v in moms), "outer.momentum", self._shown("momentum"),
              "must be in [0, 1)")
        check(not self.nesterov or max(moms) > 0, "outer.nesterov", self.nesterov,
              "needs outer.momentum > 0 (set outer.nesterov = false for plain SGD)")

    def _shown(self, name: str):
        value = getattr(self, name)
        return value if isinstance(value, float) else listed(value)


def _values(setting) -> list[float]:
    return [setting] if isinstance(setting, float) else [v for _, v in setting]


def outer_factory(cfg: OuterConfig):
    """Builds the outer optimizer factory ``params -> optimizer`` from ``[outer]``.

    Raises:
        ConfigError: a setting the chosen optimizer would ignore (``momentum`` or
            ``nesterov`` with anything but SGD) or refuse (a keyword in ``outer.kwargs``).
    """
    cls = _optimizers()[cfg.optimizer.lower()]
    # a schedule's first value builds the optimizer (DiLoCo rewrites it before each outer
    # step); a momentum ramp from 0 builds with its largest, as Nesterov needs momentum > 0
    kwargs = {"lr": value_at(cfg.lr, 0), **cfg.kwargs}
    if cls is torch.optim.SGD:
        kwargs.update(momentum=largest(cfg.momentum), nesterov=cfg.nesterov)
    else:
        defaults = type(cfg)()
        for key in ("momentum", "nesterov"):
            if getattr(cfg, key) != getattr(defaults, key):
                raise ConfigError(
                    f"outer.{key} ({getattr(cfg, key)!r}) is used by outer.optimizer = 'sgd' "
                    f"only; {cls.__name__} would ignore it. Remove it, or give {cls.__name__}'s "
                    "own settings in [outer.kwargs] (e.g. betas = [0.9, 0.95] for adam)")
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"outer.kwargs ({dict(cfg.kwargs)}) are refused by "
                          f"torch.optim.{cls.__name__}: {e}") from None
    return lambda params: cls(params, **kwargs)
