"""The butterfly all-reduce: equals a plain mean, and its bytes follow 2(n-1)/n · S + headers."""

from __future__ import annotations

import pytest
import torch

from islands.aggregators import mean
from islands.codecs import Cast, Identity
from islands.collectives.butterfly import MESSAGE_HEADER_BYTES, Group, shard_bounds
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock


def make_group(n: int, **net) -> tuple[Group, SimTransport]:
    transport = SimTransport(n, NetworkModel(**net), VirtualClock(n))
    return Group(transport, tuple(range(n))), transport


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)  # unlike torch.equal, tells -0.0 from +0.0


@pytest.mark.parametrize("n", range(1, 10))
@pytest.mark.parametrize("numel", [1, 7, 100, 1001])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_the_stacked_mean_bit_for_bit_and_bytes_formula(n, numel, weighted):
    """Lossless, the collective's result is each shard's mean(stack) exactly, as it always was:
    the streamed mean (n <= 4) and the stack (n >= 5) give the same bits."""
    torch.manual_seed(n * 1000 + numel)
    xs = {i: torch.randn(numel) * 10.0 ** (i % 4 - 2) for i in range(n)}
    for x in xs.values():
        x[-1] = -0.0  # a column of -0.0 everywhere: its mean is +0.0
    weights = {i: 1.0 + i % 3 for i in range(n)} if weighted else None
    group, transport = make_group(n)
    out = group.all_reduce(xs, codecs={i: Identity() for i in range(n)}, weights=weights)
    stacked = torch.stack([xs[i] for i in range(n)])
    w = None if weights is None else torch.tensor([weights[i] for i in range(n)],
                                                  dtype=torch.float64)
    expected = torch.cat([mean(stacked[:, a:b].contiguous(), w)
                          for a, b in shard_bounds(numel, n)])
    for i in range(n):
        assert torch.equal(bits(out[i]), bits(expected))  # and so on every worker alike
    # Each worker sends its n-1 foreign shards, then its aggregated shard to n-1 others.
    bounds = shard_bounds(numel, n)
    for i in range(n):
        own = bounds[i][1] - bounds[i][0]
        payload = 4 * (numel - own) + 4 * own * (n - 1)
        assert transport.bytes_sent[i] == payload + 2 * (n - 1) * MESSAGE_HEADER_BYTES
        assert transport.bytes_received[i] == transport.bytes_sent[i]
    total_payload = sum(transport.bytes_sent) - n * 2 * (n - 1) * MESSAGE_HEADER_BYTES
    assert total_payload == 2 * (n - 1) * 4 * numel  # = n · 2(n-1)/n · S


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("codec", [Identity, lambda: Cast(torch.float16)])
def test_a_kept_result_buffer_receives_the_same_bits_call_after_call(n, codec):
    """``out=``: the result written into the caller's buffers, the same bits as fresh ones,
    and a second call overwrites every value of the first."""
    numel = 1001
    group, _ = make_group(n)
    kept = {i: torch.full((numel,), float("nan")) for i in range(n)}
    for seed in (1, 2):
        torch.manual_seed(seed)
        xs = {i: torch.randn(numel) for i in range(n)}
        fresh = group.all_reduce(xs, codecs={i: codec() for i in range(n)}, tag=f"f{seed}")
        got = group.all_reduce(xs, codecs={i: codec() for i in range(n)}, tag=f"k{seed}",
                               out=kept)
        for i in range(n):
            assert got[i].data_ptr() == kept[i].data_ptr()
            assert torch.equal(bits(got[i]), bits(fresh[i]))


def _one_buffer_twice(xs):
    b = torch.empty(10)
    return {0: b, 1: b}


@pytest.mark.parametrize("bad, words", [
    (lambda xs: {0: torch.empty(10)}, "give one for each local contributor [0, 1]"),
    (lambda xs: {0: torch.empty(10), 1: torch.empty(9)}, "out[1] is a torch.float32 tensor "
                                                        "of shape (9,)"),
    (lambda xs: {0: torch.empty(10), 1: torch.empty(10, dtype=torch.float64)},
     "out[1] is a torch.float64 tensor"),
    (lambda xs: {0: torch.empty(20)[::2], 1: torch.empty(10)},
     "out[0] is a non-contiguous torch.float32 tensor"),
    (lambda xs: {0: xs[0], 1: torch.empty(10)}, "out[0] shares the contribution's memory"),
    (_one_buffer_twice, "out gives two workers the same buffer"),
])
def test_a_result_buffer_that_does_not_fit_is_refused_naming_it(bad, words):
    group, transport = make_group(2)
    xs = {i: torch.randn(10) for i in range(2)}
    with pytest.raises(ValueError, match="out") as e:
        group.all_reduce(xs, codecs={i: Identity() for i in range(2)}, out=bad(xs))
    assert words in str(e.value)
    assert transport.bytes_sent == [0, 0]  # refused before anything was sent


