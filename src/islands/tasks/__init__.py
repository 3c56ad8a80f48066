"""Tasks: the seam between the user's ML and islands (see :mod:`islands.tasks.base`).

Built-ins: ``byte_gpt`` (a byte-level GPT on text) and ``digits_cnn`` (a CNN with BatchNorm on
scikit-learn's 8x8 digits). A user's task comes by import path (``[task] name =
"mypkg.tasks:make_task"`` with ``[task.kwargs]`` passed to the factory), or as an object:
``islands.simulate(cfg, task=my_task)``. :func:`from_dataset` and :func:`from_loader` build one
from a model, a loss and a Dataset or a DataLoader factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from islands.core.config import RunConfig, component_entry
from islands.core.errors import ConfigError
from islands.tasks.base import Batch, Partition, Task, check_loss, checked_loss, to_device
from islands.tasks.byte_gpt import ByteGPT
from islands.tasks.dataset import (
    DatasetTask,
    IndexPartition,
    ShareSampler,
    deal,
    from_dataset,
    from_loader,
)
from islands.tasks.digits_cnn import make_digits_cnn


def _import_factory(path: str, config_dir: str | None) -> Any:
    """``"pkg.mod:attr"`` or ``"dir/file.py:attr"`` -> the attribute.

    A relative file resolves from ``config_dir`` (the config file's folder; the current folder
    without one), and that folder (and the file's own) goes first on ``sys.path``, so the task
    module can import a module beside it, as ``python file.py`` allows.
    """
    module_name, _, attr = path.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"task.name ({path!r}) must look like 'module:factory'")
    base = Path(config_dir) if config_dir else Path.cwd()
    where = f"the config's folder {str(base)!r}" if config_dir else "the current folder"
    try:
        if module_name.endswith(".py"):
            file = (base / Path(module_name).expanduser()).resolve()
            if not file.is_file():
                raise ConfigError(f"task.name ({path!r}): the file {str(file)!r} does not "
                                  f"exist (a relative path resolves from {where})")
            _importable(file.parent, base)
            spec = importlib.util.spec_from_file_location(f"islands_task_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            # the config's folder first, so `mypkg/` beside run.toml is found wherever islands
            # is started from; then, as `python -m` does, the current folder
            _importable(base, Path.cwd())
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed to import: say which key and why
        raise ConfigError(f"task.name ({path!r}): cannot import {module_name!r}: "
                          f"{type(e).__name__}: {e} (modules are found in {where}, the current "
                          "folder and PYTHONPATH)") from e
    if not hasattr(module, attr):
        raise ConfigError(f"task.name ({path!r}): module {module_name!r} has no attribute "
                          f"{attr!r}")
    return getattr(module, attr)


def _importable(*folders: Path) -> None:
    for folder in reversed(folders):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def build_task(cfg: RunConfig) -> Task:
    """The task a config names, built with its ``[task.kwargs]``.

    Raises:
        ConfigError: an unknown name, an import that fails, a factory that raises or returns
            something that is not a task; each names ``task.name``.
    """
    name, kwargs = cfg.task.name, dict(cfg.task.kwargs)
    if name.startswith("object:"):
        raise ConfigError(f"task.name ({name!r}) stands for a Task object passed in Python "
                          "(simulate(cfg, task=...)); a config cannot rebuild it: pass the "
                          "object again, or name its factory ('module:factory')")
    entry = component_entry("task", name)
    if entry.factory is not None:
        build = lambda: entry.factory(cfg)  # noqa: E731
    else:
        factory = _import_factory(name, cfg.config_dir)
        build = lambda: factory(**kwargs)  # noqa: E731
    try:
        task = build()
    except ConfigError:
        raise
    except Exception as e:  # the user's factory: report it against the config key
        raise ConfigError(f"task.name ({name!r}) with task.kwargs {kwargs}: the factory "
                          f"raised {type(e).__name__}: {e}") from e
    if not isinstance(task, Task):
        raise ConfigError(f"task.name ({name!r}): the factory returned "
                          f"{type(task).__name__}, not an islands.tasks.Task; subclass it or "
                          "return islands.tasks.from_dataset(...)")
    return task


__all__ = ["Batch", "ByteGPT", "DatasetTask", "IndexPartition", "Partition", "ShareSampler",
           "Task", "build_task", "check_loss", "checked_loss", "deal", "from_dataset",
           "from_loader", "make_digits_cnn", "to_device"]
