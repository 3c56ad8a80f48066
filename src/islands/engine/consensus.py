"""What a run of workers that do not share parameters (gossip) reports in place of one global
state: the average of the members' global parameters (what is evaluated, and what
``final.safetensors`` holds), the consensus distance (the mean Euclidean distance of the
members' global parameters to that average), and the evaluation of a fixed sample of the
workers' own models.

These need every member's parameters in this process: the simulator has them. A real
process holds its own only, so it evaluates its own model and reports no distance; a job's
``final.safetensors`` is the workers' average (``islands.runtime.report``).
"""

from __future__ import annotations

import random

import torch

from islands.algorithms import Algorithm, Worker
from islands.core.seeding import derive_seed

# how many workers' own models an evaluation of a gossip run also evaluates
OWN_SAMPLE = 4


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


def own_sample(seed: int, n_workers: int, members: tuple[int, ...]) -> list[int]:
    """The workers whose own models an evaluation also evaluates: a sample of
    :data:`OWN_SAMPLE` drawn once from the seed, those of them still members (or the first
    member, if none is)."""
    drawn = random.Random(derive_seed(seed, "own-eval")).sample(
        range(n_workers), min(OWN_SAMPLE, n_workers))
    return sorted(w for w in drawn if w in members) or [min(members)]
