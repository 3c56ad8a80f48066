"""Over real gloo processes the butterfly gives the simulator's result and byte counts (every
codec path: lossless rows read in place or received into a stack, lossy codecs, weights;
payloads in many chunks, worked on as they arrive; a streamed mean's all-gather relayed as it
is computed, and the same after the whole reduce), and
the bytes that go through gloo's send are the transport's ``wire_bytes_sent``, within gloo's
own framing of what the kernel was asked to write, and exceed the reported bytes by at most
the documented serialization overhead."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from islands.aggregators import mean
from islands.codecs import Cast, Identity, Int8
from islands.collectives.butterfly import Group
from islands.transports.dist import RELAY_TAG
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock
from islands.transports.wire import MAX_HEADER_OVERHEAD_BYTES
from tests.integration.conftest import free_port, run_ranks


def a_robust_rule(stacked, weights=None):
    """Any aggregator but ``mean`` itself: the butterfly stacks the rows for it."""
    return mean(stacked, weights)


# name -> (codec factory, aggregator, weighted); shared by the workers and the simulator
CASES = {
    "fp16-weighted": (lambda: Cast(torch.float16), mean, True),
    "identity": (Identity, mean, False),
    "identity-after-reduce": (Identity, mean, False),  # DistTransport.pipeline = False
    "identity-kept": (Identity, mean, False),  # into a result buffer the caller keeps (out=)
    "identity-weighted": (Identity, mean, True),
    "identity-stacked": (Identity, a_robust_rule, True),
    "int8": (lambda: Int8(block=64), mean, False),
}
NUMEL = 100_003

SCRIPT = """
import json, sys, torch
sys.path.insert(0, ".")
from islands.transports.dist import DistTransport, open_store, new_group
from islands.collectives.butterfly import Group
from islands.codecs.cast import Identity
from tests.integration.test_dist_transport import CASES, NUMEL, Counting, kernel_bytes_written
import islands.collectives.butterfly as butterfly, islands.transports.wire as wire
rank, n, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
# Small chunks and steps: every payload travels in many pieces, worked on as they arrive.
wire.CHUNK_BYTES, butterfly.STEP = 4096, 1000
store = open_store("127.0.0.1", port, is_master=rank == 0, timeout_s=30)
t = DistTransport(rank, timeout_s=30)
t.use_group(new_group(store, "test/", rank, n, 30), tuple(range(n)))
t.group = counting = Counting(t.group)
g = Group(t, tuple(range(n)))
report = {}
for name, (codec, aggregator, weighted) in CASES.items():
    torch.manual_seed(rank)
    x = torch.randn(NUMEL)
    before = (t.bytes_sent, t.wire_bytes_sent, kernel_bytes_written())
    ops, relayed = counting.ops, counting.relayed
    t.pipeline = name != "identity-after-reduce"
    kept = {rank: torch.full((NUMEL,), float("nan"))} if name == "identity-kept" else None
    out = g.all_reduce({rank: x}, codecs={rank: codec()}, aggregator=aggregator,
                       weights={rank: rank + 1.0} if weighted else None, tag=name, out=kept)
    assert kept is None or out[rank] is kept[rank]
    written = kernel_bytes_written()
    report[name] = {"bits": out[rank].view(torch.int32).tolist(),
                    "sent": t.bytes_sent - before[0], "wire": t.wire_bytes_sent - before[1],
                    "kernel": None if written is None else written - before[2],
                    "ops": counting.ops - ops, "relayed": counting.relayed - relayed}
b = g.broadcast(0, torch.arange(5.0) if rank == 0 else None, Identity(), (1, 2))
print(json.dumps({"cases": report, "sent": t.bytes_sent, "recv": t.bytes_received,
                  "wire_sent": t.wire_bytes_sent, "wire_recv": t.wire_bytes_received,
                  "through_send": counting.bytes, "bcast": b.get(rank, torch.zeros(0)).tolist()}))
"""


class Counting:
    """A process group that counts what goes through ``send`` (bytes), every op posted, and
    the sends of a relay (``dist.RELAY_TAG``)."""

    def __init__(self, group) -> None:
        self.group, self.bytes, self.ops, self.relayed = group, 0, 0, 0

    def send(self, tensors, rank, tag):
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        self.ops += 1
        self.relayed += tag == RELAY_TAG
        return self.group.send(tensors, rank, tag)

    def recv(self, tensors, rank, tag):
        self.ops += 1
        return self.group.recv(tensors, rank, tag)


def kernel_bytes_written() -> int | None:
    """Bytes this process asked the kernel to write (``wchar``; gloo writes its sockets)."""
    io = Path("/proc/self/io")
    if not io.exists():
        return None
    fields = dict(line.split(": ") for line in io.read_text().splitlines() if line)
    return int(fields["wchar"])


# gloo frames each send with a small preamble and answers each receive with a short
# ready-to-receive note; a generous bound per posted operation.
GLOO_FRAMING_BYTES_PER_OP = 256


def simulate(n: int):
    sim = SimTransport(n, NetworkModel(), VirtualClock(n))
    g = Group(sim, tuple(range(n)))
    results, sent = {}, {}
    for name, (codec, aggregator, weighted) in CASES.items():
        xs = {}
        for r in range(n):
            torch.manual_seed(r)
            xs[r] = torch.randn(NUMEL)
        before = list(sim.bytes_sent)
        results[name] = g.all_reduce(xs, codecs={r: codec() for r in range(n)},
                                     aggregator=aggregator,
                                     weights={r: r + 1.0 for r in range(n)} if weighted
                                     else None, tag=name)
        sent[name] = [b - a for a, b in zip(before, sim.bytes_sent)]
    g.broadcast(0, torch.arange(5.0), Identity(), (1, 2))
    return sim, results, sent


def test_butterfly_over_gloo_matches_the_simulator_and_counts_its_wire_bytes():
    n = 3
    port = free_port()
    ran = run_ranks(SCRIPT, n, str(port))
    for p, _, err in ran:
        assert p.returncode == 0, err
    got = [json.loads(o.strip().splitlines()[-1]) for _, o, _ in ran]

    sim, want, sent = simulate(n)
    messages = 2 * (n - 1)  # per worker and all-reduce: n-1 shards, then n-1 aggregates
    for r in range(n):
        for name in CASES:
            case = got[r]["cases"][name]
            assert case["bits"] == want[name][r].view(torch.int32).tolist(), (name, r)
            assert case["sent"] == sent[name][r], name
            # a streamed mean of lossless rows is relayed (its all-gather sent as computed)
            assert (case["relayed"] > 0) == (
                name in ("identity", "identity-weighted", "identity-kept")), name
            overhead = case["wire"] - case["sent"]
            assert 0 < overhead <= messages * MAX_HEADER_OVERHEAD_BYTES, (name, overhead)
            if case["kernel"] is not None:
                framing = case["kernel"] - case["wire"]
                assert 0 <= framing <= case["ops"] * GLOO_FRAMING_BYTES_PER_OP, (name, framing)
        assert got[r]["sent"] == sim.bytes_sent[r]
        assert got[r]["recv"] == sim.bytes_received[r]
        assert got[r]["through_send"] == got[r]["wire_sent"]
    assert sum(g["wire_recv"] for g in got) == sum(g["wire_sent"] for g in got)
    assert got[1]["bcast"] == [0.0, 1.0, 2.0, 3.0, 4.0]
