"""The config fingerprint: what must be the same on every worker of a run, checked at join.

A worker sends it in its hello; the coordinator holds the job's (from its own ``--config``,
or else from the first worker that registers) and refuses a worker whose fingerprint differs,
naming the first differing key and both values. Two workers with different models, algorithms,
codecs or data would otherwise fail later, in the state transfer or as a silently different
run.

Everything in the config is in it, except what may differ per worker: ``threads``, ``device``,
``name``, ``eval_every``, ``[attack]`` (a hostile worker's own; ``islands run --attack``),
``[runtime]`` (but not the keys the coordinator reads:
:data:`~islands.core.sections.COORDINATOR_KEYS`, nor ``trust`` and ``wire``, which pick the
collective and how it travels), ``[network]`` and ``[compute]`` (simulator-only), and
``data.corpus`` (the path may differ between machines; the data must not, so the sizes of every
worker's share are in it). Derived facts are added: the model's parameter and buffer shapes (a
user's task may build its model from code the config does not show) and the number of rounds.

The coordinator's own keys are how a setting only the coordinator reads is never silently
ignored on a worker: a coordinator started with a config refuses a worker whose values differ
(naming the key), and one started without a config adopts the first worker's.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from islands.core.config import RunConfig, flatten
from islands.core.sections import COORDINATOR_KEYS
from islands.metrics.run_dir import plain

# keys (dotted prefixes) a worker may set differently from the others
MAY_DIFFER = ("threads", "device", "name", "eval_every", "runtime.", "network.", "compute.",
              "data.corpus", "attack.")
# ... except these, which the coordinator reads (one value for the whole job)
COORDINATOR_READS = tuple(f"runtime.{k}" for k in COORDINATOR_KEYS)
# ... and the collective every member must run alike
JOB_WIDE = (*COORDINATOR_READS, "runtime.trust", "runtime.wire")


def _shapes(model: torch.nn.Module) -> str:
    """A short digest of the model's parameter and buffer names, shapes, dtypes and which
    parameters train."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.requires_grad};".encode())
    for name, b in model.named_buffers():
        h.update(f"{name}|{tuple(b.shape)}|{b.dtype};".encode())
    return h.hexdigest()[:16]


def config_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The must-match settings of a config, flat and JSON-safe (dotted keys, in its order)."""
    flat = flatten(plain(cfg.to_dict()))
    return {k: v for k, v in flat.items() if k in JOB_WIDE
            or not any(k == m or (m.endswith(".") and k.startswith(m)) for m in MAY_DIFFER)}


def fingerprint(cfg: RunConfig, model: torch.nn.Module, *, rounds: int,
                data_sizes: list[int] | None = None,
                samples_per_step: int | None = None) -> dict[str, Any]:
    """A worker's fingerprint: :func:`config_fingerprint`, then the derived
    ``model.shapes``, ``data.sizes``, ``data.samples_per_step`` (the samples in every batch,
    where the data fixes it) and ``rounds``."""
    out = config_fingerprint(cfg)
    out["model.shapes"] = _shapes(model)
    if data_sizes is not None:
        out["data.sizes"] = list(data_sizes)
    if samples_per_step is not None:
        out["data.samples_per_step"] = int(samples_per_step)
    out["rounds"] = rounds
    return out


def first_difference(job: dict[str, Any], mine: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first key of ``job`` (in its order) where ``mine`` differs: ``(key, the job's
    value, mine)``, or None when they agree. Only keys both have are compared: the
    coordinator learns the ones the job lacks (its own config has no model shapes), and a
    drop-in worker has no ``data.sizes`` (its data is its own loop's)."""
    for key, a in job.items():
        if key in mine and a != mine[key]:
            return key, a, mine[key]
    return None


def refusal(job: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """Why a worker with fingerprint ``mine`` cannot join ``job`` (None: it can)."""
    diff = first_difference(job, mine)
    if diff is None:
        return None
    key, a, b = diff
    if key in COORDINATOR_READS:
        return (f"{key} is read by the coordinator, which applies {a!r}; this worker has {b!r}: "
                "give the coordinator and every worker the same value (a coordinator started "
                "without --config takes the first worker's)")
    return (f"config differs from the job's: {key} is {a!r} in the job and {b!r} here "
            f"(every worker needs the same config, except {', '.join(MAY_DIFFER)})")
