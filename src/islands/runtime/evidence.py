"""Blame with evidence: what a member shows the coordinator when it refuses a peer's message,
and how the coordinator checks it before anyone is excluded.

In an open job every header is signed by its sender and names its context (round, attempt,
phase, sender, receiver) and its payload's Merkle roots (:mod:`islands.core.signing`). A
member that refuses a peer's message looks, among what it received in the attempt, for a rule
the sender broke that a third party can check from the sender's own signed words:

* ``weight``: a contribution's header claims another aggregation weight than the one the
  coordinator recorded for that sender at ``ready`` (a forged weight);
* ``finite``: a payload's floating values hold NaN/Inf: the evidence is the 16 KiB leaf that
  holds the first one, with the hashes that lead from it to the signed root.

The coordinator (:func:`judge`) checks the signature against the accused's registered key,
the context against the round, the attempt and the two workers, and then the rule itself. A
proven accusation excludes the accused; evidence that does not prove what it claims excludes
the **accuser** (a false accusation). A refusal without such evidence (a payload that does
not decode, a wrong length, an aggregate a verifier recomputed differently) is the accuser's
word alone: it is believed when seconded (:func:`seconded`); otherwise accuser and accused
both sit out the retry, and the round commits from the members not in the dispute.
"""

from __future__ import annotations

import base64
import json

import torch

from islands.codecs.base import PAYLOAD_DTYPES, all_finite
from islands.collectives.butterfly import same_weight
from islands.core import signing
from islands.transports.base import Message
from islands.transports.wire import as_bytes, signed_header


def gather(kept: dict[tuple[str, int], Message], sender: int,
           weights: dict[int, float]) -> dict | None:
    """Evidence that ``sender`` broke a checkable rule, from the messages of the attempt
    (``kept``: {(phase, sender): message}); None where none holds it."""
    for msg in signed_by(kept, sender):
        if msg.claim and sender in weights and not same_weight(msg.weight, weights[sender]):
            return {"rule": "weight", **msg.proof}
        leaf = _non_finite_leaf(msg)
        if leaf is not None:
            return {"rule": "finite", **msg.proof, **leaf}
    return None


def signed_by(kept: dict[tuple[str, int], Message], sender: int) -> list[Message]:
    """``sender``'s signed messages among ``kept``, in phase order."""
    return [m for (_, src), m in sorted(kept.items(), key=lambda kv: kv[0])
            if src == sender and m.proof is not None]


def _non_finite_leaf(msg: Message) -> dict | None:
    """The leaf holding a payload's first NaN/Inf, with its path to the signed root; None
    when the values are finite or the bytes are not the ones the sender signed (no proof)."""
    roots = json.loads(msg.proof["h"])["mr"]
    for i, name in enumerate(sorted(msg.payload.tensors)):
        t = msg.payload.tensors[name]
        if not t.is_floating_point() or all_finite(t):
            continue
        first = int((~torch.isfinite(t.reshape(-1))).nonzero()[0])
        index = first * t.element_size() // signing.LEAF_BYTES
        leaf, path = signing.leaf_proof(as_bytes(t).numpy(), index)
        if not signing.merkle_check(roots[i], index, leaf, path):
            return None
        return {"tensor": i, "leaf": index, "bytes": base64.b64encode(leaf).decode(),
                "path": path}
    return None


def judge(evidence: dict, *, key: str, accused: int, accuser: int, context: str,
          weights: dict[int, float]) -> tuple[bool, str]:
    """Whether ``evidence`` proves that ``accused`` broke its rule in the message it sent
    ``accuser`` in ``context`` (``"round/attempt"``), and why (or why not)."""
    try:
        head = signed_header(evidence, key)
        if head is None:
            return False, f"the header shown is not signed with worker {accused}'s key"
        ctx = str(head.get("ctx", ""))
        if not ctx.startswith(f"{context}/") or not ctx.endswith(f"/{accused}>{accuser}"):
            return False, (f"the header shown was signed for {ctx[:80]!r}, not a message "
                           f"from worker {accused} to worker {accuser} in {context}")
        rule = evidence.get("rule")
        if rule == "weight":
            if head.get("c") != 1 or accused not in weights:
                return False, "the header shown carries no weight the round recorded"
            if same_weight(head["w"], weights[accused]):
                return False, (f"the header's weight {head['w']:g} is the one recorded for "
                               f"worker {accused}")
            return True, (f"it claimed aggregation weight {head['w']:g}, the coordinator "
                          f"recorded {weights[accused]:g} (signed header)")
        if rule == "finite":
            i, index = int(evidence["tensor"]), int(evidence["leaf"])
            leaf, path = base64.b64decode(evidence["bytes"]), list(evidence["path"])
            name, dtype_name, _ = head["t"][i]
            dtype = PAYLOAD_DTYPES[dtype_name]
            if not signing.merkle_check(head["mr"][i], index, leaf, path):
                return False, "the bytes shown are not in the payload the sender signed"
            if not dtype.is_floating_point or len(leaf) % dtype.itemsize:
                return False, f"tensor {name!r} holds no floating values"
            if all_finite(torch.frombuffer(bytearray(leaf), dtype=dtype)):
                return False, f"the values shown of tensor {name!r} are finite"
            return True, (f"its payload's tensor {name!r} holds NaN/Inf (signed leaf {index} "
                          "shown)")
        return False, f"no rule {rule!r} to check"
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        return False, f"malformed evidence ({type(e).__name__}: {e})"


def seconded(accusers: set[int], accused: int, members: set[int]) -> bool:
    """An accusation without evidence is believed when at least two members and more than
    half of the accused's fellow members in the attempt make it (a lone member's word,
    against a peer's, cannot tell which of them lies)."""
    peers = members - {accused}
    return len(accusers) >= 2 and 2 * len(accusers) > len(peers)
