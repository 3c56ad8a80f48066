"""DistTransport: the wire format refuses malformed input; over real gloo processes the
butterfly gives the simulator's result and byte counts."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from islands.codecs.base import Encoded
from islands.core.errors import CommError
from islands.transports import wire
from islands.transports.base import Message


def received(raw: bytes | torch.Tensor, capacity: int = 4096) -> torch.Tensor:
    """What gloo leaves in a header buffer: the message, then whatever was there before."""
    raw = raw if isinstance(raw, torch.Tensor) else torch.frombuffer(bytearray(raw),
                                                                     dtype=torch.uint8)
    buf = torch.full((max(capacity, raw.numel()),), 0x7B, dtype=torch.uint8)  # '{' garbage
    buf[:raw.numel()] = raw
    return buf


def test_header_round_trip_keeps_every_field_and_the_byte_count():
    e = Encoded({"values": torch.randn(5, 3), "idx": torch.arange(7, dtype=torch.int32)},
                numel=15, header_bytes=4, meta={"block": 8})
    head = wire.pack_header(Message(e, 16, weight=2.5))
    h = wire.unpack_header(received(head), peer=1)
    assert wire.header_length(received(head)) == head.numel()
    assert (h.weight, h.header_bytes, h.numel, h.codec_header_bytes, h.meta) == (2.5, 16, 15, 4,
                                                                                 {"block": 8})
    assert h.tensors == [("idx", torch.int32, (7,)), ("values", torch.float32, (5, 3))]
    tensors = wire.receive_buffers(h, None)
    for name, t in tensors.items():  # as the receiver fills them from the sender's bytes
        wire.as_bytes(t).copy_(wire.as_bytes(e.tensors[name]))
    msg = wire.message(h, tensors)
    assert torch.equal(msg.payload.tensors["values"], e.tensors["values"])
    assert msg.nbytes == Message(e, 16).nbytes
    assert wire.unpack_header(received(wire.pack_header(None)), peer=1) is None


def test_a_tensor_is_received_where_the_caller_places_it_only_when_it_fits():
    h = wire.unpack_header(received(wire.pack_header(Message(
        Encoded({"values": torch.ones(4)}, numel=4), 16))), peer=0)
    home = torch.zeros(10)
    assert wire.receive_buffers(h, lambda *_: home[2:6])["values"].data_ptr() == \
        home[2:6].data_ptr()
    for wrong in (home[:5], home[::2][:4], torch.zeros(4, dtype=torch.float64)):
        offered = wire.receive_buffers(h, lambda *_, w=wrong: w)["values"]
        assert offered.data_ptr() != wrong.data_ptr()


def header_with(**change) -> bytes:
    import json
    import struct

    fields = {"w": 1.0, "hb": 16, "n": 4, "dt": "torch.float32", "eh": 0, "meta": {},
              "t": [["values", "torch.float32", [4]]], **change}
    head = json.dumps(fields).encode()
    return struct.pack("<I", len(head)) + head


@pytest.mark.parametrize("raw", [b"", b"\x00\x01", b"\xff\xff\xff\xff{}", b"\x02\x00\x00\x00{}"
                                 + b"junk", b"garbage bytes on the wire" * 10,
                                 header_with(t=[["values", "torch.complex64", [4]]]),
                                 header_with(t=[["values", "torch.float32", [-4]]]),
                                 header_with(t=[["v", "torch.float32", [4]]] * 2),
                                 header_with(t=[["values", "torch.float32", [1 << 40]]]),
                                 header_with(w="heavy"), header_with(n=None)])
def test_garbage_is_refused_naming_the_peer(raw):
    with pytest.raises(CommError, match="worker 3"):
        wire.unpack_header(torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw
                           else torch.empty(0, dtype=torch.uint8), peer=3)


@pytest.mark.parametrize("raw", [header_with(w=float("nan")), header_with(n=-1),
                                 header_with(hb=-16)])
def test_impossible_values_are_refused_naming_the_peer(raw):
    with pytest.raises(CommError, match="worker 2.*refused"):
        wire.unpack_header(received(raw), peer=2)


def test_non_finite_payloads_are_refused_naming_the_peer_and_the_tensor():
    bad = Message(Encoded({"values": torch.tensor([1.0, float("nan")])}, numel=2), 16)
    with pytest.raises(CommError, match="worker 0: tensor 'values' holds NaN"):
        wire.check_finite(bad, peer=0)
    wire.check_finite(Message(Encoded({"values": torch.tensor([3e38, 3e38])}, numel=2), 16),
                      peer=0)  # finite values whose sum overflows are finite


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


def _epoch(server, transports, e: int) -> None:
    """Two in-process ranks form gloo group ``e`` and switch their transports to it."""
    import threading

    from islands.transports.dist import new_group, open_store

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


def test_replaced_groups_are_released_so_threads_and_files_stay_bounded():
    """Twenty epochs of two in-process ranks: each replaced gloo group (its threads and
    sockets) is released, not kept for the life of the process."""
    from islands.transports.dist import DistTransport, open_store

    server = open_store("127.0.0.1", 0, is_master=True, timeout_s=10)
    transports = [DistTransport(r, timeout_s=10) for r in range(2)]

    def counts() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))

    for e in range(3):
        _epoch(server, transports, e)
    before = counts()
    for e in range(3, 23):
        _epoch(server, transports, e)
    after = counts()
    assert after[0] - before[0] <= 4, (before, after)  # files: not ~8 per epoch
    assert after[1] - before[1] <= 4, (before, after)  # threads: not ~4 per epoch


def test_waits_reuse_their_threads_and_one_given_up_on_does_not_hold_up_the_next(
        monkeypatch):
    """A thread per wait made a long-running worker's memory grow round after round: the
    helpers that wait on gloo are kept and reused, and a wait abandoned on a silent peer only
    keeps its own helper busy."""
    import threading

    from islands.transports.dist import DistTransport, open_store

    server = open_store("127.0.0.1", 0, is_master=True, timeout_s=10)
    t0, t1 = DistTransport(0, timeout_s=10), DistTransport(1, timeout_s=10)
    _epoch(server, [t0, t1], 0)

    def exchange(tag: int) -> torch.Tensor:
        got = torch.zeros(4)
        sends = t0._post([(wire.as_bytes(torch.full((4,), float(tag))), 1)], [], tag, "test")
        recvs = t1._post([], [(wire.as_bytes(got), 0)], tag, "test")
        t0._wait(sends, "test")
        t1._wait(recvs, "test")
        return got

    for tag in range(1, 4):
        exchange(tag)
    started, start = [], threading.Thread.start

    def counted(thread):
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    assert all(bool((exchange(tag) == tag).all()) for tag in range(4, 104))
    t0.timeout_s = 0.2  # a receive nobody answers: given up on, its helper stays busy
    with pytest.raises(CommError, match="no answer within"):
        t0._wait(t0._post([], [(wire.as_bytes(torch.zeros(4)), 1)], 200, "test"), "test")
    t0.timeout_s = 10
    assert bool((exchange(300) == 300).all())  # another helper takes the next wait
    monkeypatch.undo()
    assert len(started) <= 3, started  # one per wait before: over 200 here


def test_a_receive_given_up_on_never_lands_in_the_next_collectives_buffer():
    """A peer late past the timeout still writes into the buffer its receive was posted on:
    the transport must not hand that kept buffer to the next collective."""
    import time

    from islands.transports.dist import DistTransport, open_store

    server = open_store("127.0.0.1", 0, is_master=True, timeout_s=10)
    t0, t1 = DistTransport(0, timeout_s=10), DistTransport(1, timeout_s=10)
    _epoch(server, [t0, t1], 0)
    old = t0.scratch(("row", 1), (4,), torch.float32, torch.device("cpu")).zero_()
    works = t0._post([], [(wire.as_bytes(old), 1)], 1, "test")
    t0.timeout_s = 0.2
    with pytest.raises(CommError, match="no answer within"):
        t0._wait(works, "test")
    new = t0.scratch(("row", 1), (4,), torch.float32, torch.device("cpu")).zero_()
    t1._wait(t1._post([(wire.as_bytes(torch.ones(4)), 0)], [], 1, "test"), "test")  # late
    deadline = time.monotonic() + 10
    while not bool((old == 1).all()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bool((old == 1).all()) and bool((new == 0).all())


def test_chunks_cover_a_tensor_in_order(monkeypatch):
    monkeypatch.setattr(wire, "CHUNK_BYTES", 10)
    assert wire.chunks(0) == []
    assert wire.chunks(10) == [(0, 10)]
    assert wire.chunks(25) == [(0, 10), (10, 20), (20, 25)]


@pytest.mark.parametrize("name", sorted(__import__("tests.codec_cases").codec_cases.FACTORIES))
def test_every_codec_s_payload_crosses_the_wire_format(name):
    """Header (JSON: the codec's meta included) and tensor bytes as the receiver rebuilds
    them decode to what the payload itself decodes to."""
    from tests.codec_cases import make

    layout = [torch.Size([40, 25]), torch.Size([24])]
    codec = make(name, layout)
    e = codec.encode(torch.randn(1024), key="w0/g/scatter")
    h = wire.unpack_header(received(wire.pack_header(Message(e, 16))), peer=0)
    tensors = wire.receive_buffers(h, None)
    for k, t in tensors.items():
        wire.as_bytes(t).copy_(wire.as_bytes(e.tensors[k]))
    assert torch.equal(make(name, layout).decode(wire.message(h, tensors).payload),
                       codec.decode(e))
