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

# each rank: the combos' collectives over gloo, one JSON list of [digest, ..., bytes sent]
SCRIPT = """
import hashlib, json, sys, torch
from islands.codecs import build_codec, codec_config
from islands.collectives.butterfly import Group
from islands.transports.dist import DistTransport, new_group, open_store
rank, n, port, kind = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
combos = json.loads(sys.argv[4])
store = open_store("127.0.0.1", port, is_master=rank == 0, timeout_s=60)
t = DistTransport(rank, timeout_s=60)
t.use_group(new_group(store, kind + "/", rank, n, 60), tuple(range(n)))
out = []
for i, c in enumerate(combos):
    torch.manual_seed(1000 * i + rank)
    x = torch.randn(3001)
    sent = t.bytes_sent
    group, codecs = Group(t, tuple(range(n))), {rank: build_codec(codec_config(**c))}
    if kind == "reduce":
        r = group.all_reduce({rank: x}, codecs=codecs, tag=f"c{i}")[rank]
        got = [hashlib.sha256(r.numpy().tobytes()).hexdigest()]
    else:
        rows, w = group.gather_rows({rank: x}, codecs=codecs, weights={rank: 1.0 + rank},
                                    tag=f"g{i}")[rank]
        got = [hashlib.sha256(rows.numpy().tobytes()).hexdigest(), w.tolist()]
    out.append([*got, t.bytes_sent - sent])
print(json.dumps(out))
"""

GATHER_COMBOS = [dict(name="identity"), dict(name="int8"), dict(name="topk", entropy=True),
                 dict(name="int4", error_feedback=True)]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _over_gloo_and_simulated(kind: str, combos: list[dict], n: int = 3):
    """Each combo: every rank's output over gloo, and the simulator's group with the same
    inputs (one torch thread, as each rank)."""
    ran = run_ranks(SCRIPT, n, str(free_port()), json.dumps(combos), kind)
    for p, _, err in ran:
        assert p.returncode == 0, err
    got = [json.loads(o.strip().splitlines()[-1]) for _, o, _ in ran]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, c in enumerate(combos):
            sim = SimTransport(n, NetworkModel(), VirtualClock(n))
            xs = {}
            for r in range(n):
                torch.manual_seed(1000 * i + r)
                xs[r] = torch.randn(3001)
            codecs = {r: build_codec(codec_config(**c)) for r in range(n)}
            yield c, [got[r][i] for r in range(n)], Group(sim, tuple(range(n))), xs, codecs, sim
    finally:
        torch.set_num_threads(threads)


def test_every_codec_combination_over_gloo_equals_the_simulator():
    for c, real, group, xs, codecs, sim in _over_gloo_and_simulated("reduce", COMBOS):
        want = group.all_reduce(xs, codecs=codecs, tag=f"c{COMBOS.index(c)}")
        assert real == [[_digest(want[r]), sim.bytes_sent[r]] for r in range(len(real))], c


def test_the_all_gather_over_gloo_gives_every_member_the_simulators_rows():
    """Every member's rows, bit for bit the simulator's, weights and bytes alike (a sparse
    codec with its entropy stage and an error-feedback wrapper among them)."""
    for c, real, group, xs, codecs, sim in _over_gloo_and_simulated("gather", GATHER_COMBOS):
        want = group.gather_rows(xs, codecs=codecs, weights={r: 1.0 + r for r in xs},
                                 tag=f"g{GATHER_COMBOS.index(c)}")
        assert real == [[_digest(want[r][0]), want[r][1].tolist(), sim.bytes_sent[r]]
                        for r in range(len(real))], c
