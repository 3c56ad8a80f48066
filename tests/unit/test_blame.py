"""The coordinator's verdict on an aborted attempt's accusations: evidence first (proven: the
accused goes; disproven: the accuser goes), then a majority, then a dispute both sides sit
out. Each against a real coordinator over its control channel."""

from __future__ import annotations

import pytest
import torch

from islands.aggregators import Median, mean
from islands.codecs.base import Encoded
from islands.collectives.verify import Mismatch
from islands.core import signing
from islands.runtime import evidence
from islands.runtime.auth import client_connect
from islands.transports import wire
from islands.transports.base import Message, Sources
from tests.unit.test_dist_coordinator import _ask
from tests.unit.test_dist_transport import received

KEYS = {w: signing.Signer() for w in range(3)}


def _worker(c, wid: int):
    return client_connect(f"127.0.0.1:{c.port}", b"tok",
                          {"role": "worker", "id": wid, "channel": "control",
                           "incarnation": f"i{wid}", "store": ["127.0.0.1", 1000 + wid],
                           "fingerprint": {}, "key": KEYS[wid].public})


def _round(c, weights=(8.0, 8.0, 8.0)):
    """Three workers at round 0's ready, each with its weight; the ready's result."""
    chs = {w: _worker(c, w) for w in range(3)}
    _ask(chs, {w: {"op": "start", "round": 0, "hash": "h", "wait_for": 3} for w in chs})
    ready = _ask(chs, {w: {"op": "ready", "round": 0, "attempt": 0, "members": [0, 1, 2],
                           "weight": weights[w]} for w in chs})
    return chs, ready


def _commit(chs, blames: dict) -> dict:
    return _ask(chs, {w: {"op": "commit", "round": 0, "attempt": 0, "ok": w not in blames,
                          "hash": None if w in blames else "x", "members": [0, 1, 2],
                          **({"blame": blames[w]} if w in blames else {})} for w in chs})


def _header(sender: int, receiver: int, weight: float) -> dict:
    """What ``receiver`` kept of ``sender``'s signed contribution in round 0, attempt 0."""
    values = torch.ones(100)
    ctx = f"0/0/pseudo-gradient/reduce-scatter/{sender}>{receiver}"
    head = wire.pack_header(Message(Encoded({"values": values}, numel=100), 16, weight=weight,
                                    claim=True), KEYS[sender], ctx)
    h = wire.unpack_header(received(head), sender, KEYS[sender].public, ctx)
    return wire.message(h, {"values": values})


def test_the_ready_names_every_members_key_and_recorded_weight(coord):
    _, ready = _round(coord, weights=(8.0, 4.0, 2.0))
    assert ready[0]["keys"] == {str(w): KEYS[w].public for w in range(3)}
    assert ready[0]["weights"] == {"0": 8.0, "1": 4.0, "2": 2.0}


def test_a_proven_forged_weight_excludes_its_sender(coord):
    chs, _ = _round(coord)
    kept = {("pseudo-gradient/reduce-scatter", 2): _header(2, 0, weight=1e9)}
    proof = evidence.gather(kept, 2, {2: 8.0})
    out = _commit(chs, {0: {"worker": 2, "why": "forged weight", "evidence": proof}})
    assert out[0]["members"] == [0, 1]
    assert [e["worker"] for e in out[0]["excluded"]] == [2]
    assert "proven" in coord.status()["excluded"]["2"]["why"]


def test_a_false_accuser_showing_evidence_that_proves_nothing_is_the_one_excluded(coord):
    """Worker 2 shows worker 0's own signed header (weight 8, as recorded) as a forged
    weight: the coordinator checks it, and excludes worker 2, not worker 0."""
    chs, _ = _round(coord)
    honest = _header(0, 2, weight=8.0)
    out = _commit(chs, {2: {"worker": 0, "why": "forged weight",
                            "evidence": {"rule": "weight", **honest.proof}}})
    assert out[0]["members"] == [0, 1]
    st = coord.status()["excluded"]
    assert list(st) == ["2"] and st["2"]["by"] == "coordinator"
    assert "false accusation of worker 0" in st["2"]["why"]


