"""Blame with evidence: what a member shows the coordinator when it refuses a peer's message,
and how the coordinator checks it before anyone is excluded.

In an open job every header is signed by its sender and names its context (round, attempt,
phase, sender, receiver) and its payload's Merkle roots (:mod:`islands.core.signing`). A
member that refuses a peer's message looks, among what it received in the attempt, for a rule
the sender broke that a third party can check from the sender's own signed words:

* ``weight``: a contribution's header claims another aggregation weight than the one the
  coordinator recorded for that sender at ``ready`` (a forged weight);
* ``finite``: a payload's floating values hold NaN/Inf: the evidence is the 16 KiB leaf that
  holds the first one, with the hashes that lead from it to the signed root;
* ``aggregate``: a verified shard's owner signed an aggregate that its rule does not give for
  the inputs it signed for (``Message.sources``; :mod:`islands.collectives.verify`): the
  evidence is one 16 KiB leaf of the aggregate and the same leaf of every input, each with its
  path to the root the owner signed. The coordinator applies the job's rule to the inputs'
  values in float64 and convicts when the aggregate lies farther from it than float
  rounding can explain (:func:`misaggregated`). Only for a rule whose every coordinate reads
  only its own (:func:`~islands.aggregators.coordinatewise`).

The coordinator (:func:`judge`) checks the signature against the accused's registered key,
the context against the round, the attempt and the two workers, and then the rule itself. A
proven accusation excludes the accused; evidence that does not prove what it claims excludes
the **accuser** (a false accusation). A refusal without such evidence (a payload that does
not decode, a wrong length, an aggregate a verifier cannot show 16 KiB of) is the accuser's
word alone: it is believed when seconded (:func:`seconded`); otherwise accuser and accused
both sit out the retry, and the round commits from the members not in the dispute.
"""

from __future__ import annotations

import base64
import json

import torch

from islands.aggregators import coordinatewise
from islands.codecs.base import PAYLOAD_DTYPES, all_finite
from islands.collectives.butterfly import same_weight
from islands.collectives.verify import Mismatch, recompute
from islands.core import signing
from islands.runtime.auth import MAX_MEMBER_LINE_BYTES
from islands.transports.base import Message
from islands.transports.wire import as_bytes, signed_header

# the most a member's evidence may take on its control line (with room for the rest of it)
MAX_EVIDENCE_BYTES = MAX_MEMBER_LINE_BYTES - (1 << 20)


def gather(kept: dict[tuple[str, int], Message], sender: int, weights: dict[int, float],
           exhibit: object = None, rule=None) -> dict | None:
    """Evidence that ``sender`` broke a checkable rule, from the messages of the attempt
    (``kept``: {(phase, sender): message}) or from what the refusal showed (``exhibit``: a
    verifier's :class:`~islands.collectives.verify.Mismatch`, checked with ``rule``, the
    verifier's own); None where none holds it."""
    if isinstance(exhibit, Mismatch) and exhibit.output.proof is not None:
        try:  # the owner's signed header may hold anything: never let it stop this worker
            proof = _wrong_aggregate(exhibit, rule, weights)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError):
            proof = None
        if proof is not None and len(json.dumps(proof)) <= MAX_EVIDENCE_BYTES:
            return proof
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


def _leaf(t: torch.Tensor, root: str, index: int) -> dict | None:
    """Leaf ``index`` of ``t``'s bytes with its path, as evidence shows it; None when the
    bytes do not hash to ``root`` (not the ones their author signed for)."""
    leaf, path = signing.leaf_proof(as_bytes(t).numpy(), index)
    if not signing.merkle_check(root, index, leaf, path):
        return None
    return {"bytes": base64.b64encode(leaf).decode(), "path": path}


