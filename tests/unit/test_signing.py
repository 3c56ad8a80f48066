"""Signed headers and evidence: every member's key, Merkle proofs of a payload's pieces, the
receiver's checks, and the coordinator's verdict on an accusation."""

from __future__ import annotations

import base64
import json
import os

import pytest
import torch

from islands.codecs.base import Encoded
from islands.core import signing
from islands.core.errors import PeerRefused
from islands.runtime import evidence
from islands.transports import wire
from islands.transports.base import Message
from tests.unit.test_dist_transport import received

CTX = "3/0/pseudo-gradient/reduce-scatter/2>0"  # round 3, attempt 0, from 2 to 0


@pytest.mark.parametrize("size", [0, 1, 100, signing.LEAF_BYTES, signing.LEAF_BYTES + 1,
                                  5 * signing.LEAF_BYTES + 7, 9 * signing.LEAF_BYTES])
def test_every_leaf_proves_itself_and_nothing_else(size):
    data = os.urandom(size)
    root, n = signing.merkle_root(data), max(1, -(-size // signing.LEAF_BYTES))
    for i in range(n):
        leaf, path = signing.leaf_proof(data, i)
        assert leaf == data[i * signing.LEAF_BYTES:(i + 1) * signing.LEAF_BYTES]
        assert signing.merkle_check(root, i, leaf, path)
        assert not signing.merkle_check(root, i, leaf + b"\x00", path)  # other bytes
        if n > 1:  # the same bytes passed off as another leaf
            assert not signing.merkle_check(root, (i + 1) % n, leaf, path)
            if path[0]:  # a sibling swapped for another hash
                assert not signing.merkle_check(root, i, leaf, ["00" * 32, *path[1:]])


def test_a_signature_holds_for_its_key_and_its_bytes_only():
    a, b = signing.Signer(), signing.Signer()
    sig = a.sign(b"weight 8")
    assert signing.check_signature(a.public, b"weight 8", sig)
    assert not signing.check_signature(b.public, b"weight 8", sig)
    assert not signing.check_signature(a.public, b"weight 9", sig)
    assert not signing.check_signature("zz", b"weight 8", sig)  # not a key at all


def _signed(signer, weight=8.0, values=None, ctx=CTX, claim=True):
    values = torch.arange(10_000, dtype=torch.float32) if values is None else values
    msg = Message(Encoded({"values": values}, numel=values.numel()), 16, weight=weight,
                  claim=claim)
    return received(wire.pack_header(msg, signer, ctx), 1 << 16), values


def _arrived(head, values, key, ctx=CTX) -> Message:
    h = wire.unpack_header(head, 2, key, ctx)
    return wire.message(h, {"values": values.clone()})


def test_a_signed_header_is_read_only_with_its_senders_key_and_context():
    me, other = signing.Signer(), signing.Signer()
    head, values = _signed(me, weight=8.0)
    msg = _arrived(head, values, me.public)
    assert msg.weight == 8.0 and msg.claim and json.loads(msg.proof["h"])["ctx"] == CTX
    with pytest.raises(PeerRefused, match="not its registered key"):
        wire.unpack_header(head, 2, other.public, CTX)  # another member speaking for 2
    with pytest.raises(PeerRefused, match="replayed or misdirected"):
        wire.unpack_header(head, 2, me.public, "4/0/pseudo-gradient/reduce-scatter/2>0")
    unsigned = received(wire.pack_header(Message(Encoded({"values": values}, numel=10_000),
                                                 16)), 1 << 16)
    with pytest.raises(PeerRefused, match="not signed"):
        wire.unpack_header(unsigned, 2, me.public, CTX)
    tampered = bytearray(head.numpy().tobytes())
    at = tampered.index(b'\\"w\\":8.0')  # the weight inside the signed JSON
    tampered[at + 6:at + 9] = b"9.0"
    with pytest.raises(PeerRefused, match="not its registered key"):
        wire.unpack_header(torch.frombuffer(tampered, dtype=torch.uint8), 2, me.public, CTX)


def _judge(proof, key, weights, context="3/0", accused=2, accuser=0):
    return evidence.judge(proof, key=key, accused=accused, accuser=accuser, context=context,
                          weights=weights)


def test_a_forged_weight_is_proven_by_its_senders_own_signed_header():
    liar = signing.Signer()
    head, values = _signed(liar, weight=1e9)
    kept = {("pseudo-gradient/reduce-scatter", 2): _arrived(head, values, liar.public)}
    proof = evidence.gather(kept, 2, {2: 8.0})
    assert proof["rule"] == "weight"
    proven, why = _judge(proof, liar.public, {2: 8.0})
    assert proven and "recorded 8" in why
    # the same header where the round recorded 1e9, or shown against another round, another
    # pair of workers or under another key, proves nothing: the accuser is the one at fault
    assert not _judge(proof, liar.public, {2: 1e9})[0]
    assert not _judge(proof, liar.public, {2: 8.0}, context="4/0")[0]
    assert not _judge(proof, liar.public, {2: 8.0}, accuser=1)[0]
    assert not _judge(proof, signing.Signer().public, {2: 8.0})[0]
    aggregate = _arrived(*_signed(liar, weight=1.0, claim=False), liar.public)
    assert evidence.gather({("x/all-gather", 2): aggregate}, 2, {2: 8.0}) is None


def test_a_nan_payload_is_proven_by_one_signed_leaf_and_a_finite_one_is_not():
    sender = signing.Signer()
    values = torch.randn(20_000)
    values[13_000] = float("nan")  # in leaf 13000 * 4 // 16384 = 3
    head, _ = _signed(sender, values=values)
    kept = {("g/reduce-scatter", 2): _arrived(head, values, sender.public)}
    proof = evidence.gather(kept, 2, {})
    assert (proof["rule"], proof["leaf"]) == ("finite", 3)
    assert len(json.dumps(proof)) < 30_000  # a control-channel line, not the payload
    assert _judge(proof, sender.public, {})[0]
    leaf, path = signing.leaf_proof(values.numpy().tobytes(), 0)  # a finite leaf, signed
    proven, why = _judge(dict(proof, leaf=0, bytes=base64.b64encode(leaf).decode(), path=path),
                         sender.public, {})
    assert not proven and "finite" in why
    bogus = dict(proof, bytes=proof["bytes"][:-8] + "AAAAAAA=")
    assert not _judge(bogus, sender.public, {})[0]


def test_bytes_that_are_not_the_ones_signed_give_no_evidence():
    """A sender that signs the root of finite values and sends NaN cannot be proven to have
    sent them (the receiver's leaf does not lead to the signed root): no evidence, so an
    honest receiver never shows a proof the coordinator would reject."""
    sender = signing.Signer()
    head, values = _signed(sender)
    sent = values.clone()
    sent[5] = float("nan")
    kept = {("g/reduce-scatter", 2): _arrived(head, sent, sender.public)}
    assert evidence.gather(kept, 2, {}) is None


def test_an_accusation_stands_on_evidence_or_on_a_majority():
    assert evidence.seconded({0, 1}, 2, {0, 1, 2})
    assert not evidence.seconded({0}, 2, {0, 1, 2})
    assert not evidence.seconded({0}, 1, {0, 1})  # two members: one word against another
    assert not evidence.seconded({0, 1}, 4, {0, 1, 2, 3, 4})
    assert evidence.seconded({0, 1, 3}, 4, {0, 1, 2, 3, 4})
