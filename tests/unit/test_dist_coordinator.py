"""The coordinator in-process: authentication, malformed input, barriers, epochs, status."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from islands.core.errors import AuthError, CommError
from islands.runtime.auth import client_connect
from islands.runtime.coordinator import Coordinator
from islands.runtime.membership import CoordinatorClient


def _worker(c: Coordinator, wid: int, token: bytes = b"tok", fp: dict | None = None,
            incarnation: str | None = None):
    return client_connect(f"127.0.0.1:{c.port}", token,
                          {"role": "worker", "id": wid, "channel": "control",
                           "incarnation": incarnation or f"i{wid}",
                           "store": ["127.0.0.1", 1000 + wid], "fingerprint": fp or {}})


def test_bad_token_garbage_and_silence_are_refused(coord):
    with pytest.raises(AuthError, match="bad token"):
        _worker(coord, 0, token=b"wrong")
    with socket.create_connection(("127.0.0.1", coord.port)) as s:
        s.sendall(b"\x16\x03\x01garbage\n")
        assert b"error" in s.recv(4096) + s.recv(4096)
    with socket.create_connection(("127.0.0.1", coord.port)) as s:
        s.recv(4096)  # the challenge; then say nothing: closed after the handshake timeout
        s.settimeout(5)
        assert b"timed out" in s.recv(4096)
    with pytest.raises(AuthError):
        client_connect(f"127.0.0.1:{coord.port}", b"tok",
                       {"role": "worker", "id": "x", "store": ["h", 1]})
    assert coord.refused >= 4 and coord.status()["live"] == []


def test_lines_are_held_to_64_kib_unless_a_registered_worker_sends_them(coord):
    """A registered worker's line may carry a verifier's evidence (a leaf per member), up
    to 4 MiB; a connection that is no worker (``islands status``) stays at 64 KiB, and so
    does everyone before the handshake."""
    with socket.create_connection(("127.0.0.1", coord.port)) as s:
        s.recv(4096)  # the challenge; then one line longer than 64 KiB
        s.sendall(b'{"pad": "' + b"x" * (70 << 10))
        s.settimeout(5)
        assert b"longer than 65536 bytes" in s.recv(4096)
    ch = _worker(coord, 0)
    ch.send({"op": "status", "pad": "x" * (1 << 20)})
    assert "live" in ch.recv()
    viewer = client_connect(f"127.0.0.1:{coord.port}", b"tok", {"role": "status"})
    viewer.send({"op": "status", "pad": "x" * (70 << 10)})
    with pytest.raises(CommError):
        viewer.recv()


def _start_together(channels: dict) -> dict:
    """Every worker's ``start`` of round 0 at once (``{worker id: channel}``); the replies."""
    out = {}

    def start(ch, wid):
        ch.send({"op": "start", "round": 0, "hash": "h", "wait_for": len(channels)})
        out[wid] = ch.recv()

    ts = [threading.Thread(target=start, args=(ch, i)) for i, ch in channels.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    return out


def test_barriers_release_together_and_epochs_advance(coord):
    a, b = _worker(coord, 0), _worker(coord, 1)
    out = _start_together({0: a, 1: b})
    assert out[0] == out[1]
    assert out[0]["members"] == [0, 1] and out[0]["epoch"] == 1 and out[0]["need_state"] == []
    assert out[0]["store"] == ["127.0.0.1", 1000]
    a.send({"op": "ready", "round": "zero", "attempt": 0, "members": [0, 1]})
    assert "round must be" in a.recv()["error"]
    st = coord.status()
    assert st["members"] == [0, 1] and st["epoch"] == 1


def test_hash_majority_names_the_workers_to_repair(coord):
    chans = [_worker(coord, i) for i in range(3)]
    out = {}

    def start(i):
        chans[i].send({"op": "start", "round": 4, "hash": "bad" if i == 2 else "good",
                       "wait_for": 3})
        out[i] = chans[i].recv()

    ts = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert out[0]["need_state"] == [2] and out[0]["src"] == 0 and out[0]["round"] == 4
    assert coord.hash_mismatches == 1


def test_requests_without_a_connection_fail_cleanly():
    with pytest.raises(CommError, match="cannot connect"):
        client_connect("127.0.0.1:1", b"", {"role": "status"}, timeout_s=1)


def _send(chs: dict, reqs: dict) -> tuple[dict, list[threading.Thread]]:
    """Sends each worker's request on a thread of its own (a barrier may hold it); returns
    the replies, filled in as they come, and the threads."""
    out = {}

    def one(wid):
        chs[wid].send(reqs[wid])
        out[wid] = chs[wid].recv()

    ts = [threading.Thread(target=one, args=(w,)) for w in reqs]
    for t in ts:
        t.start()
    return out, ts


def _ask(chs: dict, reqs: dict) -> dict:
    """Sends each worker's request at once (barriers block) and collects the replies."""
    out, ts = _send(chs, reqs)
    for t in ts:
        t.join(10)
    assert set(out) == set(reqs), "a barrier did not release"
    return out


def test_a_joiner_heals_into_the_round_in_flight_as_an_observer(coord):
    chs = {0: _worker(coord, 0), 1: _worker(coord, 1)}
    first = _ask(chs, {w: {"op": "start", "round": 4, "hash": "h", "wait_for": 2} for w in chs})
    assert first[0]["members"] == [0, 1]
    # round 4 is in flight; worker 2 arrives asking to heal: answered at once, not held
    chs[2] = _worker(coord, 2)
    chs[2].send({"op": "start", "round": 0, "hash": "fresh", "wait_for": 1, "heal": True})
    healed = chs[2].recv()
    assert healed == {"heal": True, "round": 4, "src": 0, "members": [0, 1, 2]}
    # the members' ready waits for the observer and names it, with who sends it the state
    ready = _ask(chs, {0: {"op": "ready", "round": 4, "attempt": 0, "members": [0, 1],
                           "weight": 8.0},
                       1: {"op": "ready", "round": 4, "attempt": 0, "members": [0, 1],
                           "weight": 8.0},
                       2: {"op": "ready", "round": 4, "attempt": 0, "members": [0, 1, 2],
                           "weight": 8.0}})
    assert all(r["members"] == [0, 1, 2] and r["observers"] == [2] for r in ready.values())
    # the observer contributes nothing: recorded at weight 0, as every member sends it (held
    # to its report, an honest observer's header or an owner's aggregate would look forged)
    assert ready[0]["weights"] == {"0": 8.0, "1": 8.0, "2": 0.0}
    assert ready[0]["heal"] == {"src": 0, "dsts": [2]}
    commit = _ask(chs, {w: {"op": "commit", "round": 4, "attempt": 0, "ok": True, "hash": "g",
                            "members": [0, 1, 2]} for w in chs})
    assert all(c["commit"] and c["mismatched"] == [] for c in commit.values())
    # at a round boundary a healing joiner observes the round that starts; one that does
    # not ask to heal (DDP, a resumed worker) receives the state at start and trains it
    chs[3], chs[4] = _worker(coord, 3), _worker(coord, 4)
    nxt = _ask(chs, {w: {"op": "start", "round": 5 if w < 3 else 0, "hash": "g" if w < 3
                         else "fresh", "wait_for": 1, "heal": w == 3} for w in chs})
    assert nxt[3] == {"heal": True, "round": 5, "src": 0, "members": [0, 1, 2, 3, 4]}
    assert nxt[0]["members"] == [0, 1, 2, 4] and nxt[0]["need_state"] == [4]
    assert nxt[4] == nxt[0] and nxt[0]["healing"] == [3]


def test_too_late_for_the_round_in_flight_heals_into_the_next(coord):
    chs = {0: _worker(coord, 0), 1: _worker(coord, 1)}
    _ask(chs, {w: {"op": "start", "round": 0, "hash": "h", "wait_for": 2} for w in chs})
    _ask(chs, {w: {"op": "ready", "round": 0, "attempt": 0, "members": [0, 1]} for w in chs})
    chs[2] = _worker(coord, 2)
    held, (t,) = _send(chs, {2: {"op": "start", "round": 0, "hash": "h", "wait_for": 1,
                                 "heal": True}})
    t.join(0.5)
    assert held == {}  # held at the next start, not healed into round 0
    _ask({w: chs[w] for w in (0, 1)},
         {w: {"op": "commit", "round": 0, "attempt": 0, "ok": True, "hash": "g",
              "members": [0, 1]} for w in (0, 1)})
    nxt = _ask({w: chs[w] for w in (0, 1)},
               {w: {"op": "start", "round": 1, "hash": "g", "wait_for": 1} for w in (0, 1)})
    t.join(10)
    assert nxt[0]["members"] == [0, 1] and nxt[0]["healing"] == [2]
    assert held[2] == {"heal": True, "round": 1, "src": 0, "members": [0, 1, 2]}


def test_a_restart_of_a_member_lost_mid_round_is_awaited_after_it_heals(coord):
    """Worker 2 dies inside round 0 and its restart asks to heal before round 0's ready:
    too late for round 0 (its id is a member there), it observes round 1; the start of round
    2 then waits for it, as for any member (it is not left behind computing round 0)."""
    chs = {w: _worker(coord, w) for w in (0, 1)}
    dying = client_connect(f"127.0.0.1:{coord.port}", b"tok",
                           {"role": "worker", "id": 2, "channel": "heartbeat",
                            "incarnation": "old", "store": ["127.0.0.1", 1002],
                            "fingerprint": {}})
    both = {**chs, 2: _worker(coord, 2, incarnation="old")}
    _ask(both, {w: {"op": "start", "round": 0, "hash": "h", "wait_for": 3} for w in both})
    dying.close()  # the kill
    for _ in range(200):  # the coordinator sees the closed connection
        if 2 not in coord.status()["live"]:
            break
        threading.Event().wait(0.05)
    chs[2] = _worker(coord, 2, incarnation="new")
    held, (t,) = _send(chs, {2: {"op": "start", "round": 0, "hash": "fresh", "wait_for": 1,
                                 "heal": True}})
    t.join(0.3)
    assert held == {}  # held at the next start
    fast = {w: chs[w] for w in (0, 1)}
    ready = _ask(fast, {w: {"op": "ready", "round": 0, "attempt": 0, "members": [0, 1, 2]}
                        for w in fast})
    assert ready[0]["left_out"] == [2]
    _ask(fast, {w: {"op": "commit", "round": 0, "attempt": 0, "ok": True, "hash": "g",
                    "members": [0, 1]} for w in fast})
    _ask(fast, {w: {"op": "start", "round": 1, "hash": "g", "wait_for": 1} for w in fast})
    t.join(10)
    assert held[2]["heal"] and held[2]["round"] == 1
    _ask(chs, {w: {"op": "ready", "round": 1, "attempt": 0, "members": [0, 1, 2]}
               for w in chs})
    _ask(chs, {w: {"op": "commit", "round": 1, "attempt": 0, "ok": True, "hash": "g1",
                   "members": [0, 1, 2]} for w in chs})
    early, ts = _send(chs, {w: {"op": "start", "round": 2, "hash": "g1", "wait_for": 1}
                            for w in (0, 1)})
    ts[0].join(0.3)
    assert early == {}  # the start of round 2 waits for worker 2
    chs[2].send({"op": "start", "round": 2, "hash": "g1", "wait_for": 1})
    assert chs[2].recv()["members"] == [0, 1, 2]
    for th in ts:
        th.join(10)
    assert early[0]["members"] == [0, 1, 2] and early[1]["members"] == [0, 1, 2]


def test_a_joiner_with_another_config_is_refused_naming_the_key_and_both_values(coord):
    job = {"seed": 0, "model.n_embd": 128, "algorithm.sync_every": 50, "model.shapes": "a1"}
    _worker(coord, 0, fp=job)  # the first worker sets the job's fingerprint
    with pytest.raises(AuthError, match=r"model.n_embd is 128 in the job and 64 here"):
        _worker(coord, 1, fp={**job, "model.n_embd": 64, "model.shapes": "b2"})
    with pytest.raises(AuthError, match=r"algorithm.sync_every is 50 in the job and 5 here"):
        _worker(coord, 2, fp={**job, "algorithm.sync_every": 5})
    with pytest.raises(AuthError, match=r"seed is 0 in the job and 1 here"):
        _worker(coord, 3, fp={**job, "seed": 1})
    _worker(coord, 4, fp=dict(job))  # the same config joins
    st = coord.status()
    assert st["live"] == [0, 4] and len(st["refused_joins"]) == 3
    assert "model.n_embd" in st["refused_joins"][0]["why"]


def test_a_dropin_without_data_sizes_joins_a_job_of_cli_workers(coord):
    """The drop-in's data is its own loop's, so its fingerprint has no data.sizes; it joins a
    job whose first worker (islands run) had them, and still cannot differ elsewhere."""
    job = {"seed": 0, "model.shapes": "a1", "data.sizes": [10, 10], "rounds": 4}
    _worker(coord, 0, fp=job)
    dropin = {k: v for k, v in job.items() if k != "data.sizes"}
    _worker(coord, 1, fp=dropin)
    with pytest.raises(AuthError, match="rounds is 4 in the job and 5 here"):
        _worker(coord, 2, fp={**dropin, "rounds": 5})
    assert coord.status()["live"] == [0, 1]


def test_a_coordinator_config_fingerprint_is_the_jobs_and_learns_derived_keys():
    from islands.core.config import load_config
    from islands.runtime.fingerprint import config_fingerprint

    job = config_fingerprint(load_config(None, ["codec.name=int8"]))
    hostile = load_config(None, ["codec.name=int8", "attack.name=noise", "attack.attackers=1"])
    assert config_fingerprint(hostile) == job  # a hostile worker's own [attack] (--attack)
    c = Coordinator("127.0.0.1", 0, token=b"tok", fingerprint=job).start()
    try:
        mine = config_fingerprint(load_config(None, ["threads=2", "device=cpu"]))
        with pytest.raises(AuthError, match=r"codec.name is 'int8' in the job and 'identity'"):
            _worker(c, 0, fp={**mine, "model.shapes": "x", "rounds": 10})
        _worker(c, 1, fp={**job, "model.shapes": "x", "rounds": 10})  # threads may differ
        assert c.fingerprint["rounds"] == 10  # learned from the first worker
        with pytest.raises(AuthError, match="model.shapes is 'x' in the job and 'y' here"):
            _worker(c, 2, fp={**job, "model.shapes": "y", "rounds": 10})
    finally:
        c.stop()


def test_a_setting_only_the_coordinator_reads_is_refused_or_adopted_never_ignored():
    """runtime.round_deadline_s on a worker: a coordinator with a config of its own refuses a
    worker whose value differs (naming the key); one started without adopts the first
    worker's, and then holds the others to it."""
    from islands.core.config import load_config
    from islands.runtime.fingerprint import config_fingerprint
    from islands.runtime.launch import start_coordinator

    job = config_fingerprint(load_config(None, []))
    late = config_fingerprint(load_config(None, ["runtime.round_deadline_s=0.5"]))
    configured = start_coordinator(load_config(None, []), 0, b"tok", host="127.0.0.1",
                                   fingerprint=job)
    bare = start_coordinator(load_config(None, []), 0, b"tok", host="127.0.0.1")
    try:
        with pytest.raises(AuthError, match=r"runtime.round_deadline_s is read by the "
                                            r"coordinator, which applies None; this worker has "
                                            r"0.5"):
            _worker(configured, 0, fp=late)
        assert bare.deadline_s is None
        _worker(bare, 0, fp=late)
        assert bare.deadline_s == 0.5  # adopted: the worker's setting does what it says
        with pytest.raises(AuthError, match="runtime.round_deadline_s is read by the coord"):
            _worker(bare, 1, fp=job)
    finally:
        configured.stop()
        bare.stop()


def test_a_leaving_worker_hears_the_coordinators_view_of_the_job(coord):
    a, b = _worker(coord, 0), _worker(coord, 1)
    _start_together({0: a, 1: b})
    a.send({"op": "leave"})
    view = a.recv()["job"]
    assert view["epochs"][0]["members"] == [0, 1] and view["epochs"][0]["from_round"] == 0
    assert view["rounds_committed"] == 0 and view["aborted_attempts"] == 0


def test_a_worker_that_left_after_its_last_round_is_no_failure_to_its_peers(coord):
    """A sampled run's last round: a worker not drawn sends the state to a stale one and
    leaves, finished, while the receiver may still be reading it. Its peers' heartbeats list
    it as present (no exchange is aborted for it); a worker that left early is gone."""
    seen: list[set[int]] = []
    clients = [CoordinatorClient(f"127.0.0.1:{coord.port}", b"tok", w, ["127.0.0.1", 1000 + w],
                                 heartbeat_s=0.02,
                                 on_live=(lambda live, _: seen.append(live)) if w == 2 else None)
               for w in range(3)]
    try:
        for c in clients:
            c.start()
        clients[0].leave(finished=True)
        clients[1].leave()
        assert coord.status()["live"] == [2]
        deadline = time.monotonic() + 5  # the first heartbeat answered after both left
        while not (seen and 1 not in seen[-1]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen[-1] == {0, 2}
    finally:
        for c in clients:
            c.close()


def test_a_second_process_cannot_take_a_live_workers_id(coord):
    live = _worker(coord, 0, incarnation="first")
    with pytest.raises(AuthError, match="worker id 0 is held by a live process"):
        _worker(coord, 0, incarnation="second")
    live.send({"op": "hb"})
    assert live.recv()["live"] == [0]  # the live one keeps its place
    import time

    time.sleep(1.2)  # past heartbeat_timeout_s without a heartbeat: it may be replaced
    _worker(coord, 0, incarnation="second")
    live.send({"op": "hb"})
    assert "superseded" in live.recv()["error"]


def test_a_refused_contribution_excludes_its_sender_from_the_retry_and_the_run(coord):
    chs = {w: _worker(coord, w) for w in range(3)}
    _ask(chs, {w: {"op": "start", "round": 0, "hash": "h", "wait_for": 3} for w in chs})
    _ask(chs, {w: {"op": "ready", "round": 0, "attempt": 0, "members": [0, 1, 2]} for w in chs})
    blame = {"worker": 1, "why": "payload from worker 1 holds 49 values"}
    out = _ask(chs, {0: {"op": "commit", "round": 0, "attempt": 0, "ok": False, "hash": None,
                         "members": [0, 1, 2], "blame": blame},
                     1: {"op": "commit", "round": 0, "attempt": 0, "ok": True, "hash": "x",
                         "members": [0, 1, 2]},
                     2: {"op": "commit", "round": 0, "attempt": 0, "ok": False, "hash": None,
                         "members": [0, 1, 2], "blame": blame}})
    assert not out[0]["commit"] and out[0]["members"] == [0, 2]
    assert out[0]["excluded"] == [{"worker": 1, "by": 0, "round": 0,
                                   "why": "payload from worker 1 holds 49 values (refused by "
                                          "workers [0, 2] alike)"}]
    chs[1].send({"op": "ready", "round": 0, "attempt": 1, "members": [0, 2]})
    reply = chs[1].recv()
    assert reply.get("removed") and "by worker 0: payload from worker 1" in reply["error"]
    assert coord.status()["excluded"]["1"]["by"] == 0
    retry = _ask({w: chs[w] for w in (0, 2)},
                 {w: {"op": "ready", "round": 0, "attempt": 1, "members": [0, 2]}
                  for w in (0, 2)})
    assert retry[0]["members"] == [0, 2]


def test_a_member_that_misreports_the_rounds_members_is_excluded_not_its_victims(coord):
    """Worker 2 reaches ready first declaring itself the only member: the coordinator knows
    whom it released the round with, so worker 2 is excluded and the honest two go on
    together (taking the first declaration left them out of the round); a commit that
    declares other members than the ready released is refused alike."""
    chs = {w: _worker(coord, w) for w in range(3)}
    _ask(chs, {w: {"op": "start", "round": 0, "hash": "h", "wait_for": 3} for w in chs})
    chs[2].send({"op": "ready", "round": 0, "attempt": 0, "members": [2]})
    reply = chs[2].recv()
    assert reply.get("removed") and "declared members [2]" in reply["error"]
    out = _ask({w: chs[w] for w in (0, 1)},
               {w: {"op": "ready", "round": 0, "attempt": 0, "members": [0, 1, 2]}
                for w in (0, 1)})
    assert out[0]["members"] == out[1]["members"] == [0, 1]
    st = coord.status()
    assert st["excluded"]["2"]["by"] == "coordinator" and st["live"] == [0, 1]
    chs[0].send({"op": "commit", "round": 0, "attempt": 0, "ok": True, "hash": "x",
                 "members": [0]})
    assert chs[0].recv().get("removed")
    assert coord.status()["live"] == [1]


def test_a_round_that_keeps_failing_gives_up_instead_of_looping():
    c = Coordinator("127.0.0.1", 0, token=b"tok", max_attempts=3).start()
    try:
        chs = {w: _worker(c, w) for w in range(2)}
        _ask(chs, {w: {"op": "start", "round": 0, "hash": "h", "wait_for": 2} for w in chs})
        for attempt in range(3):
            _ask(chs, {w: {"op": "ready", "round": 0, "attempt": attempt, "members": [0, 1]}
                       for w in chs})
            out = _ask(chs, {w: {"op": "commit", "round": 0, "attempt": attempt, "ok": False,
                                 "why": "network", "members": [0, 1]} for w in chs})
            assert not out[0]["commit"]
        assert "round 0 failed 3 attempts with the same members [0, 1]" in out[0]["fatal"]
    finally:
        c.stop()


def _three_started(c: Coordinator) -> dict:
    """Workers 0, 1 and 2 past round 0's start."""
    chs = {w: _worker(c, w) for w in range(3)}
    _ask(chs, {w: {"op": "start", "round": 0, "hash": "h", "wait_for": 3} for w in chs})
    return chs


def _ready(chs: dict) -> dict:
    """Those workers at round 0's ready (members 0, 1, 2); their replies."""
    return _ask(chs, {w: {"op": "ready", "round": 0, "attempt": 0, "members": [0, 1, 2]}
                      for w in chs})


def test_with_a_deadline_a_straggler_holds_neither_ready_nor_the_next_start():
    c = Coordinator("127.0.0.1", 0, token=b"tok", deadline_s=0.3, heartbeat_timeout_s=30).start()
    try:
        chs = _three_started(c)
        fast = {w: chs[w] for w in (0, 1)}
        ready = _ready(fast)
        assert ready[0]["members"] == [0, 1] and ready[0]["left_out"] == [2]
        _ask(fast, {w: {"op": "commit", "round": 0, "attempt": 0, "ok": True, "hash": "g",
                        "members": [0, 1]} for w in fast})
        # worker 2 is still computing round 0: the next start does not wait for it
        nxt = _ask(fast, {w: {"op": "start", "round": 1, "hash": "g", "wait_for": 1}
                          for w in fast})
        assert nxt[0]["members"] == [0, 1]
        assert c.status()["round_in_flight"] == 1
    finally:
        c.stop()


def test_with_a_quorum_the_ready_barrier_goes_ahead_after_the_grace_window():
    """algorithm.min_quorum = 2, grace_s = 0.2: the two fast members are held the grace window
    for the third, then go ahead without it (left out, as past a deadline); with a quorum of
    3 nobody goes ahead without it."""
    c = Coordinator("127.0.0.1", 0, token=b"tok", min_quorum=2, grace_s=0.2,
                    heartbeat_timeout_s=30).start()
    try:
        chs = _three_started(c)
        ready = _ready({w: chs[w] for w in (0, 1)})
        assert ready[0]["members"] == [0, 1] and ready[0]["left_out"] == [2]
    finally:
        c.stop()
    c = Coordinator("127.0.0.1", 0, token=b"tok", min_quorum=3, grace_s=0.0,
                    heartbeat_timeout_s=30).start()
    try:
        chs = _three_started(c)
        for w in (0, 1):
            chs[w].send({"op": "ready", "round": 0, "attempt": 0, "members": [0, 1, 2]})
        time.sleep(0.3)  # ticks of the coordinator pass: the quorum of 3 is not there
        chs[2].send({"op": "ready", "round": 0, "attempt": 0, "members": [0, 1, 2]})
        assert [chs[w].recv()["members"] for w in range(3)] == [[0, 1, 2]] * 3
    finally:
        c.stop()


def test_a_coordinator_without_a_config_adopts_the_straggler_policy():
    from islands.core.config import load_config
    from islands.runtime.fingerprint import config_fingerprint

    fp = config_fingerprint(load_config(None, ["algorithm.min_quorum=2",
                                               "algorithm.grace_s=0.5"]))
    c = Coordinator("127.0.0.1", 0, token=b"tok", adopt_settings=True).start()
    try:
        _worker(c, 0, fp=fp)
        assert (c.min_quorum, c.grace_s) == (2, 0.5)
    finally:
        c.stop()


def test_a_worker_behind_a_finished_job_is_told_so():
    c = Coordinator("127.0.0.1", 0, token=b"tok", fingerprint={"rounds": 1}).start()
    try:
        chs = {w: _worker(c, w, fp={"rounds": 1}) for w in range(2)}
        _ask(chs, {w: {"op": "start", "round": 0, "hash": "h", "wait_for": 2} for w in chs})
        _ask(chs, {w: {"op": "ready", "round": 0, "attempt": 0, "members": [0, 1]} for w in chs})
        _ask(chs, {w: {"op": "commit", "round": 0, "attempt": 0, "ok": True, "hash": "g",
                       "members": [0, 1]} for w in chs})
        late = _worker(c, 2, fp={"rounds": 1})
        late.send({"op": "start", "round": 0, "hash": "h", "wait_for": 1})
        assert late.recv() == {"finished": True, "last_round": 0}
    finally:
        c.stop()


def test_two_workers_with_two_states_of_one_round_keep_the_lowest_ids(coord):
    chs = {w: _worker(coord, w) for w in (3, 5)}
    out = _ask(chs, {3: {"op": "start", "round": 2, "hash": "three", "wait_for": 2},
                     5: {"op": "start", "round": 2, "hash": "five", "wait_for": 2}})
    assert out[3]["src"] == 3 and out[3]["hash"] == "three" and out[3]["need_state"] == [5]


def test_start_and_commit_break_a_tie_alike_whatever_the_arrival_order():
    from islands.runtime.rounds import _majority

    assert _majority({5: "five", 3: "three"}) == ("three", True)  # 5 arrived first
    assert _majority({5: "a", 3: "b", 4: "a"}) == ("a", False)
    assert _majority({}) == (None, False)


def test_a_port_in_use_and_no_token_beyond_loopback_are_one_line_each(coord):
    from islands.core.config import RunConfig
    from islands.core.errors import ConfigError
    from islands.runtime.launch import start_coordinator

    with pytest.raises(CommError, match=rf"cannot listen on 127.0.0.1:{coord.port}: .*in use"):
        Coordinator("127.0.0.1", coord.port).start()
    with pytest.raises(ConfigError, match="no --token-file: anyone who can reach 0.0.0.0"):
        start_coordinator(RunConfig(), 0, b"", host="0.0.0.0")
    start_coordinator(RunConfig(), 0, b"", host="0.0.0.0", insecure=True).stop()
    start_coordinator(RunConfig(), 0, b"", host="127.0.0.1").stop()  # loopback: no token ok


def test_status_watch_flags_a_stuck_round(capsys):
    from islands.runtime.watch import is_stuck, watch

    st = {"instance": "abc", "members": [0, 1], "live": [0], "epoch": 3, "round_in_flight": 7,
          "round_in_flight_s": 9.0, "median_round_s": 1.0, "last_round": 6,
          "last_commit_unix": None, "excluded": {"1": {"by": 0, "round": 5, "why": "NaN"}},
          "refused_joins": [], "hash_mismatches": 0}
    assert is_stuck(st, 5.0) and not is_stuck({**st, "round_in_flight_s": 2.0}, 5.0)
    from rich.console import Console

    watch(lambda: st, interval_s=0, count=2, console=Console(width=200))
    printed = capsys.readouterr().out
    assert printed.count("coordinator abc") == 2
    assert "STUCK" in printed and "1 (gone)" in printed and "by worker 0 at round 5: NaN" in printed


def test_an_arrival_that_releases_a_barrier_wakes_its_waiters_at_once(monkeypatch):
    """A barrier's waiters hear its release when the last member arrives, not at the
    coordinator's next liveness tick: with the tick and the fallback wait an hour long,
    the rounds still pass (each used to cost up to 20 ms of waiting per barrier)."""
    import islands.runtime.coordinator as coordinator
    monkeypatch.setattr(coordinator, "TICK_S", 3600.0)
    monkeypatch.setattr(coordinator, "WAIT_S", 3600.0)
    c = Coordinator("127.0.0.1", 0, token=b"tok", heartbeat_timeout_s=3600.0).start()
    try:
        chs = {0: _worker(c, 0), 1: _worker(c, 1)}
        assert _start_together(chs)[0]["members"] == [0, 1]
        for r in range(3):
            ready = _ask(chs, {w: {"op": "ready", "round": r, "attempt": 0, "members": [0, 1]}
                               for w in chs})
            assert ready[0]["members"] == ready[1]["members"] == [0, 1]
            done = _ask(chs, {w: {"op": "commit", "round": r, "attempt": 0, "ok": True,
                                  "hash": f"h{r}", "members": [0, 1]} for w in chs})
            assert done[0]["commit"] and done[1]["commit"]
            if r < 2:
                start = _ask(chs, {w: {"op": "start", "round": r + 1, "hash": f"h{r}",
                                       "wait_for": 1} for w in chs})
                assert start[0]["round"] == start[1]["round"] == r + 1
        assert c.rounds_committed == 3 and c.status()["last_round"] == 2
    finally:
        c.stop()
