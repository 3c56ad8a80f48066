"""Encode+decode throughput of every codec on one large flat tensor, beside a copy of the same
tensor (the ceiling: a codec reads its input and writes an output, as a copy does).

Throughput is float32 bytes in (``4 · numel``) over the encode plus decode time, the best of
``--repeats`` runs after a warm-up, measured two ways (and ``x copy``: encode plus decode into
a buffer, as a multiple of the ``copy_`` into one; 1.0 would be as fast as the copy):

* ``GB/s into``: decoding into a buffer that already exists (``Codec.decode_into``), as the
  butterfly all-reduce does (the rows it aggregates, the result it returns); the ceiling is a
  ``copy_`` into a preallocated tensor.
* ``GB/s new``: decoding into a freshly allocated tensor (``Codec.decode``); the ceiling is a
  ``clone``. On CPU the first touch of fresh pages can cost more than the arithmetic.

The encoder always allocates its wire buffers fresh. The codecs are the ones ``[codec]``
builds; PowerSGD sees the tensor as one square-ish matrix.

Run it:

    python benchmarks/codecs_throughput.py                       # 64M elements, every codec
    python benchmarks/codecs_throughput.py --numel 16000000 --codecs int8,int4,fp4
    python benchmarks/codecs_throughput.py --device cuda         # on a GPU
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/codecs_throughput.py  # PyTorch's huge-page allocator

``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch's CPU allocator) makes page faults cheaper for
everyone alike. Writes ``bench-results/codecs_throughput.json`` (``--json`` to move it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from islands.codecs import build_codec, codec_config

# label -> CodecConfig fields
CODECS: dict[str, dict] = {
    "identity": {"name": "identity"},
    "fp16": {"name": "fp16"},
    "bf16": {"name": "bf16"},
    "int8": {"name": "int8"},
    "int8-stochastic": {"name": "int8", "stochastic": True},
    "int4": {"name": "int4"},
    "fp4": {"name": "fp4"},
    "topk1%": {"name": "topk", "fraction": 0.01},
    "randomk1%": {"name": "randomk", "fraction": 0.01},
    "sign": {"name": "sign", "block": 256},
    "powersgd4": {"name": "powersgd", "rank": 4},
    "int8+zstd": {"name": "int8", "entropy": True},
    "ef(int8)": {"name": "int8", "error_feedback": True},
    "quant2": {"name": "quant", "bits": 2},
    "chunk_topk1.6%": {"name": "chunk_topk"},
    # SparseLoCo's compressor: chunked top-k 64 of 4096, then 2-bit values; with its decaying
    # accumulator (what a worker runs per round)
    "sparseloco": {"name": "chain"},
    "sparseloco+ef": {"name": "chain", "error_feedback": True, "error_feedback_beta": 0.95},
    "dct4/64+sign": {"name": "chain", "stages": [{"name": "dct_topk", "count": 4, "chunk": 64},
                                                 {"name": "sign"}]},
}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU runs asynchronously: time what it did, not the launch


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``fn`` over ``repeats`` runs after one warm-up, and its last result."""
    out = fn()
    best = math.inf
    for _ in range(repeats):
        del out
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(label: str, x: torch.Tensor, repeats: int) -> dict:
    codec = build_codec(codec_config(**CODECS[label]))
    side = math.isqrt(x.numel())
    while x.numel() % side:
        side -= 1
    codec.bind_layout([torch.Size([side, x.numel() // side])])
    enc_s, e = best_time(lambda: codec.encode(x, key="w0/bench/scatter"), repeats)
    dec_s, d = best_time(lambda: codec.decode(e), repeats)
    out = torch.empty_like(x)
    into_s, _ = best_time(lambda: codec.decode_into(e, out), repeats)
    gbps = 4 * x.numel() / (enc_s + dec_s) / 1e9
    rel_err = float((d - x).norm() / x.norm())
    return {"codec": label, "encode_s": enc_s, "decode_s": dec_s, "gb_per_s": gbps,
            "decode_into_s": into_s, "gb_per_s_into": 4 * x.numel() / (enc_s + into_s) / 1e9,
            "wire_bytes": e.nbytes, "ratio": 4 * x.numel() / e.nbytes, "rel_l2_error": rel_err}


def copies(x: torch.Tensor, repeats: int) -> list[dict]:
    out = torch.empty_like(x)
    fresh, _ = best_time(x.clone, repeats)
    into, _ = best_time(lambda: out.copy_(x), repeats)
    return [{"codec": "copy", "encode_s": 0.0, "decode_s": fresh, "decode_into_s": into,
             "gb_per_s": 4 * x.numel() / fresh / 1e9, "gb_per_s_into": 4 * x.numel() / into / 1e9,
             "wire_bytes": 4 * x.numel(), "ratio": 1.0, "rel_l2_error": 0.0}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=64 * 2**20)
    p.add_argument("--codecs", default=",".join(CODECS), help="comma-separated labels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the codecs follow the tensor)")
    p.add_argument("--json", default="bench-results/codecs_throughput.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0)).to(args.device)

    rows = copies(x, args.repeats)
    print(f"{'codec':16} {'GB/s into':>9} {'GB/s new':>8} {'encode s':>9} {'dec into s':>10} "
          f"{'dec new s':>9} {'ratio':>7} {'rel err':>9} {'x copy':>7}")
    for label in args.codecs.split(","):
        rows.append(measure(label, x, args.repeats))
    copy_s = rows[0]["decode_into_s"]
    for r in rows:
        r["x_copy"] = (r["encode_s"] + r["decode_into_s"]) / copy_s
        print(f"{r['codec']:16} {r['gb_per_s_into']:9.2f} {r['gb_per_s']:8.2f} "
              f"{r['encode_s']:9.4f} {r['decode_into_s']:10.4f} {r['decode_s']:9.4f} "
              f"{r['ratio']:6.2f}x {r['rel_l2_error']:9.2e} {r['x_copy']:7.1f}", flush=True)
    env = {"numel": args.numel, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if x.is_cuda else "cpu",
           "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
           "load_average": os.getloadavg()}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"env: {env}\nwrote {out}")


if __name__ == "__main__":
    main()