@pytest.mark.parametrize("forge", ["other_key", "other_pair"])
def test_evidence_signed_by_someone_else_or_for_another_pair_convicts_its_author(coord, forge):
    chs, _ = _round(coord)
    if forge == "other_key":  # worker 2 signs a forged-weight header in worker 0's name
        values = torch.ones(100)
        ctx = "0/0/pseudo-gradient/reduce-scatter/0>2"
        head = wire.pack_header(Message(Encoded({"values": values}, numel=100), 16,
                                        weight=1e9, claim=True), KEYS[2], ctx)
        proof = wire.unpack_header(received(head), 0, KEYS[2].public, ctx).proof
    else:  # a real forged header of worker 1's, sent to worker 0, shown by worker 2
        proof = _header(1, 0, weight=1e9).proof
    out = _commit(chs, {2: {"worker": 0 if forge == "other_key" else 1, "why": "forged",
                            "evidence": {"rule": "weight", **proof}}})
    assert [e["worker"] for e in out[0]["excluded"]] == [2]


def test_an_accusation_without_evidence_is_believed_only_when_seconded(coord):
    """Alone, worker 2's word against worker 0's: both sit out the retry, nobody is
    excluded, the dispute is recorded; the retry runs with worker 1 alone."""
    chs, _ = _round(coord)
    out = _commit(chs, {2: {"worker": 0, "why": "does not decode"}})
    assert out[1]["members"] == [1] and not out[1].get("excluded")
    st = coord.status()
    assert st["excluded"] == {} and st["disputes"] == [
        {"round": 0, "attempt": 0, "accused": 0, "accusers": [2]}]
    chs[0].send({"op": "ready", "round": 0, "attempt": 1, "members": [1]})
    assert "sits out the retry" in chs[0].recv()["error"]


def test_a_worker_at_odds_with_most_of_the_others_over_the_run_is_excluded(coord):
    """A false accuser without evidence: worker 2 refuses worker 0 in round 0 (a dispute,
    both sit out the retry), then worker 1 in round 1. Now at odds with both others, it is
    excluded; its victims are not (each is at odds with it alone) and do not sit out the
    retry, which runs with both."""
    chs, _ = _round(coord)
    _commit(chs, {2: {"worker": 0, "why": "does not decode"}})
    done = _ask({1: chs[1]}, {1: {"op": "ready", "round": 0, "attempt": 1, "members": [1],
                                  "weight": 8.0}})
    assert done[1]["members"] == [1]
    _ask({1: chs[1]}, {1: {"op": "commit", "round": 0, "attempt": 1, "ok": True, "hash": "x",
                           "members": [1]}})
    _ask(chs, {w: {"op": "start", "round": 1, "hash": "x", "wait_for": 1} for w in chs})
    _ask(chs, {w: {"op": "ready", "round": 1, "attempt": 0, "members": [0, 1, 2],
                   "weight": 8.0} for w in chs})
    out = _ask(chs, {w: {"op": "commit", "round": 1, "attempt": 0, "ok": w != 2,
                         "hash": None if w == 2 else "y", "members": [0, 1, 2],
                         **({"blame": {"worker": 1, "why": "wrong size"}} if w == 2 else {})}
                     for w in chs})
    assert out[0]["members"] == [0, 1] and [e["worker"] for e in out[0]["excluded"]] == [2]
    st = coord.status()
    assert set(st["excluded"]) == {"2"} and st["excluded"]["2"]["by"] == "coordinator"
    assert "at odds with workers [0, 1]" in st["excluded"]["2"]["why"]
    assert [d["accused"] for d in st["disputes"]] == [0, 1]


def test_two_accusers_without_evidence_exclude_the_accused(coord):
    chs, _ = _round(coord)
    out = _commit(chs, {0: {"worker": 2, "why": "does not decode"},
                        1: {"worker": 2, "why": "does not decode"}})
    assert out[0]["members"] == [0, 1] and [e["worker"] for e in out[0]["excluded"]] == [2]


