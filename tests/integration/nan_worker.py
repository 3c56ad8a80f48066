"""An ``islands run`` worker whose pseudo-gradient turns NaN from round 2 on (its inner state
gone bad): it must say so to its peers at once, not leave them waiting for bytes that will not
come.

    python tests/integration/nan_worker.py [islands run arguments]
"""

from __future__ import annotations

import sys

import torch

from islands.algorithms import DiLoCo
from islands.cli.runtime_cmd import main

_contribute = DiLoCo.contribute


def poisoned(self, worker, observers=()):
    out = _contribute(self, worker, observers)
    if worker.steps > 2 * 5:  # rounds of 5 inner steps: from the end of round 2 on
        out[0].tensor[0] = torch.nan
    return out


DiLoCo.contribute = poisoned
sys.exit(main(["run", *sys.argv[1:]]))
