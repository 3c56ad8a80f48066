"""Over real gloo processes the butterfly gives the simulator's result and byte counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from islands.codecs.cast import Cast, Identity
from islands.collectives.butterfly import Group
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock
from tests.integration.conftest import free_port


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
    port = free_port()
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


