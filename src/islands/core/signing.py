"""Who said what: every member's own Ed25519 key, and Merkle roots that bind a payload's bytes
to the header its sender signed.

In an open job (``runtime.trust = "open"``) each worker process makes a key pair when it
starts and registers the public half with the coordinator when it joins (over the
token-authenticated control channel). Every message header it sends carries the round's
context, the payload's Merkle roots and a signature over all of it (:mod:`islands.transports.
wire`), so no member can speak for another, and a piece of a payload that breaks a rule can
be shown to a third party with the sender's signature on it: one leaf of
:data:`LEAF_BYTES` and ``log2(leaves)`` sibling hashes, not the whole payload
(:func:`leaf_proof`, :func:`merkle_check`). Keys come from ``cryptography`` (Ed25519:
32-byte public keys, 64-byte signatures).

The tree: a leaf's hash is ``sha256(0x00 | leaf)``, an inner node's ``sha256(0x01 | left |
right)``, a level of odd length carries its last node up unchanged; the root of no bytes is
``sha256(0x00)``. The prefixes keep a leaf from passing for an inner node.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

LEAF_BYTES = 16 << 10  # a proof shows 16 KiB of a payload (22 KB of base64 on the wire)


class Signer:
    """This process's key pair (made fresh: a restarted worker registers a new one)."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes(Encoding.Raw,
                                                          PublicFormat.Raw).hex()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def check_signature(public_hex: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the holder of ``public_hex``'s over ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _leaf(block) -> bytes:
    h = hashlib.sha256(b"\x00")
    h.update(block)  # a memoryview: hashed where it lies, not copied
    return h.digest()


def _up(level: list[bytes]) -> list[bytes]:
    nxt = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
           for i in range(0, len(level) - 1, 2)]
    return nxt + [level[-1]] if len(level) % 2 else nxt


def _levels(data: memoryview) -> list[list[bytes]]:
    level = [_leaf(data[i:i + LEAF_BYTES]) for i in range(0, len(data), LEAF_BYTES)]
    levels = [level or [_leaf(b"")]]
    while len(levels[-1]) > 1:
        levels.append(_up(levels[-1]))
    return levels


def merkle_root(data: memoryview | bytes) -> str:
    """The root (hex) of ``data``'s tree of :data:`LEAF_BYTES` leaves."""
    return _levels(memoryview(data))[-1][0].hex()


def leaf_proof(data: memoryview | bytes, index: int) -> tuple[bytes, list[str]]:
    """Leaf ``index`` of ``data`` (its bytes) and the sibling hashes (hex, leaf level first)
    that lead from it to the root (``""`` where a level carries it up without a sibling)."""
    data = memoryview(data)
    leaf = bytes(data[index * LEAF_BYTES:(index + 1) * LEAF_BYTES])
    siblings = []
    for level in _levels(data)[:-1]:
        j = index ^ 1
        siblings.append(level[j].hex() if j < len(level) else "")
        index //= 2
    return leaf, siblings


def merkle_check(root_hex: str, index: int, leaf: bytes, siblings: list[str]) -> bool:
    """Whether ``leaf`` is leaf ``index`` of the bytes whose root is ``root_hex``."""
    try:
        node = _leaf(leaf)
        for s in siblings:
            if s:
                sib = bytes.fromhex(s)
                node = hashlib.sha256(b"\x01" + (sib + node if index % 2 else node + sib)
                                      ).digest()
            elif index % 2:  # a carried node is always the last, so the left of nothing
                return False
            index //= 2
        return index == 0 and node.hex() == root_hex
    except (ValueError, TypeError):
        return False