def test_a_worker_the_others_judges_find_malicious_is_excluded_after_the_commit(coord):
    """Each member's judge (the ban rule on its own view of the influence) names worker 2;
    named by both others, it is excluded once the round has committed; a judge of one is
    not enough. The statistics land in status()'s workers."""
    chs, _ = _round(coord)
    low = {"worker": 2, "reason": "influence under 0.25 x the median for 5 syncs in a row"}

    def stats(w):
        return {"0": {"influence": 0.5}, "1": {"influence": 0.5}, "2": {"influence": 0.01},
                str(w): {"influence": 0.5 if w < 2 else 0.01, "distance_to_aggregate": w + 1.0,
                         "cosine_to_aggregate": 0.9}}

    out = _ask(chs, {w: {"op": "commit", "round": 0, "attempt": 0, "ok": True, "hash": "x",
                         "members": [0, 1, 2], "stats": stats(w),
                         "judged": [low] if w < 2 else [{"worker": 0, "reason": "spite"}]}
                     for w in chs})
    assert out[0]["commit"] and [e["worker"] for e in out[0]["excluded"]] == [2]
    st = coord.status()
    assert list(st["excluded"]) == ["2"] and "judged malicious by workers [0, 1]" in \
        st["excluded"]["2"]["why"]
    assert st["workers"]["2"] == {"round": 0, "influence": 0.01, "distance_to_aggregate": 3.0,
                                  "cosine_to_aggregate": 0.9}
    assert st["workers"]["0"]["influence"] == 0.5


def _verified_shard(lie: float = 1.0, n: int = 5000, weights=None, members=(0, 1, 2)):
    """Worker 2 owns a shard of ``n`` values in a verified sync, worker 0 verifies it: the
    three inputs (as worker 0 holds them) and worker 2's signed aggregate, their median times
    ``lie``, as worker 0 received it (the owner signs ``weights`` and ``members``)."""
    g = torch.Generator().manual_seed(0)
    inputs = tuple(Message(Encoded({"values": torch.randn(n, generator=g)}, numel=n), 16)
                   for _ in range(3))
    y = Median().recompute(torch.stack([m.payload.tensors["values"] for m in inputs])) * lie
    ctx = "0/0/pseudo-gradient/all-gather/2>0"
    sent = Message(Encoded({"values": y}, numel=n), 16,
                   sources=Sources(members, inputs, weights))
    head = wire.pack_header(sent, KEYS[2], ctx)
    out = wire.message(wire.unpack_header(received(head), 2, KEYS[2].public, ctx), {"values": y})
    return out, inputs


def test_a_lying_shard_owner_is_excluded_on_its_own_signed_aggregate(coord):
    """Worker 2 signs, with its aggregate, the roots of the inputs it aggregated; the
    aggregate is -10 times their median. Worker 0 (its verifier) shows one 16 KiB leaf of it
    and of each input: the coordinator applies the job's rule and excludes worker 2."""
    coord.fingerprint = {"aggregator.name": "median", "aggregator.verify": 1.0}
    chs, _ = _round(coord)
    out, inputs = _verified_shard(lie=-10.0)
    proof = evidence.gather({}, 2, {}, Mismatch(out, inputs, (0, 1, 2), (0, 1)), Median())
    assert proof["rule"] == "aggregate" and proof["leaf"] == 0 and len(proof["rows"]) == 3
    res = _commit(chs, {0: {"worker": 2, "why": "aggregate differs", "evidence": proof}})
    assert res[0]["members"] == [0, 1] and [e["worker"] for e in res[0]["excluded"]] == [2]
    why = coord.status()["excluded"]["2"]["why"]
    assert "proven" in why and "not the rule's for the inputs it signed for" in why


@pytest.mark.parametrize("forge", ["honest_owner", "edited_leaf", "no_rule"])
def test_a_verifier_accusing_an_honest_owner_shows_nothing_and_is_excluded(coord, forge):
    """Worker 0 accuses worker 2's aggregate. Honest (the median it signed for), the leaf
    shown is the rule's (worker 0 had to compute its "evidence" with another rule, the mean);
    a leaf edited to look wrong is not the one the owner signed; and a job whose rule the
    coordinator cannot check 16 KiB at a time (the clone filter) believes no such evidence.
    Each time the accuser is the one excluded."""
    coord.fingerprint = {"aggregator.name": "median"}
    if forge == "no_rule":
        coord.fingerprint["aggregator.clones"] = 0.999
    chs, _ = _round(coord)
    out, inputs = _verified_shard(lie=1.0 if forge == "honest_owner" else -10.0)
    proof = evidence.gather({}, 2, {}, Mismatch(out, inputs, (0, 1, 2), (0,)),
                            mean if forge == "honest_owner" else Median())
    if forge == "edited_leaf":  # a true leaf of a lie, shown with the first input's bytes
        proof["out"] = proof["rows"][0]
    res = _commit(chs, {0: {"worker": 2, "why": "aggregate differs", "evidence": proof}})
    assert [e["worker"] for e in res[1]["excluded"]] == [0]
    why = coord.status()["excluded"]["0"]["why"]
    assert why.startswith("a false accusation of worker 2") and {
        "honest_owner": "is what the rule gives", "edited_leaf": "not the ones the owner signed",
        "no_rule": "cannot be checked 16 KiB at a time"}[forge] in why


