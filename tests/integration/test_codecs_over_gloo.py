"""Every codec and wrapper combination the config allows goes through the real transport and
gives the simulator's result, bit for bit, with the same byte counts (the entropy stage's
framing included: its metadata must survive the wire's JSON header)."""

from __future__ import annotations

import hashlib
import itertools
import json

import torch

from islands.codecs import build_codec, codec_config, codec_names
from islands.collectives.butterfly import Group
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock
from tests.integration.conftest import free_port, run_ranks

COMBOS = [dict(name=n, error_feedback=ef, entropy=en)
          for n, ef, en in itertools.product(codec_names(), (False, True), (False, True))]

SCRIPT = """
import hashlib, json, sys, torch
from islands.codecs import build_codec, codec_config
from islands.collectives.butterfly import Group
from islands.transports.dist import DistTransport, new_group, open_store
rank, n, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
combos = json.loads(sys.argv[4])
store = open_store("127.0.0.1", port, is_master=rank == 0, timeout_s=60)
t = DistTransport(rank, timeout_s=60)
t.use_group(new_group(store, "codecs/", rank, n, 60), tuple(range(n)))
out = []
for i, c in enumerate(combos):
    torch.manual_seed(1000 * i + rank)
    x = torch.randn(3001)
    sent = t.bytes_sent
    codec = build_codec(codec_config(**c))
    r = Group(t, tuple(range(n))).all_reduce({rank: x}, codecs={rank: codec}, tag=f"c{i}")[rank]
    out.append([hashlib.sha256(r.numpy().tobytes()).hexdigest(), t.bytes_sent - sent])
print(json.dumps(out))
"""


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_every_codec_combination_over_gloo_equals_the_simulator():
    n, port = 3, free_port()
    ran = run_ranks(SCRIPT, n, str(port), json.dumps(COMBOS))
    for p, _, err in ran:
        assert p.returncode == 0, err
    got = [json.loads(o.strip().splitlines()[-1]) for _, o, _ in ran]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, c in enumerate(COMBOS):
            sim = SimTransport(n, NetworkModel(), VirtualClock(n))
            xs = {}
            for r in range(n):
                torch.manual_seed(1000 * i + r)
                xs[r] = torch.randn(3001)
            want = Group(sim, tuple(range(n))).all_reduce(
                xs, codecs={r: build_codec(codec_config(**c)) for r in range(n)}, tag=f"c{i}")
            for r in range(n):
                assert got[r][i][0] == _digest(want[r]), (c, r)
                assert got[r][i][1] == sim.bytes_sent[r], (c, r)
    finally:
        torch.set_num_threads(threads)


GATHER_COMBOS = [dict(name="identity"), dict(name="int8"), dict(name="topk", entropy=True),
                 dict(name="int4", error_feedback=True)]

GATHER = """
import hashlib, json, sys, torch
from islands.codecs import build_codec, codec_config
from islands.collectives.butterfly import Group
from islands.transports.dist import DistTransport, new_group, open_store
rank, n, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
combos = json.loads(sys.argv[4])
store = open_store("127.0.0.1", port, is_master=rank == 0, timeout_s=60)
t = DistTransport(rank, timeout_s=60)
t.use_group(new_group(store, "gather/", rank, n, 60), tuple(range(n)))
out = []
for i, c in enumerate(combos):
    torch.manual_seed(1000 * i + rank)
    x = torch.randn(3001)
    sent = t.bytes_sent
    rows, w = Group(t, tuple(range(n))).gather_rows(
        {rank: x}, codecs={rank: build_codec(codec_config(**c))}, weights={rank: 1.0 + rank},
        tag=f"g{i}")[rank]
    out.append([hashlib.sha256(rows.numpy().tobytes()).hexdigest(), w.tolist(),
                t.bytes_sent - sent])
print(json.dumps(out))
"""


def test_the_all_gather_over_gloo_gives_every_member_the_simulators_rows():
    """Every member's rows, bit for bit the simulator's, weights and bytes alike (a sparse
    codec with its entropy stage and an error-feedback wrapper among them)."""
    n, port = 3, free_port()
    ran = run_ranks(GATHER, n, str(port), json.dumps(GATHER_COMBOS))
    for p, _, err in ran:
        assert p.returncode == 0, err
    got = [json.loads(o.strip().splitlines()[-1]) for _, o, _ in ran]
    for i, c in enumerate(GATHER_COMBOS):
        sim = SimTransport(n, NetworkModel(), VirtualClock(n))
        xs = {}
        for r in range(n):
            torch.manual_seed(1000 * i + r)
            xs[r] = torch.randn(3001)
        want = Group(sim, tuple(range(n))).gather_rows(
            xs, codecs={r: build_codec(codec_config(**c)) for r in range(n)},
            weights={r: 1.0 + r for r in range(n)}, tag=f"g{i}")
        for r in range(n):
            rows, w = want[r]
            assert got[r][i] == [_digest(rows), w.tolist(), sim.bytes_sent[r]], (c, r)
