"""The codecs the codec tests run through: one factory per configuration (a fresh instance per
call, as every worker owns its own), shared by the property tests and the butterfly tests."""

from __future__ import annotations

import torch

from islands.codecs import (
    FP4,
    Cast,
    Chain,
    ChunkTopK,
    DCTTopK,
    Entropy,
    ErrorFeedback,
    Identity,
    Int4,
    Int8,
    PowerSGD,
    Quant,
    RandomK,
    Sign,
    TopK,
)

# name -> a fresh codec. Names carry meaning for the tests: "ef-" and "entropy-ef" mark
# stateful codecs; block sizes and fractions are the ones the error bounds are checked with.
FACTORIES = {
    "identity": Identity,
    "fp16": lambda: Cast(torch.float16),
    "bf16": lambda: Cast(torch.bfloat16),
    "int8": lambda: Int8(block=32),
    "int8-stochastic": lambda: Int8(block=32, stochastic=True),
    "int4": lambda: Int4(block=16),
    "int4-stochastic": lambda: Int4(block=16, stochastic=True),
    "fp4": lambda: FP4(block=16),
    "topk": lambda: TopK(0.1),
    "topk-count": lambda: TopK(count=5),
    "randomk": lambda: RandomK(0.25),
    "sign": Sign,
    "sign-block": lambda: Sign(block=8),
    "powersgd": lambda: PowerSGD(2),
    "ef-topk": lambda: ErrorFeedback(TopK(0.1)),
    "ef-sign": lambda: ErrorFeedback(Sign()),
    "entropy-int8": lambda: Entropy(Int8(block=32)),
    "entropy-ef-powersgd": lambda: Entropy(ErrorFeedback(PowerSGD(2))),
    "chunk_topk": lambda: ChunkTopK(0.2, chunk=16),
    "chunk_topk-rice": lambda: ChunkTopK(0.2, chunk=16, index="rice"),
    "dct_topk": lambda: DCTTopK(count=3, chunk=8),
    "quant": lambda: Quant(2, block=8),
    "quant-1bit": lambda: Quant(1, block=None),
    "chain-chunk_topk-quant": lambda: Chain(ChunkTopK(count=3, chunk=16), Quant(2, block=4)),
    "chain-dct-sign": lambda: Chain(DCTTopK(count=2, chunk=8), Sign()),
    "ef-sparseloco": lambda: ErrorFeedback(Chain(ChunkTopK(count=3, chunk=16), Quant(2)),
                                           beta=0.9),
    "entropy-chain": lambda: Entropy(Chain(ChunkTopK(count=3, chunk=16), Quant(3, block=4))),
}


def make(name: str, layout: list[torch.Size]):
    """A fresh codec ``name`` bound to the parameter ``layout``."""
    codec = FACTORIES[name]()
    codec.bind_layout(layout)
    return codec
