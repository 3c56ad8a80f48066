"""Collectives over a Transport: one butterfly all-reduce for every codec and aggregator."""

from islands.collectives.butterfly import MESSAGE_HEADER_BYTES, Group, shard_bounds

__all__ = ["Group", "MESSAGE_HEADER_BYTES", "shard_bounds"]
