"""DistTransport: the wire format refuses malformed input; over real gloo processes the
butterfly gives the simulator's result and byte counts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from islands.codecs.base import Encoded
from islands.codecs.cast import Cast, Identity
from islands.collectives.butterfly import Group
from islands.core.errors import CommError
from islands.transports.base import Message
from islands.transports.dist import pack, unpack
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock


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


SCRIPT = """
import json, sys, torch
from islands.transports.dist import DistTransport, open_store, new_group
from islands.collectives.butterfly import Group
from islands.codecs.cast import Cast, Identity
rank, n, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store = open_store("127.0.0.1", port, is_master=rank == 0, timeout_s=30)
t = DistTransport(rank, timeout_s=30)
t.use_group(new_group(store, "test/", rank, n, 30), tuple(range(n)))
g = Group(t, tuple(range(n)))
torch.manual_seed(rank)
x = torch.randn(1001)
out = g.all_reduce({rank: x}, codecs={rank: Cast(torch.float16)}, weights={rank: rank + 1.0})
b = g.broadcast(0, torch.arange(5.0) if rank == 0 else None, Identity(), (1, 2))
print(json.dumps({"sum": out[rank].tolist(), "sent": t.bytes_sent, "recv": t.bytes_received,
                  "bcast": b.get(rank, torch.zeros(0)).tolist()}))
"""


def test_butterfly_over_gloo_matches_the_simulator(tmp_path):
    n = 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ps = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(r), str(n), str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for r in range(n)]
    outs = [p.communicate(timeout=120) for p in ps]
    for p, (_, err) in zip(ps, outs):
        assert p.returncode == 0, err
    got = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]

    sim = SimTransport(n, NetworkModel(), VirtualClock(n))
    g = Group(sim, tuple(range(n)))
    xs = {}
    for r in range(n):
        torch.manual_seed(r)
        xs[r] = torch.randn(1001)
    want = g.all_reduce(xs, codecs={r: Cast(torch.float16) for r in range(n)},
                        weights={r: r + 1.0 for r in range(n)})
    g.broadcast(0, torch.arange(5.0), Identity(), (1, 2))
    for r in range(n):
        assert torch.equal(torch.tensor(got[r]["sum"]), want[r])
        assert got[r]["sent"] == sim.bytes_sent[r]
        assert got[r]["recv"] == sim.bytes_received[r]
    assert got[1]["bcast"] == [0.0, 1.0, 2.0, 3.0, 4.0]


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
