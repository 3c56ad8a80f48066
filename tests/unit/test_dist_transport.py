"""DistTransport: the wire format refuses malformed input; over real gloo processes the
butterfly gives the simulator's result and byte counts."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from islands.codecs.base import Encoded
from islands.core.errors import CommError
from islands.transports.base import Message
from islands.transports.dist import pack, unpack


def test_pack_round_trip_keeps_every_field():
    e = Encoded({"values": torch.randn(5, 3), "idx": torch.arange(7, dtype=torch.int32)},
                numel=15, header_bytes=4, meta={"block": 8})
    msg = unpack(pack(Message(e, 16, weight=2.5)), peer=1)
    assert msg.weight == 2.5 and msg.header_bytes == 16 and msg.payload.meta == {"block": 8}
    assert torch.equal(msg.payload.tensors["values"], e.tensors["values"])
    assert torch.equal(msg.payload.tensors["idx"], e.tensors["idx"])
    assert msg.nbytes == Message(e, 16).nbytes


@pytest.mark.parametrize("raw", [b"", b"\x00\x01", b"\xff\xff\xff\xff{}", b"\x02\x00\x00\x00{}"
                                 + b"junk", b"garbage bytes on the wire" * 10])
def test_garbage_is_refused(raw):
    with pytest.raises(CommError, match="worker 3"):
        unpack(torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw
               else torch.empty(0, dtype=torch.uint8), peer=3)


def test_non_finite_and_truncated_payloads_are_refused():
    bad = pack(Message(Encoded({"values": torch.tensor([1.0, float("nan")])}, numel=2), 16))
    with pytest.raises(CommError, match="NaN"):
        unpack(bad, peer=0)
    good = pack(Message(Encoded({"values": torch.ones(64)}, numel=64), 16))
    with pytest.raises(CommError, match="malformed"):
        unpack(good[:-8], peer=0)


def test_garbage_on_a_store_port_does_not_break_the_store():
    import time

    from islands.transports.dist import open_store

    server = open_store("127.0.0.1", 0, is_master=True, timeout_s=5)
    for junk in (b"\x00" * 100, b"GET / HTTP/1.1\r\n\r\n", b"\xff" * 10_000):
        with socket.create_connection(("127.0.0.1", server.port)) as c:
            c.sendall(junk)
            time.sleep(0.1)
    silent = socket.create_connection(("127.0.0.1", server.port))
    client = open_store("127.0.0.1", server.port, is_master=False, timeout_s=5)
    client.set("k", "v")
    assert server.get("k") == b"v"
    silent.close()


def test_replaced_groups_are_released_so_threads_and_files_stay_bounded():
    """Twenty epochs of two in-process ranks: each replaced gloo group (its threads and
    sockets) is released, not kept for the life of the process."""
    import threading

    from islands.transports.dist import DistTransport, new_group, open_store

    server = open_store("127.0.0.1", 0, is_master=True, timeout_s=10)
    transports = [DistTransport(r, timeout_s=10) for r in range(2)]

    def epoch(e: int) -> None:
        groups = [None, None]

        def form(r):
            store = open_store("127.0.0.1", server.port, is_master=False, timeout_s=10)
            groups[r] = new_group(store, f"e{e}/", r, 2, 10)

        ts = [threading.Thread(target=form, args=(r,)) for r in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        for r in range(2):
            transports[r].use_group(groups[r], (0, 1))

    def counts() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))

    for e in range(3):
        epoch(e)
    before = counts()
    for e in range(3, 23):
        epoch(e)
    after = counts()
    assert after[0] - before[0] <= 4, (before, after)  # files: not ~8 per epoch
    assert after[1] - before[1] <= 4, (before, after)  # threads: not ~4 per epoch
