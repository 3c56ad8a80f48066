"""The coordinator's verdict on an aborted attempt's accusations: evidence first (proven: the
accused goes; disproven: the accuser goes), then a majority, then a dispute both sides sit
out. Each against a real coordinator over its control channel."""

from __future__ import annotations

import pytest
import torch

from islands.codecs.base import Encoded
from islands.core import signing
from islands.runtime import evidence
from islands.runtime.auth import client_connect
from islands.transports import wire
from islands.transports.base import Message
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
