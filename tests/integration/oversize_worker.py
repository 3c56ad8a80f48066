"""An ``islands run`` worker whose payload messages are 4 bytes longer than its signed headers
say (what a hostile peer's modified transport sends): over gloo's pairs this aborted every
receiver; over islands' streams the receivers refuse it by name.

    python tests/integration/oversize_worker.py [islands run arguments]
"""

from __future__ import annotations

import sys

import torch

import islands.transports.dist as dist_transport
from islands.cli.runtime_cmd import main

_as_bytes = dist_transport.wire.as_bytes
_start = dist_transport.DistTransport.start_exchange


def start_exchange(self, messages, members, phase, **kw):
    if "reduce-scatter" in phase:  # its contributions: 4 stray bytes after each tensor
        dist_transport.wire.as_bytes = lambda t: torch.cat(
            [_as_bytes(t), torch.zeros(4, dtype=torch.uint8)])
    try:
        return _start(self, messages, members, phase, **kw)
    finally:
        dist_transport.wire.as_bytes = _as_bytes


dist_transport.DistTransport.start_exchange = start_exchange
sys.exit(main(["run", *sys.argv[1:]]))
