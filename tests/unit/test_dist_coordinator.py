"""The coordinator in-process: authentication, malformed input, barriers, epochs, status."""

from __future__ import annotations

import socket
import threading

import pytest

from islands.core.errors import AuthError, CommError
from islands.runtime.auth import client_connect
from islands.runtime.coordinator import Coordinator


@pytest.fixture
def coord():
    c = Coordinator("127.0.0.1", 0, token=b"tok", heartbeat_timeout_s=1.0,
                    handshake_timeout_s=0.5).start()
    yield c
    c.stop()


def _worker(c: Coordinator, wid: int, token: bytes = b"tok"):
    return client_connect(f"127.0.0.1:{c.port}", token,
                          {"role": "worker", "id": wid, "channel": "control",
                           "incarnation": f"i{wid}", "store": ["127.0.0.1", 1000 + wid]})


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


def test_barriers_release_together_and_epochs_advance(coord):
    a, b = _worker(coord, 0), _worker(coord, 1)
    out = {}

    def start(ch, wid):
        ch.send({"op": "start", "round": 0, "hash": "h", "wait_for": 2})
        out[wid] = ch.recv()

    ts = [threading.Thread(target=start, args=(ch, i)) for i, ch in ((0, a), (1, b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
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


def _ask(chs: dict, reqs: dict) -> dict:
    """Sends each worker's request at once (barriers block) and collects the replies."""
    out = {}

    def one(wid):
        chs[wid].send(reqs[wid])
        out[wid] = chs[wid].recv()

    ts = [threading.Thread(target=one, args=(w,)) for w in reqs]
    for t in ts:
        t.start()
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
    ready = _ask(chs, {0: {"op": "ready", "round": 4, "attempt": 0, "members": [0, 1]},
                       1: {"op": "ready", "round": 4, "attempt": 0, "members": [0, 1]},
                       2: {"op": "ready", "round": 4, "attempt": 0, "members": [0, 1, 2]}})
    assert all(r["members"] == [0, 1, 2] and r["observers"] == [2] for r in ready.values())
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
    holder = {}
    t = threading.Thread(target=lambda: (chs[2].send(
        {"op": "start", "round": 0, "hash": "h", "wait_for": 1, "heal": True}),
        holder.update(r=chs[2].recv())))
    t.start()
    t.join(0.5)
    assert "r" not in holder  # held at the next start, not healed into round 0
    _ask({w: chs[w] for w in (0, 1)},
         {w: {"op": "commit", "round": 0, "attempt": 0, "ok": True, "hash": "g",
              "members": [0, 1]} for w in (0, 1)})
    nxt = _ask({w: chs[w] for w in (0, 1)},
               {w: {"op": "start", "round": 1, "hash": "g", "wait_for": 1} for w in (0, 1)})
    t.join(10)
    assert nxt[0]["members"] == [0, 1] and nxt[0]["healing"] == [2]
    assert holder["r"] == {"heal": True, "round": 1, "src": 0, "members": [0, 1, 2]}
