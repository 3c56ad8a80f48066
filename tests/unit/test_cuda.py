"""The CUDA path (runs where a GPU is; there is none on the CPU-only CI machine): every codec
on a GPU tensor decodes to what it decodes to on the CPU, the butterfly over GPU tensors
equals the CPU's, and simulations of every algorithm (the GPT, and the digits CNN with
BatchNorm) train on the GPU with identical shared state on every worker."""

from __future__ import annotations

import math

import pytest
import torch

import islands
from islands.codecs import build_codec, codec_config, codec_names
from islands.collectives.butterfly import Group
from islands.sim.runner import Simulation
from islands.transports.sim import NetworkModel, SimTransport, VirtualClock
from tests.conftest import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", codec_names())
def test_every_codec_on_a_gpu_tensor_matches_the_cpu(name):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    layout = [torch.Size([100, 100])]
    cpu, gpu = build_codec(codec_config(name=name)), build_codec(codec_config(name=name))
    cpu.bind_layout(layout)
    gpu.bind_layout(layout)
    e_cpu, e_gpu = cpu.encode(x, key="w0/t"), gpu.encode(x.cuda(), key="w0/t")
    d_cpu, d_gpu = cpu.decode(e_cpu), gpu.decode(e_gpu)
    assert d_gpu.is_cuda and d_gpu.shape == x.shape and e_gpu.nbytes == e_cpu.nbytes
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-5, atol=1e-5)


def test_the_butterfly_over_gpu_tensors_equals_the_cpu():
    n = 3
    xs = {i: torch.randn(1001, generator=torch.Generator().manual_seed(i)) for i in range(n)}
    out = {}
    for device in ("cpu", "cuda"):
        group = Group(SimTransport(n, NetworkModel(), VirtualClock(n)), tuple(range(n)))
        out[device] = group.all_reduce({i: x.to(device) for i, x in xs.items()},
                                       codecs={i: build_codec(codec_config(name="int8"))
                                               for i in range(n)})
    for i in range(n):
        assert out["cuda"][i].is_cuda
        torch.testing.assert_close(out["cuda"][i].cpu(), out["cpu"][i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("algo", ["ddp", "local_sgd", "diloco"])
@pytest.mark.parametrize("task", ["byte_gpt", "digits_cnn"])
def test_every_algorithm_trains_on_the_gpu(algo, task):
    sets = ([*TINY] if task == "byte_gpt" else ["task.name=digits_cnn", "data.batch_size=32"])
    sets = [s for s in sets if not s.startswith("device")]
    sim = Simulation(islands.load_config(None, [*sets, "device=cuda", "workers=3", "steps=12",
                                                "algorithm.sync_every=4", "eval_every=12",
                                                f"algorithm.name={algo}"]))
    s = sim.run()
    assert math.isfinite(s["final_eval_loss"])
    assert s["eval_curve"][-1]["eval_loss"] < s["eval_curve"][0]["eval_loss"]
    first = sim.shared_states[0]
    assert all(v.is_cuda for v in first.values())
    for other in sim.shared_states[1:]:
        assert all(torch.equal(first[k], other[k]) for k in first)
