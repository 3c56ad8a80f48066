"""The merged ``summary.json`` of a launch: the simulator's fields over all workers, plus the
runtime's totals (aborted attempts, state transfers, hash mismatches, final hashes)."""

from __future__ import annotations

# taken from the lowest worker: the same on every worker of a run that ended well
_SHARED = ("name", "task", "algorithm", "workers", "steps", "rounds", "sync_every", "codec",
           "aggregator", "params", "eval_curve", "train_curve", "seed", "threads")


def merge(summaries: list[dict]) -> dict:
    """The merged summary of a launch, one per-worker summary each."""
    n = len(summaries)
    ordered = sorted(summaries, key=lambda s: s["worker"])
    first = ordered[0]
    sent = [s["bytes_sent_total"] for s in ordered]
    received = [s["bytes_received_per_worker"] for s in ordered]
    train = max(s["virtual_time_s"] for s in ordered)
    return {
        **{k: first[k] for k in _SHARED if k in first},
        **{k: v for k, v in first.items() if k.startswith("final_eval_")},
        "bytes_sent_per_worker": sum(sent) / n, "bytes_received_per_worker": sum(received) / n,
        "bytes_sent_by_worker": sent, "bytes_sent_total": sum(sent),
        "virtual_time_s": train,
        "compute_utilization": sum(s["compute_utilization"] * s["virtual_time_s"]
                                   for s in ordered) / (n * train) if train else 1.0,
        "compute_s_by_worker": [s["compute_s_by_worker"][0] for s in ordered],
        "idle_s_by_worker": [s["idle_s_by_worker"][0] for s in ordered],
        "wall_time_s": max(s["wall_time_s"] for s in ordered),
        "final_hashes": sorted({s["final_hash"] for s in ordered}),
        "aborted_attempts": sum(s["aborted_attempts"] for s in ordered),
        "state_transfers": sum(s["state_transfers"] for s in ordered),
        "hash_mismatches": sum(s["hash_mismatches"] for s in ordered),
    }
