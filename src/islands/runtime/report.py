"""The merged ``summary.json`` of a real job: the simulator's fields over all workers, plus the
runtime's totals (aborted attempts, state transfers, hash mismatches, final hashes) and the
coordinator's view of the job (the members of every epoch, rounds committed, aborted attempts,
exclusions).

``islands launch`` writes it into its folder. Workers started one by one (``islands run``, the
drop-in loop, ``torchrun``) write their own folders ``JOB/w<i>/``; each, as it finishes,
merges the summaries present in ``JOB/`` (under a file lock, so the last to finish writes
the whole job), with ``final.safetensors`` and ``loss.png`` beside it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from islands.core.files import write_atomic
from islands.metrics.run_dir import write_json

log = logging.getLogger("islands.report")

# a gossip worker's count sketches of its parameters at each evaluation ({"step<s>": sketch})
SKETCHES = "consensus_sketch.safetensors"

# taken from the lowest worker: the same on every worker of a run that ended well
_SHARED = ("name", "task", "algorithm", "workers", "steps", "rounds", "sync_every", "codec",
           "aggregator", "params", "eval_curve", "train_curve", "seed", "threads", "clock")


def merge(summaries: list[dict], coordinator: dict | None = None) -> dict:
    """The merged summary of a job, one per-worker summary each.

    Args:
        coordinator: the coordinator's view (``Coordinator.job_view``); default: the one the
            worker that left last brought back.
    """
    n = len(summaries)
    ordered = sorted(summaries, key=lambda s: s["worker"])
    first = ordered[0]
    sent = [s["bytes_sent_total"] for s in ordered]
    received = [s["bytes_received_per_worker"] for s in ordered]
    train = max(s["virtual_time_s"] for s in ordered)
    if coordinator is None:
        views = [s["coordinator"] for s in ordered if s.get("coordinator")]
        coordinator = max(views, key=lambda v: (v["last_round"], v["rounds_committed"]),
                          default=None)
    return {
        **{k: first[k] for k in _SHARED if k in first},
        **{k: v for k, v in first.items() if k.startswith("final_eval_")},
        "workers_merged": [s["worker"] for s in ordered],
        "bytes_sent_per_worker": sum(sent) / n, "bytes_received_per_worker": sum(received) / n,
        "bytes_sent_by_worker": sent, "bytes_sent_total": sum(sent),
        "bytes_received_by_worker": received,
        "virtual_time_s": train,
        "compute_utilization": sum(s["compute_utilization"] * s["virtual_time_s"]
                                   for s in ordered) / (n * train) if train else 1.0,
        "compute_s_by_worker": [s["compute_s_by_worker"][0] for s in ordered],
        "idle_s_by_worker": [s["idle_s_by_worker"][0] for s in ordered],
        "wall_time_s": max(s["wall_time_s"] for s in ordered),
        "final_hashes": sorted({s["final_hash"] for s in ordered}),
        # each worker's own model (they differ in a gossip run without a final merge)
        "final_eval_loss_by_worker": [s.get("final_eval_loss") for s in ordered],
        "rounds_committed_by_worker": [s["rounds_committed"] for s in ordered],
        "aborted_attempts": sum(s["aborted_attempts"] for s in ordered),
        "state_transfers": sum(s["state_transfers"] for s in ordered),
        "hash_mismatches": sum(s["hash_mismatches"] for s in ordered),
        "removed": {str(s["worker"]): s["removed"] for s in ordered if s.get("removed")},
        **({"coordinator": coordinator} if coordinator else {}),
    }


def worker_dirs(job: Path) -> list[Path]:
    """The worker folders ``w<i>`` of a job folder that hold a finished summary."""
    return sorted((d for d in job.glob("w*") if d.name[1:].isdigit()
                   and (d / "summary.json").is_file()), key=lambda d: int(d.name[1:]))


def write_job(job: Path, coordinator: dict | None = None, *, title: str = "",
              evaluate_states: Callable[[dict[int, dict], dict], dict] | None = None
              ) -> dict | None:
    """Merges the finished workers of ``job`` into ``job/summary.json``, copies their common
    ``final.safetensors`` (when every final hash agrees; a gossip job's workers differ: their
    average, evaluated once by ``evaluate_states``, see :func:`_write_average`) and, once every
    worker is in, draws ``job/loss.png``; returns the merged summary (None: no worker has
    finished). Safe to call from several workers at once (a lock on the folder): the last to
    finish writes the whole job."""
    fd = os.open(job, os.O_RDONLY)  # the folder itself is the lock: nothing left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        dirs = worker_dirs(job)
        if not dirs:
            return None
        summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
        merged = merge(summaries, coordinator)
        first = dirs[0] / "final.safetensors"
        if len(merged["final_hashes"]) == 1 and first.is_file():
            write_atomic(job / "final.safetensors", first.read_bytes(),
                         what="the final parameters")
        elif ("topology" in summaries[0] and len(dirs) == merged["workers"]
              and all((d / "final.safetensors").is_file() for d in dirs)):
            _write_average(job, dirs, merged, evaluate_states)
        if "topology" in summaries[0]:
            _estimate_consensus(dirs, merged)
        write_json(job / "summary.json", merged)
    finally:
        os.close(fd)
    if len(merged["workers_merged"]) < merged["workers"] and coordinator is None:
        return merged  # drawn once every worker is in (or by islands launch)
    try:
        from islands.metrics.plots import plot_runs  # matplotlib: only once the job is done

        plot_runs([merged], job / "loss.png", title=title or f"{merged['name']} (job)")
    except Exception as e:  # noqa: BLE001 (optional output)
        log.warning("%s: loss.png not drawn (%s: %s)", job, type(e).__name__, e)
    return merged


def _estimate_consensus(dirs: list[Path], merged: dict) -> None:
    """A gossip job's consensus distance at each evaluation, estimated from the sketches its
    workers kept (:func:`~islands.engine.consensus.sketch`; those present at that step,
    two at least): ``consensus_distance`` in the points of ``eval_curve``, as the simulator
    reports the exact one."""
    from safetensors.torch import load_file

    from islands.engine.consensus import SKETCH_BUCKETS, distance_of, mean_of

    at: dict[int, list] = {}
    for d in dirs:
        if (d / SKETCHES).is_file():
            for name, v in sorted(load_file(d / SKETCHES).items()):
                at.setdefault(int(name.removeprefix("step")), []).append(v)
    curve = [{**p, "consensus_distance": distance_of(at[p["step"]], mean_of(at[p["step"]]))}
             if len(at.get(p["step"], ())) > 1 else p for p in merged.get("eval_curve", ())]
    if any("consensus_distance" in p for p in curve):
        merged["eval_curve"] = curve
        merged["consensus_distance_sketch_buckets"] = SKETCH_BUCKETS


def _write_average(job: Path, dirs: list[Path], merged: dict, evaluate_states) -> None:
    """A gossip job without a final merge: ``job/final.safetensors`` is the workers' average
    (every tensor, fp32 sums in worker order, as the simulator averages); the first worker to
    write it with ``evaluate_states`` (it has the task) keeps the evaluation in
    ``job/average.json``, which every later merge reads into ``merged``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from islands.engine.consensus import mean_of

    states = {int(d.name[1:]): load_file(d / "final.safetensors") for d in dirs}
    ids = sorted(states)
    mean = {name: mean_of([states[i][name] for i in ids]).to(t.dtype)
            for name, t in states[ids[0]].items()}
    with safe_open(dirs[0] / "final.safetensors", "pt") as f:
        metadata = f.metadata()
    write_atomic(job / "final.safetensors", save(mean, metadata=metadata),
                 what="the workers' average model")
    merged["final_safetensors"] = "the average of the workers' own models"
    facts = job / "average.json"
    if evaluate_states is not None and not facts.is_file():
        write_json(facts, evaluate_states(states, mean))
    if facts.is_file():
        merged.update(json.loads(facts.read_text()))
