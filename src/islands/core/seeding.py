"""Seeds derived from names: every random choice in islands (data order, batches, drawn
participants, random-k indices, stochastic rounding) comes from ``derive_seed(run seed, what,
...)``, so it is reproducible on any machine and independent of call order.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from ``parts`` (blake2b of ``"/".join(parts)``; not Python's
    salted ``hash``). Fits ``torch.Generator.manual_seed`` and ``numpy.random.default_rng``."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