def _shown(root: str, index: int, shown: dict) -> bytes | None:
    """The bytes of a leaf evidence shows (:func:`_leaf`), when they are leaf ``index`` of
    what hashes to ``root``; None otherwise."""
    data = base64.b64decode(shown["bytes"])
    return data if signing.merkle_check(root, index, data, list(shown["path"])) else None


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
        leaf = _leaf(t, roots[i], index)
        return None if leaf is None else {"tensor": i, "leaf": index, **leaf}
    return None


def _wrong_aggregate(seen: Mismatch, rule, weights: dict[int, float]) -> dict | None:
    """The ``aggregate`` evidence of a verifier's mismatch: the first leaf of the owner's
    aggregate where it differs (``seen.leaves``) that :func:`misaggregated` convicts (or the
    first, where the owner signed a weight other than the recorded one), with the same leaf
    of every input. None where it cannot be shown: a rule not coordinate-wise, a payload of
    several tensors, or inputs whose bytes are not the ones the owner signed for (a sender
    that sent the owner and the verifier different bytes, or an owner that signed for other
    inputs: one word against another)."""
    head = json.loads(seen.output.proof["h"])
    src = head.get("in")
    tensors = [seen.output.payload.tensors] + [m.payload.tensors for m in seen.inputs]
    if not coordinatewise(rule) or not isinstance(src, dict) \
            or src.get("m") != list(seen.members) or any(len(t) != 1 for t in tensors):
        return None
    y, *xs = (next(iter(t.values())).reshape(-1) for t in tensors)
    if not y.is_floating_point() or any(x.dtype != y.dtype or x.numel() != y.numel()
                                        for x in xs):
        return None
    w = None if src.get("w") is None else torch.tensor(src["w"], dtype=torch.float64)
    forged = w is not None and any(i in weights and not same_weight(float(v), weights[i])
                                   for i, v in zip(seen.members, w.tolist()))
    per = signing.LEAF_BYTES // y.element_size()
    for k in seen.leaves:
        rows = torch.stack([x[k * per:(k + 1) * per] for x in xs]).cpu()
        if not forged and misaggregated(rule, rows, w, y[k * per:(k + 1) * per].cpu()) is None:
            continue
        shown = [_leaf(t, roots[0], k) for t, roots in zip([y, *xs], [head["mr"], *src["mr"]])]
        if None in shown:
            return None
        return {"rule": "aggregate", **seen.output.proof, "leaf": k, "out": shown[0],
                "rows": shown[1:]}
    return None


def misaggregated(rule, rows: torch.Tensor, weights: torch.Tensor | None,
                  out: torch.Tensor) -> tuple[int, float, float] | None:
    """Whether ``out`` is not ``rule``'s aggregate of ``rows`` (a coordinate-wise rule): the
    rule is applied in float64 and a value of ``out`` is wrong when it lies farther from it
    than float rounding in ``out``'s dtype can explain, ``2 (n + 2) u max_i |x_i|`` per
    coordinate (``u`` the unit roundoff: a sum of ``n`` terms, the weights' and the division's
    rounding, doubled), or is not finite. So any honest order of summation passes, and a lie
    that moves a value by more than a few ulps of the largest input is caught.

    Returns:
        None, or (how many values are wrong, the largest gap, the rounding bound there).
    """
    n = rows.shape[0]
    ref = recompute(rule, rows.to(torch.float64), weights)
    bound = (2 * (n + 2) * torch.finfo(out.dtype).eps / 2) * rows.abs().amax(0).to(torch.float64)
    gap = (out.to(torch.float64) - ref).abs()
    wrong = ~(gap <= bound)  # NaN: wrong
    if not bool(wrong.any()):
        return None
    worst = int(torch.where(wrong, gap.nan_to_num(float("inf")), -1.0).argmax())
    return int(wrong.sum()), float(gap[worst]), float(bound[worst])


