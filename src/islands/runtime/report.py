"""A runtime worker's run directory and per-round log line.

Same files as the simulator's :class:`~islands.metrics.run_dir.RunDir`: ``config.json``,
``metrics.jsonl`` (one line per committed round, with the simulator's fields plus the
runtime's: participants, attempts, hash, durations, commit time) and ``summary.json``; plus
``final.safetensors``, the shared state at the end (see :mod:`islands.runtime.checkpoint`).
``merge`` writes the merged ``summary.json`` of a launch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from islands.metrics.run_dir import _clean, write_json
from islands.runtime import checkpoint, state

log = logging.getLogger("islands.worker")


class RoundLog:
    """Writes one worker's run directory.

    Args:
        path: the folder (created).
        worker: the worker's id.
    """

    def __init__(self, path: str | Path, worker: int) -> None:
        self.path = Path(path)
        self.worker = worker
        self._metrics = None

    def start(self, cfg) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", cfg.to_dict())
        self._metrics = open(self.path / "metrics.jsonl", "a")

    def log_round(self, row: dict, step: int, losses: list[float], transport, sent0: int,
                  recv0: int, elapsed_s: float, point: dict | None) -> None:
        full = {"round": row["round"], "step": step, "worker": self.worker,
                "train_loss": sum(losses) / len(losses) if losses else None,
                "bytes_sent": transport.bytes_sent - sent0,
                "bytes_received": transport.bytes_received - recv0,
                "bytes_sent_cum": transport.bytes_sent, "virtual_time_s": elapsed_s, **row}
        if point is not None:
            full["eval_loss"] = point["eval_loss"]
        self._metrics.write(json.dumps(_clean(full)) + "\n")
        self._metrics.flush()
        log.info("round %d | worker %d | members %s | %s | sent %d B | inner %.2f s | "
                 "sync %.3f s | attempts %d | hash %s%s", row["round"], self.worker,
                 row["participants"], "committed", full["bytes_sent"], row["inner_s"],
                 row["sync_s"], row["attempts"], (row["hash"] or "-")[:12],
                 "" if row["hash_ok"] else " MISMATCH")

    def finish(self, summary: dict, shared: dict, round: int) -> None:
        self._metrics.close()
        checkpoint.save(self.path / "final.safetensors", shared,
                        {"round": round, "hash": state.digest(shared),
                         "worker_id": self.worker})
        write_json(self.path / "summary.json", summary)


def merge(summaries: list[dict]) -> dict:
    """The merged summary of a launch: the simulator's fields over all workers."""
    n = len(summaries)
    first = min(summaries, key=lambda s: s["worker"])
    sent = [s["bytes_sent_total"] for s in sorted(summaries, key=lambda s: s["worker"])]
    received = [s["bytes_received_per_worker"] for s in summaries]
    train = max(s["virtual_time_s"] for s in summaries)
    return {
        **{k: first[k] for k in ("name", "algorithm", "workers", "steps", "rounds", "sync_every",
                                 "codec", "params", "final_eval_loss", "eval_curve", "seed")},
        "bytes_sent_per_worker": sum(sent) / n, "bytes_received_per_worker": sum(received) / n,
        "bytes_sent_by_worker": sent, "bytes_sent_total": sum(sent),
        "virtual_time_s": train,
        "compute_utilization": sum(s["compute_utilization"] * s["virtual_time_s"]
                                   for s in summaries) / (n * train) if train else 1.0,
        "wall_time_s": max(s["wall_time_s"] for s in summaries),
        "final_hashes": sorted({s["final_hash"] for s in summaries}),
        "aborted_attempts": sum(s["aborted_attempts"] for s in summaries),
        "state_transfers": sum(s["state_transfers"] for s in summaries),
        "hash_mismatches": sum(s["hash_mismatches"] for s in summaries),
    }