class _WithNativeCollective(SimTransport):
    """A transport with a collective of its own (the real one's gloo ``all_reduce``)."""

    def all_reduce_mean(self, tensor, members, phase):
        return tensor.div_(len(members))


def test_a_trusted_job_checks_its_result_buffer_too_and_uses_it_without_a_native_collective():
    """``native=True``: a buffer that does not fit is refused before the transport's own
    collective runs; a transport without one (the simulator's) runs the butterfly, which
    writes into the caller's buffer as without ``native``."""
    x = torch.randn(10)
    native = Group(_WithNativeCollective(1, NetworkModel(), VirtualClock(1)), (0,))
    with pytest.raises(ValueError, match=r"out\[0\] is a torch.float32 tensor of shape \(9,\)"):
        native.all_reduce({0: x.clone()}, codecs={0: Identity()}, native=True,
                          out={0: torch.empty(9)})
    got = native.all_reduce({0: x.clone()}, codecs={0: Identity()}, native=True,
                            out={0: torch.empty(10)})
    assert torch.equal(got[0], x)  # the contribution, divided by n = 1 in place
    group, _ = make_group(1)
    kept = {0: torch.full((10,), float("nan"))}
    got = group.all_reduce({0: x}, codecs={0: Identity()}, native=True, out=kept)
    assert got[0].data_ptr() == kept[0].data_ptr() and torch.equal(got[0], x)


def test_bytes_per_worker_is_two_n_minus_one_over_n_of_encoded_size():
    n, numel = 4, 4000  # divisible: every shard has 1000 values
    group, transport = make_group(n)
    group.all_reduce({i: torch.randn(numel) for i in range(n)},
                     codecs={i: Cast(torch.float16) for i in range(n)})
    encoded = 2 * numel
    assert all(b == 2 * (n - 1) / n * encoded + 2 * (n - 1) * MESSAGE_HEADER_BYTES
               for b in transport.bytes_sent)


def test_weighted_mean_uses_header_weights():
    group, _ = make_group(3)
    xs = {0: torch.zeros(5), 1: torch.ones(5), 2: torch.full((5,), 4.0)}
    out = group.all_reduce(xs, codecs={i: Identity() for i in range(3)},
                           weights={0: 1.0, 1: 1.0, 2: 2.0})
    torch.testing.assert_close(out[0], torch.full((5,), 9 / 4))
    torch.testing.assert_close(mean(torch.stack(list(xs.values())), None), torch.full((5,), 5 / 3))


def test_shard_plan_covers_everything():
    for numel in range(0, 30):
        for n in range(1, 10):
            b = shard_bounds(numel, n)
            assert b[0][0] == 0 and b[-1][1] == numel
            assert all(b[j][1] == b[j + 1][0] for j in range(n - 1))
            assert max(e - s for s, e in b) - min(e - s for s, e in b) <= 1


