"""Row clipping: each contribution scaled down to an L2 norm of at most ``clip_norm``.

Clipping before aggregating bounds how far any one worker can move the result, whatever the
rule (the clipped mean of Karimireddy et al. 2021, "Learning from History for Byzantine Robust
Optimization"); every rule's ``clip_norm`` applies it first. The squared norms here, in
float64 over column blocks, are also what the other rules measure distances with.
"""

from __future__ import annotations

import torch

# Columns per block: a block of 8 rows stays in a core's L2 cache while it is reduced, and a
# float64 copy of one block costs 8 · BLOCK · 8 bytes, not a float64 copy of every row.
BLOCK = 1 << 15


def row_sq_norms(stacked: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 norm of each row (of each row minus ``center``: the difference rounded to
    the rows' dtype), accumulated in float64.

    Args:
        stacked: (n, numel) rows.
        center: (numel,) subtracted from every row first, or None.

    Returns:
        (n,) float64.
    """
    n, numel = stacked.shape
    out = torch.zeros(n, dtype=torch.float64, device=stacked.device)
    for a in range(0, numel, BLOCK):
        block = stacked[:, a:a + BLOCK]
        if center is not None:
            block = block - center[a:a + BLOCK]
        out += torch.linalg.vector_norm(block, dim=1, dtype=torch.float64).square()
    return out


def clip_rows(stacked: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """A copy of ``stacked`` with every row's L2 norm at most ``clip_norm``.

    A longer row is scaled by ``clip_norm / norm``, shrunk by two units in the last place of
    the dtype so that rounding the product cannot leave it over ``clip_norm``; a row within
    the bound is copied bit for bit.

    Args:
        stacked: (n, numel) rows; read only.
        clip_norm: the largest L2 norm a row keeps, > 0.

    Returns:
        (n, numel) a new tensor.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm ({clip_norm!r}) must be > 0 (None turns clipping off)")
    norms = row_sq_norms(stacked).sqrt().tolist()
    out = stacked.clone()
    shrink = 1.0 - 2.0 * torch.finfo(stacked.dtype).eps
    for i, norm in enumerate(norms):
        if norm > clip_norm:
            out[i].mul_(clip_norm / norm * shrink)
    return out


def gram(stacked: torch.Tensor) -> torch.Tensor:
    """The rows' inner products ``X Xᵀ``, (n, n) float64, block by block (float32 products
    are exact in float64: see :mod:`islands.aggregators.krum`)."""
    n, numel = stacked.shape
    g = torch.zeros(n, n, dtype=torch.float64, device=stacked.device)
    for a in range(0, numel, BLOCK):
        block = stacked[:, a:a + BLOCK].to(torch.float64)
        g.addmm_(block, block.T)
    # BLAS may round g[i, j] and g[j, i] differently; a mutual nearest pair must tie exactly
    return (g + g.T) / 2


def cosine_similarities(stacked: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 cosine similarities of the rows (0 with a zero row), from
    :func:`gram`."""
    g = gram(stacked)
    norms = g.diagonal().sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, g / denom.clamp_min(1e-300), 0.0).clamp_(-1.0, 1.0)


def first_of_clones(stacked: torch.Tensor, cosine: float) -> torch.Tensor:
    """(n,) bool: the rows to keep when rows whose cosine similarity to a kept earlier row
    exceeds ``cosine`` count as its clones (a Sybil's identities sending one update; after
    SybilWall's similarity test): the first of each group is kept."""
    cs = cosine_similarities(stacked).cpu()
    keep = torch.ones(stacked.shape[0], dtype=torch.bool)
    for i in range(1, stacked.shape[0]):
        keep[i] = not bool((cs[i, :i][keep[:i]] > cosine).any())
    return keep
