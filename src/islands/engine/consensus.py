"""What a run of workers that do not share parameters (gossip) reports in place of one global
state: the average of the members' global parameters (what is evaluated, and what
``final.safetensors`` holds), the consensus distance (the mean Euclidean distance of the
members' global parameters to that average), and the evaluation of a fixed sample of the
workers' own models.

These need every member's parameters in this process: the simulator has them. A real
process holds its own only, so it evaluates its own model and keeps a :func:`sketch` of its
parameters at each evaluation: a job's summary estimates the distance of every evaluated
round from its workers' sketches, and its ``final.safetensors`` is the workers' average
(``islands.runtime.report``).
"""

from __future__ import annotations

import random

import torch

from islands.algorithms import Algorithm, Worker
from islands.core.seeding import derive_seed

# how many workers' own models an evaluation of a gossip run also evaluates
OWN_SAMPLE = 4
# a sketch's length: 16 KB per worker and evaluation; a distance from sketches is off by
# about 1 / sqrt(2 · SKETCH_BUCKETS), 1.1% (less once averaged over the workers)
SKETCH_BUCKETS = 4096
_SKETCH_CHUNK = 1 << 22  # entries hashed at once (bounded memory for any model size)


def mean_of(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The mean of flat vectors (fp32, summed in the given order)."""
    total = torch.zeros_like(vectors[0], dtype=torch.float32)
    for v in vectors:
        total.add_(v.float())
    return total.div_(len(vectors))


def distance_of(vectors: list[torch.Tensor], mean: torch.Tensor) -> float:
    """``mean_i ||v_i − mean||₂`` (0 when all agree)."""
    return sum(float((v.float() - mean).norm()) for v in vectors) / len(vectors)


def average(algorithm: Algorithm, workers: list[Worker]) -> torch.Tensor:
    """The mean of the workers' global parameters (fp32, summed in id order)."""
    return mean_of([algorithm.global_state(w) for w in sorted(workers, key=lambda w: w.id)])


def distance(algorithm: Algorithm, workers: list[Worker],
             mean: torch.Tensor | None = None) -> float:
    """The consensus distance: ``mean_i ||θ_i − θ̄||₂`` (0 when all agree); ``mean``: their
    :func:`average`, when the caller has it."""
    mean = average(algorithm, workers) if mean is None else mean
    return distance_of([algorithm.global_state(w) for w in workers], mean)


def sketch(vector: torch.Tensor, seed: int) -> torch.Tensor:
    """A count sketch of a flat vector: each entry, times a random sign, added into one of
    :data:`SKETCH_BUCKETS` random buckets (signs and buckets drawn from ``seed``, the same in
    every process). It is linear, and ``||sketch(a) − sketch(b)||²`` estimates
    ``||a − b||²`` without bias (relative spread about ``sqrt(2 / SKETCH_BUCKETS)``), so
    :func:`distance_of` the workers' sketches estimates their consensus distance from 16 KB
    each instead of their parameters."""
    out = torch.zeros(SKETCH_BUCKETS, dtype=torch.float64)
    for i, start in enumerate(range(0, vector.numel(), _SKETCH_CHUNK)):
        part = vector[start:start + _SKETCH_CHUNK].detach().to("cpu", torch.float64)
        g = torch.Generator().manual_seed(derive_seed(seed, "consensus-sketch", i))
        buckets = torch.randint(SKETCH_BUCKETS, part.shape, generator=g)
        signs = torch.randint(2, part.shape, generator=g).mul_(2).sub_(1)
        out.index_add_(0, buckets, part.mul_(signs))
    return out.float()


def own_sample(seed: int, n_workers: int, members: tuple[int, ...]) -> list[int]:
    """The workers whose own models an evaluation also evaluates: a sample of
    :data:`OWN_SAMPLE` drawn once from the seed, those of them still members (or the first
    member, if none is)."""
    drawn = random.Random(derive_seed(seed, "own-eval")).sample(
        range(n_workers), min(OWN_SAMPLE, n_workers))
    return sorted(w for w in drawn if w in members) or [min(members)]