def test_virtual_time_is_latency_plus_transfer():
    n, numel = 2, 250_000  # 1 MB fp32
    group, transport = make_group(n, bandwidth_bps=8e6, latency_s=0.05)  # 1 MB/s links
    group.all_reduce({i: torch.randn(numel) for i in range(n)},
                     codecs={i: Identity() for i in range(n)})
    per_phase = 0.05 + (numel // 2 * 4 + MESSAGE_HEADER_BYTES) * 8 / 8e6
    assert transport.clock.now == pytest.approx([2 * per_phase] * 2)


def test_slow_uplink_slows_everyone():
    n = 3
    fast, _ = make_group(n)
    slow_t = SimTransport(n, NetworkModel(overrides={1: {"upload_bps": 1e6}}), VirtualClock(n))
    slow = Group(slow_t, tuple(range(n)))
    xs = {i: torch.randn(30_000) for i in range(n)}
    fast.all_reduce(xs, codecs={i: Identity() for i in range(n)})
    slow.all_reduce(xs, codecs={i: Identity() for i in range(n)})
    assert min(slow_t.clock.now) > 10 * max(fast.transport.clock.now)


class _Liar(Identity):
    """A worker whose payloads are malformed in one way (what a buggy or hostile peer sends)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def _encode(self, x, key, offset):
        e = super()._encode(x, key, offset)
        if self.how == "short":  # one value fewer than the shard, and it says so
            e.tensors["values"], e.numel = e.tensors["values"][:-1], e.numel - 1
        elif self.how == "dtype":  # claims to decode to integers
            e.dtype = torch.int32
        elif self.how == "size":  # the right numel in the header, too few bytes behind it
            e.tensors["values"] = e.tensors["values"][:-1]
        elif self.how == "garbage":  # the right size, but not what the codec decodes
            e.tensors = {"other": e.tensors["values"]}
        elif self.how == "nan" or (self.how == "nan-gather" and key.endswith("/gather")):
            e.tensors["values"] = e.tensors["values"].clone()
            e.tensors["values"][len(e.tensors["values"]) // 2] = float("nan")
        elif self.how == "inf-scatter-to-0" and key.endswith("/scatter") and offset == 0:
            e.tensors["values"] = e.tensors["values"].clone()
            e.tensors["values"][0] = float("-inf")
        return e


@pytest.mark.parametrize("how, words", [("short", "holds 49 values"), ("dtype", "torch.int32"),
                                        ("size", "its codec sends 200"),
                                        ("garbage", "does not decode")])
def test_a_malformed_payload_is_refused_before_aggregation_naming_the_sender(how, words):
    """A robust rule (any aggregator but the mean) sees only checked rows."""
    from islands.core.errors import CommError

    calls = []

    def aggregator(stacked, weights=None):
        calls.append(stacked)
        return mean(stacked, weights)

    group, _ = make_group(3)
    xs = {i: torch.randn(150) for i in range(3)}
    codecs = {0: Identity(), 1: _Liar(how), 2: Identity()}
    with pytest.raises(CommError, match=f"payload from worker 1 .*{words}|{words}.*refused"):
        group.all_reduce(xs, codecs=codecs, aggregator=aggregator)
    assert calls == []  # refused before any aggregation


@pytest.mark.parametrize("how, stream", [("nan", True), ("nan", False),
                                         ("inf-scatter-to-0", True), ("nan-gather", True)])
def test_a_non_finite_payload_is_refused_naming_the_sender(how, stream):
    """NaN/Inf from a worker (here a lying codec, as a Byzantine worker would send) is refused
    naming it, whether the reduction streams the rows (mean) or stacks them (another rule),
    in the reduce-scatter and in the all-gather, instead of reaching anyone's result."""
    from islands.core.errors import PeerRefused

    group, _ = make_group(3)
    xs = {i: torch.randn(150) for i in range(3)}
    codecs = {0: Identity(), 1: _Liar(how), 2: Identity()}
    aggregator = mean if stream else (lambda stacked, weights=None: mean(stacked, weights))
    with pytest.raises(PeerRefused, match="payload from worker 1 decodes to NaN/Inf; refused") \
            as refused:
        group.all_reduce(xs, codecs=codecs, aggregator=aggregator)
    assert refused.value.sender == 1


def test_finite_rows_whose_mean_overflows_are_refused_by_the_encoder_as_before():
    from islands.core.errors import CodecError

    group, _ = make_group(2)
    xs = {i: torch.full((10,), 3e38) for i in range(2)}
    with pytest.raises(CodecError, match="NaN/Inf"):
        group.all_reduce(xs, codecs={i: Identity() for i in range(2)})


@pytest.mark.parametrize("phase", ["reduce-scatter", "all-gather"])
def test_a_missing_payload_is_refused_naming_the_sender(phase):
    """A worker that sends nothing where its payload is due is named, not a KeyError."""
    from islands.core.errors import PeerRefused

    class Dropping(SimTransport):
        def exchange(self, messages, members, phase, **kw):
            got = super().exchange(messages, members, phase, **kw)
            return {k: m for k, m in got.items() if k != (1, 0) or not phase.endswith(which)}

    which = phase
    transport = Dropping(3, NetworkModel(), VirtualClock(3))
    group = Group(transport, (0, 1, 2))
    with pytest.raises(PeerRefused, match=f"{phase}: no payload from worker 1") as refused:
        group.all_reduce({i: torch.randn(30) for i in range(3)},
                         codecs={i: Identity() for i in range(3)})
    assert refused.value.sender == 1
