"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): real image data
that ships inside a package, so it needs no download.

The CSV is read straight from scikit-learn's package data (``sklearn/datasets/data``) without
importing scikit-learn (which pulls in SciPy, ~0.8 s), so a joining worker starts fast; when
the file is not where this expects it, ``sklearn.datasets.load_digits`` is used instead.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from islands.core.errors import DataError


@functools.lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("the digits data ships with scikit-learn: `pip install scikit-learn`")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        raw = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        return raw[:, :-1], raw[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # noqa: PLC0415 - slow import, fallback only

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images ``(N, 1, 8, 8)`` scaled to [0, 1] and labels ``(N,)`` in 0..9."""
    x, y = _arrays()
    return torch.from_numpy(x / 16.0).float().reshape(-1, 1, 8, 8), torch.from_numpy(y)
