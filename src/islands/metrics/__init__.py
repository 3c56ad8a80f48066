"""Run directories (config.json, metrics.jsonl, summary.json) and plots."""

from islands.metrics.run_dir import RunDir, read_summary

__all__ = ["RunDir", "read_summary"]
