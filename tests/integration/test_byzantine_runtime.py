"""Hostile workers with real processes (``islands run --attack``, or ``[attack]`` in every
worker's config): the culprit is named and excluded on the coordinator's check of the
evidence its victims show (signed headers, a signed leaf of the payload), never a victim;
the honest workers go on together."""

from __future__ import annotations

import signal

import pytest

from tests.integration.conftest import last_round, metrics, wait_until
from tests.integration.test_runtime_faults import LONG, _two_honest_and


@pytest.mark.parametrize("attack, algorithm, verdict", [
    ("forged_weight", "local_sgd", "proven: it claimed aggregation weight 1e+09, the "
                                   "coordinator recorded"),
    ("nan", "diloco", "proven: its payload's tensor"),
    ("false_accuser", "local_sgd", "a false accusation of worker 0: the header's weight"),
])
def test_an_attacker_turning_hostile_is_excluded_on_evidence_not_its_victims(
        tmp_path, procs, coordinator, attack, algorithm, verdict):
    """Worker 2 is honest for two rounds, then attacks: a forged weight (LocalSGD weighs by
    samples; 1e9 reported at ``ready`` and claimed in its headers, where the coordinator
    records at most a whole round's samples), NaN values past its own codec's check, or an
    accusation of worker 0 that shows worker 0's own signed header as a forged weight."""
    coord = coordinator()
    addr = f"127.0.0.1:{coord.port}"
    out = tmp_path / "run"
    over = ["workers=3", *LONG, f"algorithm.name={algorithm}"]
    ws = {i: procs.worker(i, addr, out, over) for i in range(2)}  # honest: no [attack]
    ws[2] = procs.worker(2, addr, out, [*over, "attack.start_round=2"], ["--attack", attack])
    assert ws[2].wait(timeout=90) == 3
    excluded = coord.status()["excluded"]
    assert list(excluded) == ["2"] and verdict in excluded["2"]["why"], excluded
    assert excluded["2"]["round"] == 2
    assert excluded["2"]["by"] in (("coordinator",) if attack == "false_accuser" else (0, 1))
    r = last_round(out / "w0")
    wait_until(lambda: last_round(out / "w0") >= r + 3, 30, "rounds without worker 2")
    rows = metrics(out / "w0")
    assert [row["participants"] for row in rows if row["round"] < 2] == [[0, 1, 2]] * 2
    assert all(row["participants"] == [0, 1] for row in rows if row["round"] >= 2)
    for p in (ws[0], ws[1]):
        p.send_signal(signal.SIGTERM)
    assert all(ws[i].wait(timeout=30) == 0 for i in (0, 1))


def test_a_false_accuser_without_evidence_is_excluded_once_at_odds_with_both_others(
        tmp_path, procs, coordinator):
    """Under DiLoCo no header carries a weight, so worker 2's accusations are its word alone:
    at round 2 it accuses worker 0 (a dispute: both sit out the retry, worker 1 commits the
    round), at round 3 worker 1. At odds with both others, it is excluded by the
    coordinator; neither victim is, and they go on together."""
    coord = coordinator()
    addr = f"127.0.0.1:{coord.port}"
    out = tmp_path / "run"
    over = ["workers=3", *LONG, "algorithm.name=diloco"]
    ws = {i: procs.worker(i, addr, out, over) for i in range(2)}
    ws[2] = procs.worker(2, addr, out, [*over, "attack.start_round=2"],
                         ["--attack", "false_accuser"])
    assert ws[2].wait(timeout=90) == 3
    st = coord.status()
    assert list(st["excluded"]) == ["2"] and st["excluded"]["2"]["by"] == "coordinator"
    assert "at odds with workers [0, 1]" in st["excluded"]["2"]["why"]
    assert st["excluded"]["2"]["round"] == 3
    assert [(d["round"], d["accused"], d["accusers"]) for d in st["disputes"]] == [
        (2, 0, [2]), (3, 1, [2])]
    r = last_round(out / "w0")
    wait_until(lambda: last_round(out / "w0") >= r + 2, 30, "rounds without worker 2")
    rows = {row["round"]: row["participants"] for row in metrics(out / "w1")}
    assert rows[2] == [1] and all(rows[k] == [0, 1] for k in rows if k >= 3)
    for p in (ws[0], ws[1]):
        p.send_signal(signal.SIGTERM)
    assert all(ws[i].wait(timeout=30) == 0 for i in (0, 1))


