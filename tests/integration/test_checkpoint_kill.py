"""A writer SIGKILLed anywhere inside a checkpoint write leaves the previous file or the new
one, never a truncated file (temp file, fsync, rename)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from islands.runtime import checkpoint

WRITER = """
import sys, torch
from islands.runtime import checkpoint
big = {"global_params": torch.randn(4_000_000)}
i = 0
while True:
    checkpoint.save(sys.argv[1], big, {"round": i})
    i += 1
"""


def test_killed_writer_never_leaves_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "ck.safetensors"
    for attempt in range(3):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.05 + 0.13 * attempt)  # land somewhere inside a write
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        tensors, facts = checkpoint.load(path)  # always a complete file
        assert tensors["global_params"].numel() == 4_000_000