def judge(evidence: dict, *, key: str, accused: int, accuser: int, context: str,
          weights: dict[int, float], job_rule=None) -> tuple[bool, str]:
    """Whether ``evidence`` proves that ``accused`` broke its rule in the message it sent
    ``accuser`` in ``context`` (``"round/attempt"``), and why (or why not). ``job_rule``: the
    job's aggregation rule, for ``aggregate`` evidence (None: the job has none that can be
    checked 16 KiB at a time)."""
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
            name, dtype_name, _ = head["t"][i]
            dtype = PAYLOAD_DTYPES[dtype_name]
            leaf = _shown(head["mr"][i], index, evidence)
            if leaf is None:
                return False, "the bytes shown are not in the payload the sender signed"
            if not dtype.is_floating_point or len(leaf) % dtype.itemsize:
                return False, f"tensor {name!r} holds no floating values"
            if all_finite(torch.frombuffer(bytearray(leaf), dtype=dtype)):
                return False, f"the values shown of tensor {name!r} are finite"
            return True, (f"its payload's tensor {name!r} holds NaN/Inf (signed leaf {index} "
                          "shown)")
        if rule == "aggregate":
            return _judge_aggregate(evidence, head, weights, job_rule)
        return False, f"no rule {rule!r} to check"
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        return False, f"malformed evidence ({type(e).__name__}: {e})"


def _judge_aggregate(evidence: dict, head: dict, weights: dict[int, float],
                     rule) -> tuple[bool, str]:
    """``aggregate`` evidence (:func:`_wrong_aggregate`) against the owner's signed header."""
    if rule is None or not coordinatewise(rule):
        return False, "the job's rule cannot be checked 16 KiB at a time"
    src = head.get("in")
    if not isinstance(src, dict):
        return False, "the header shown is not a verified shard's aggregate (no inputs signed)"
    members, signed_w, roots = list(src["m"]), src["w"], list(src["mr"])
    shown = list(evidence["rows"])
    if len(head["t"]) != 1 or len(shown) != len(members) or len(roots) != len(members):
        return False, "the evidence does not show one leaf of each signed input"
    for i, w in zip(members, signed_w or ()):
        if i in weights and not same_weight(w, weights[i]):
            return True, (f"it aggregated worker {i}'s contribution at weight {w:g}, the "
                          f"coordinator recorded {weights[i]:g} (signed header)")
    k = int(evidence["leaf"])
    dtype = PAYLOAD_DTYPES[head["t"][0][1]]
    leaves = []
    for what, root, leaf in [("the aggregate", head["mr"][0], evidence["out"]),
                             *((f"worker {i}'s input", r[0], x)
                               for i, r, x in zip(members, roots, shown))]:
        data = _shown(root, k, leaf)
        if data is None:
            return False, f"the bytes shown of {what} are not the ones the owner signed for"
        leaves.append(data)
    if not dtype.is_floating_point or len({len(d) for d in leaves}) != 1 \
            or len(leaves[0]) % dtype.itemsize:
        return False, "the leaves shown are not floating values of one length"
    out, *xs = (torch.frombuffer(bytearray(d), dtype=dtype) for d in leaves)
    rows = torch.stack(xs)
    if not all_finite(rows):
        return False, "the inputs shown hold NaN/Inf (a verifier refuses those first)"
    w = None if signed_w is None else torch.tensor(signed_w, dtype=torch.float64)
    wrong = misaggregated(rule, rows, w, out)
    if wrong is None:
        return False, (f"leaf {k} of the aggregate shown is what the rule gives for the "
                       "inputs its owner signed for")
    count, gap, bound = wrong
    return True, (f"its signed aggregate is not the rule's for the inputs it signed for: "
                  f"{count} of the {out.numel()} values of leaf {k} are off (largest gap "
                  f"{gap:.3g}, where rounding explains {bound:.3g})")


def seconded(accusers: set[int], accused: int, members: set[int]) -> bool:
    """An accusation without evidence is believed when at least two members and more than
    half of the accused's fellow members in the attempt make it (a lone member's word,
    against a peer's, cannot tell which of them lies)."""
    peers = members - {accused}
    return len(accusers) >= 2 and 2 * len(accusers) > len(peers)
