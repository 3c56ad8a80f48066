"""The collective's buffers: huge pages asked for exactly the whole 2 MiB pages inside a large
CPU buffer, and scratch buffers kept per key until their shape or dtype changes."""

from __future__ import annotations

import torch

from islands.core import memory
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock


def test_huge_pages_are_asked_for_the_whole_pages_inside_a_large_buffer(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_MADVISE", lambda start, length, advice: calls.append(
        (start, length, advice)) or 0)
    small = memory.empty(1000)
    assert calls == [] and small.shape == (1000,)
    big = memory.empty((3, 3_000_000), torch.float32)
    assert big.shape == (3, 3_000_000) and big.dtype == torch.float32
    (start, length, advice), = calls
    lo, hi = big.data_ptr(), big.data_ptr() + big.numel() * 4
    page = 2 << 20
    assert advice == 14 and start % page == 0 and length % page == 0
    assert lo <= start < lo + page and hi - page < start + length <= hi


def test_without_madvise_a_buffer_is_an_ordinary_one(monkeypatch):
    monkeypatch.setattr(memory, "_MADVISE", None)
    t = memory.empty(5_000_000, torch.int8)
    assert t.shape == (5_000_000,) and t.dtype == torch.int8


def test_scratch_is_kept_per_key_until_its_shape_or_dtype_changes():
    t = SimTransport(2, NetworkModel(), VirtualClock(2))
    a = t.scratch(("row", "g", 1), (10,), torch.float32, torch.device("cpu"))
    assert t.scratch(("row", "g", 1), (10,), torch.float32, "cpu") is a
    assert t.scratch(("row", "g", 2), (10,), torch.float32, "cpu") is not a
    assert t.scratch(("row", "g", 1), (11,), torch.float32, "cpu").shape == (11,)
    assert t.scratch(("row", "g", 1), (11,), torch.int8, "cpu").dtype == torch.int8
