"""Atomic checkpoints of the shared state (and, optionally, of one worker's own state).

A checkpoint is one ``safetensors`` file: the shared state under its own names
(``global_params``, ``outer/...``), a worker's inner optimizer under ``inner/<i>/<name>`` and
its codec under ``codec/<name>``, and JSON facts in the metadata (round, hash, the inner
optimizer's param groups and lr schedule). It is written to a temp file in the same folder,
fsynced, renamed over the target, and the folder is fsynced
(:func:`islands.core.files.write_atomic`): a killed process or a full disk leaves either the
previous checkpoint or the new one, never a truncated file or a temp file.

Resuming from the checkpoints of every worker gives the same subsequent results as the run
that wrote them; from the shared state alone, workers restart their inner optimizers. A resume
is verified first (:func:`verify`): the shared state must hash to the hash the metadata holds,
be finite, and name a round the run has. A folder keeps the newest ``keep`` checkpoints of a
worker (:func:`save_round`); temp files a killed writer left are removed
(:func:`islands.core.files.remove_temp`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from islands.algorithms.base import Worker
from islands.core.errors import ConfigError
from islands.core.files import write_atomic


def worker_tensors(worker: Worker) -> tuple[dict[str, torch.Tensor], dict]:
    """A worker's own state: inner optimizer, codec, lr schedule and step counter."""
    sd = worker.inner.state_dict()
    tensors = {f"inner/{i}/{k}": v for i, slot in sd["state"].items() for k, v in slot.items()
               if torch.is_tensor(v)}
    tensors.update({f"codec/{k}": v for k, v in worker.codec.state_dict().items()})
    facts = {"param_groups": sd["param_groups"], "steps": worker.steps,
             "scheduler": worker.scheduler.state_dict() if worker.scheduler else None}
    return tensors, facts


def restore_worker(worker: Worker, tensors: dict[str, torch.Tensor], facts: dict) -> None:
    """Restores what :func:`worker_tensors` saved."""
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("inner/"):
            _, i, k = name.split("/", 2)
            state.setdefault(int(i), {})[k] = v
    worker.inner.load_state_dict({"state": state, "param_groups": facts["param_groups"]})
    worker.codec.load_state_dict({k[len("codec/"):]: v for k, v in tensors.items()
                                  if k.startswith("codec/")})
    if worker.scheduler is not None and facts.get("scheduler"):
        worker.scheduler.load_state_dict(facts["scheduler"])
    worker.steps = int(facts["steps"])


def save(path: str | Path, shared: dict[str, torch.Tensor], facts: dict,
         worker: Worker | None = None) -> None:
    """Writes a checkpoint atomically.

    Args:
        path: the ``.safetensors`` file.
        shared: the shared state (``Algorithm.shared_state``).
        facts: JSON-serializable facts (round, hash, ...).
        worker: also save this worker's own state.
    """
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in shared.items()}
    meta = dict(facts)
    if worker is not None:
        own, own_facts = worker_tensors(worker)
        tensors.update({k: v.detach().contiguous().cpu().clone() for k, v in own.items()})
        meta["worker"] = own_facts
    write_atomic(path, st_save(tensors, metadata={"islands": json.dumps(meta)}),
                 what="the checkpoint")


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a checkpoint: ``(tensors, facts)``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"checkpoint {str(p)!r} does not exist; give a file written by "
                          "`islands run --checkpoint-dir`")
    data = p.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["islands"])
    except Exception as e:  # safetensors raises its own error types
        raise ConfigError(f"checkpoint {str(p)!r} is not a valid islands checkpoint: {e}") \
            from None
    return tensors, meta


def shared_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items()
            if k in ("global_params", "global_buffers") or k.startswith("outer/")}


def worker_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(("inner/", "codec/"))}


def verify(path: str | Path, shared: dict[str, torch.Tensor], facts: dict, rounds: int,
           private: dict[str, torch.Tensor] | None = None) -> None:
    """Refuses a checkpoint whose shared state is not what its metadata says, or whose state
    is not finite.

    Args:
        private: the worker's own state in it (inner optimizer, codec), checked finite too.

    Raises:
        ConfigError: the hash is missing or differs (corrupt bytes), a value of the shared or
            the private state is NaN/Inf, or the round is outside ``[0, rounds]``.
    """
    from islands.runtime.state import digest  # state imports this module's neighbours

    name = str(path)
    if "hash" not in facts or "round" not in facts:
        raise ConfigError(f"checkpoint {name!r} has no shared-state hash or round in its "
                          "metadata, so it cannot be verified; resume from a checkpoint "
                          "written by `islands run --checkpoint-dir`")
    got = digest(shared)
    if got != facts["hash"]:
        raise ConfigError(f"checkpoint {name!r}: its shared state hashes to {got[:12]}, its "
                          f"metadata says {str(facts['hash'])[:12]}: the file is corrupt; "
                          "resume from another checkpoint")
    for key, t in {**shared, **(private or {})}.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            whose = "" if key in shared else " (this worker's own state, which the hash does " \
                "not cover)"
            raise ConfigError(f"checkpoint {name!r}: {key} holds NaN/Inf{whose}; not resuming "
                              "from it: give an earlier checkpoint")
    r = facts["round"]
    if not isinstance(r, int) or not 0 <= r <= rounds:
        raise ConfigError(f"checkpoint {name!r}: round {r!r} in its metadata is outside this "
                          f"run's rounds 0..{rounds}; a checkpoint of another run?")


_ROUND_FILE = re.compile(r"round-(\d+)\.safetensors")


def save_round(folder: Path, r: int, shared: dict[str, torch.Tensor], facts: dict,
               worker: Worker | None, keep: int | None) -> Path:
    """Writes ``folder/round-<r>.safetensors`` and removes all but the newest ``keep``."""
    path = folder / f"round-{r}.safetensors"
    save(path, shared, facts, worker)
    if keep is not None:
        rounds = sorted((int(m.group(1)), f) for f in folder.iterdir()
                        if (m := _ROUND_FILE.fullmatch(f.name)))
        for _, old in rounds[:-keep]:
            old.unlink(missing_ok=True)
    return path


def latest(folder: Path) -> Path | None:
    """The newest ``round-<r>.safetensors`` in ``folder`` (None: there is none)."""
    if not folder.is_dir():
        return None
    rounds = sorted((int(m.group(1)), f) for f in folder.iterdir()
                    if (m := _ROUND_FILE.fullmatch(f.name)))
    return rounds[-1][1] if rounds else None