def test_no_aggregate_evidence_where_the_owner_signed_for_other_inputs_or_the_rule_reads_rows():
    """The verifier shows nothing (its refusal stays its word) where its inputs are not the
    bytes the owner signed for (a sender that sent them different bytes), or where its rule
    is not coordinate-wise (clipping reads whole rows)."""
    out, inputs = _verified_shard(lie=-10.0)
    other = (Message(Encoded({"values": torch.zeros(5000)}, numel=5000), 16), *inputs[1:])
    assert evidence.gather({}, 2, {}, Mismatch(out, other, (0, 1, 2), (0,)), Median()) is None
    assert evidence.gather({}, 2, {}, Mismatch(out, inputs, (0, 1, 2), (0,)),
                           Median(clip_norm=1.0)) is None
    assert evidence.gather({}, 2, {}, Mismatch(out, inputs, (0, 1, 2), (0,)), Median())


# the data's samples a step (a built-in partition's, in its workers' fingerprints) and H
FIXED = {"data.samples_per_step": 8, "algorithm.sync_every": 10}


@pytest.mark.parametrize("weighting, fp, recorded", [
    ("dataset", {"data.sizes": [100, 50, 70]}, {"0": 100.0, "1": 50.0, "2": 70.0}),
    ("uniform", {}, {"0": 1.0, "1": 1.0, "2": 1.0}),
    ("dataset", {}, {"0": 40.0, "1": 0.0, "2": 1e9}),  # a drop-in's: its own data
    ("samples", {"data.sizes": [100] * 3}, {"0": 40.0, "1": 0.0, "2": 1e9}),  # a loader's
    ("samples", FIXED, {"0": 40.0, "1": 0.0, "2": 80.0}),  # at most 8 x 10
    ("samples", {**FIXED, "algorithm.sync_every": [[0, 5], [100, 20]]},
     {"0": 40.0, "1": 0.0, "2": 160.0}),  # the largest H
])
def test_the_recorded_weight_is_the_algorithms_rule_where_the_config_fixes_it(
        coord, weighting, fp, recorded):
    """LocalSGD weighs by each worker's share of the data or alike: the coordinator records
    that, not a member's word, so a member that claims 1e9 at ready as well as in its
    headers is still refused. Samples trained stay each member's report, within a whole
    round's batches where the data fixes a batch's samples (a loader's batches may hold any
    number), as does a drop-in's share (its data is its own); a negative report counts 0."""
    coord.fingerprint = {"algorithm.name": "local_sgd", "algorithm.weighting": weighting, **fp}
    _, ready = _round(coord, weights=(40.0, -5.0, 1e9))
    assert ready[0]["weights"] == recorded


def test_an_owner_signing_a_forged_weight_is_convicted_by_it_and_garbage_stops_no_verifier(
        coord):
    """The owner's aggregate is its rule's for the weights it signed, but it signed worker
    1's weight as 1e9 where 8 was recorded: shown, that alone convicts it. An owner that signs
    nonsense for its inputs (weights that are no numbers) makes the verifier show nothing,
    without an error in the verifier."""
    coord.fingerprint = {"aggregator.name": "median"}
    chs, _ = _round(coord)
    out, inputs = _verified_shard(weights=(8.0, 1e9, 8.0))
    proof = evidence.gather({}, 2, {0: 8.0, 1: 8.0, 2: 8.0},
                            Mismatch(out, inputs, (0, 1, 2), (0,)), Median())
    res = _commit(chs, {0: {"worker": 2, "why": "aggregate differs", "evidence": proof}})
    assert [e["worker"] for e in res[0]["excluded"]] == [2]
    assert "aggregated worker 1's contribution at weight 1e+09, the coordinator recorded 8" \
        in coord.status()["excluded"]["2"]["why"]
    out, inputs = _verified_shard(lie=-10.0, weights=("x", None, {}))
    assert evidence.gather({}, 2, {}, Mismatch(out, inputs, (0, 1, 2), (0,)), Median()) is None