def test_a_scaled_contribution_is_clipped_and_pinned_on_its_sender_not_its_victims(
        tmp_path, procs, coordinator):
    """Worker 2 sends -1000 times its pseudo-gradient from round 1. Under the mean its
    victims' updates would go NaN and they would blame themselves; under CenteredClip it is
    clipped, every member's rule gives it almost no influence, and after ``ban_after`` syncs
    both honest judges name it: it is excluded, the honest two train on, finite."""
    coord = coordinator()
    addr = f"127.0.0.1:{coord.port}"
    out = tmp_path / "run"
    over = ["workers=3", *LONG, "attack.name=sign_flip", "attack.scale=1000",
            "attack.attackers=1", "attack.start_round=1", "aggregator.name=centered_clip",
            "aggregator.ban_after=2"]
    ws = {i: procs.worker(i, addr, out, over) for i in range(3)}  # one config for all
    assert ws[2].wait(timeout=90) == 3
    st = coord.status()
    assert list(st["excluded"]) == ["2"], st["excluded"]
    assert "judged malicious by workers [0, 1]" in st["excluded"]["2"]["why"]
    assert st["excluded"]["2"]["round"] == 2  # its second attacked sync
    r = last_round(out / "w0")
    wait_until(lambda: last_round(out / "w0") >= r + 2, 30, "rounds without worker 2")
    assert st["workers"]["2"]["influence"] < 0.1 < st["workers"]["0"]["influence"]
    rows = metrics(out / "w0")
    assert all(row["participants"] == [0, 1] for row in rows if row["round"] > 2)
    losses = [row["eval_loss"] for row in rows if row.get("eval_loss") is not None]
    assert losses and all(x == x and x < 10 for x in losses)  # finite, not blown up
    for p in (ws[0], ws[1]):
        p.send_signal(signal.SIGTERM)
    assert all(ws[i].wait(timeout=30) == 0 for i in (0, 1))


def test_a_lying_shard_owner_caught_by_its_verifier_is_excluded_on_its_own_signed_aggregate(
        tmp_path, procs, coordinator):
    """Worker 2 returns -10 times its shard's aggregate; every sync is verified. Worker 2 signs,
    with its aggregate, the roots of the inputs it aggregated; its verifier recomputes the
    shard, refuses it and shows the coordinator 16 KiB of it and of each input. The coordinator
    applies the job's median and excludes worker 2, by the verifier's word proven: no dispute,
    no honest worker excluded, and the lie never lands (no round with worker 2 after it turned)."""
    coord = coordinator()
    addr = f"127.0.0.1:{coord.port}"
    out = tmp_path / "run"
    over = ["workers=3", *LONG, "aggregator.name=median", "aggregator.verify=1.0"]
    ws = {i: procs.worker(i, addr, out, over) for i in range(2)}
    ws[2] = procs.worker(2, addr, out, [*over, "attack.start_round=1"],
                         ["--attack", "lying_aggregator"])
    wait_until(lambda: "2" in coord.status()["excluded"], 90, "worker 2 excluded")
    st = coord.status()
    assert list(st["excluded"]) == ["2"] and st["disputes"] == []
    ex = st["excluded"]["2"]
    assert ex["by"] in (0, 1) and ex["round"] == 1
    assert "proven: its signed aggregate is not the rule's" in ex["why"]
    wait_until(lambda: last_round(out / "w0") >= 3, 60, "round 3 without worker 2")
    rows = metrics(out / "w0") + metrics(out / "w1")
    assert all(2 not in row["participants"] for row in rows if row["round"] >= 1)
    assert ws[2].wait(timeout=30) == 3  # removed from the run
    for i in (0, 1):
        ws[i].send_signal(signal.SIGTERM)
    assert all(ws[i].wait(timeout=30) == 0 for i in (0, 1))


def test_a_worker_sending_more_bytes_than_its_headers_say_is_refused_by_name_no_one_aborts(
        tmp_path, procs, coordinator):
    """Worker 2's payloads carry 4 bytes more than its signed headers say. Over islands'
    streams (the default) both receivers refuse them naming it, their accusations second each
    other, and worker 2 is excluded; the honest two go on and exit 0 (over gloo's pairs both
    died with SIGABRT)."""
    coord, ws, bad, out = _two_honest_and(tmp_path, procs, coordinator, "oversize_worker.py")
    why = coord.status()["excluded"]["2"]["why"]
    assert "worker 2 sent a message of" in why and "refused by workers [0, 1] alike" in why
    r = last_round(out / "w0")
    wait_until(lambda: last_round(out / "w0") >= r + 2, 30, "rounds without worker 2")
    for p in ws.values():
        p.send_signal(signal.SIGTERM)
    assert all(p.wait(timeout=30) == 0 for p in ws.values())
