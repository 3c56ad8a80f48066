"""The coordinator's order of an asynchronous job's updates (:mod:`islands.runtime.posts`):
numbering, staleness, the budget, regroupings; and the ``post``/``posts_end`` requests."""

from __future__ import annotations

import threading

from rich.console import Console

from islands.runtime.coordinator import Coordinator
from islands.runtime.posts import PostOrder
from islands.runtime.watch import render
from tests.unit.test_dist_coordinator import _ask, _worker

FP = {"workers": 2, "steps": 10, "algorithm.name": "async_local_sgd",
      "algorithm.sync_every": 4, "algorithm.dynamic_steps": False,
      "algorithm.max_staleness": 1}


def test_updates_are_numbered_in_order_and_a_too_stale_one_is_dropped():
    order = PostOrder(FP)
    assert order.regroup([0, 1], 0) == {0: 4, 1: 4} and order.left == 12
    assert order.post(0, 4, pulled=0, rate=1.0, members=(0, 1)) == {
        "seq": 0, "stale": 0, "kept": True, "next": 4}
    assert order.post(0, 4, pulled=1, rate=1.0, members=(0, 1))["seq"] == 1
    # worker 1 pulled before both: 2 updates overtook it, past max_staleness = 1
    out = order.post(1, 4, pulled=0, rate=1.0, members=(0, 1))
    assert out == {"seq": None, "stale": 2, "kept": False, "next": 4}
    assert order.posters == [0, 0] and order.left == 0 and not order.done
    assert order.post(1, 4, pulled=2, rate=1.0, members=(0, 1))["seq"] == 2
    assert order.post(0, 4, pulled=2, rate=1.0, members=(0, 1))["stale"] == 1
    assert order.done and order.posters == [0, 0, 1, 0]
    assert sum(p["steps"] for p in order.log) == 2 * 10  # the budget, spent exactly once
    assert "handed to it" in order.post(0, 3, pulled=0, rate=1.0, members=(0, 1))["error"]


def test_dynamic_steps_follow_the_reported_speeds():
    order = PostOrder({**FP, "algorithm.dynamic_steps": True, "steps": 100})
    order.regroup([0, 1], 0)
    order.post(0, 4, pulled=0, rate=10.0, members=(0, 1))
    assert order.planned[0] == 4  # worker 1's speed not known yet: H
    assert order.post(1, 4, pulled=0, rate=5.0, members=(0, 1))["next"] == 2  # half as fast
    assert order.post(0, 4, pulled=2, rate=10.0, members=(0, 1))["next"] == 4


def test_a_regrouping_voids_the_updates_past_the_replica_kept_and_hands_out_their_steps():
    order = PostOrder(FP)
    order.regroup([0, 1], 0)
    order.post(0, 4, pulled=0, rate=1.0, members=(0, 1))
    order.post(1, 4, pulled=0, rate=1.0, members=(0, 1))
    assert order.posters == [0, 1] and order.left == 4
    # the members go on from a replica holding update 0 only: update 1 is void
    grants = order.regroup([0], 1)
    assert order.posters == [0] and [p["seq"] for p in order.log] == [0]
    assert grants == {0: 4} and order.left == 20 - 4 - 4


def test_a_coordinator_started_anew_numbers_on_from_the_replica_and_keeps_the_budget():
    """The members held 5 updates (40 inner steps) when their coordinator died: the new one
    numbers the next update 5 and hands out only what is left of the budget."""
    order = PostOrder(FP)
    assert order.regroup([0, 1], 5, spent=12) == {0: 4, 1: 4}
    assert len(order.posters) == 5 and order.spent == 12 and order.left == 20 - 12 - 8
    out = order.post(0, 4, pulled=5, rate=1.0, members=(0, 1))
    assert out["seq"] == 5 and out["stale"] == 0 and order.spent == 16


def _async_coordinator() -> Coordinator:
    return Coordinator("127.0.0.1", 0, token=b"tok", heartbeat_timeout_s=5.0,
                       handshake_timeout_s=0.5, fingerprint=dict(FP)).start()


def test_posts_over_the_control_channel_and_a_joiner_makes_the_members_regroup():
    coord = _async_coordinator()
    try:
        chs = {w: _worker(coord, w, fp=FP) for w in range(2)}
        out = _ask(chs, {w: {"op": "start", "round": 0, "hash": "h", "wait_for": 2}
                         for w in chs})
        assert out[0]["grants"] == {"0": 4, "1": 4}
        first = _ask({0: chs[0]}, {0: {"op": "post", "steps": 4, "pulled": 0, "applied": 0,
                                       "rate": 2.0}})[0]
        assert first["seq"] == 0 and first["posters"] == [] and first["spent"] == 4
        second = _ask({1: chs[1]}, {1: {"op": "post", "steps": 4, "pulled": 0, "applied": 0,
                                        "rate": 2.0}})[1]
        assert second["seq"] == 1 and second["posters"] == [0]  # worker 0's comes first
        st = coord.status()  # islands status: the updates, no round in flight
        assert st["round_in_flight"] is None and st["async"] == {
            "updates": 2, "dropped": 0, "steps_left": 4, "in_progress": {"0": 4, "1": 4}}
        console = Console(width=200, record=True)
        console.print(render(st, 5.0))
        assert "2 numbered, 0 dropped as too stale; 4 inner steps to hand out; computing " \
               "0: 4, 1: 4" in console.export_text()
        bad = _ask({0: chs[0]}, {0: {"op": "post", "steps": -1, "pulled": 0, "applied": 0,
                                     "rate": 1.0}})[0]
        assert "integers >= 0" in bad["error"]
        # a joiner at start: the members' next request answers "regroup"
        chs[2] = _worker(coord, 2, fp=FP)
        joiner: dict = {}
        t = threading.Thread(target=lambda: joiner.update(_ask(
            {2: chs[2]}, {2: {"op": "start", "round": 0, "hash": "h", "wait_for": 1}})))
        t.start()
        wait = _ask({0: chs[0]}, {0: {"op": "posts_end", "applied": 2}})[0]
        assert wait == {"regroup": True}
        again = _ask({1: chs[1]}, {1: {"op": "post", "steps": 4, "pulled": 2, "applied": 2,
                                       "rate": 2.0}})[1]
        assert again == {"regroup": True}
        # everyone at start: the members go on from the replica with 2 updates
        out = _ask({0: chs[0], 1: chs[1]}, {w: {"op": "start", "round": 2, "hash": "x",
                                                 "wait_for": 1} for w in (0, 1)})
        t.join(10)
        assert out[0]["members"] == [0, 1, 2] and out[0]["need_state"] == [2]
        assert joiner[2]["grants"] == out[0]["grants"] and set(out[0]["grants"]) == {
            "0", "1", "2"}
    finally:
        coord.stop()


def test_a_worker_keeps_a_bounded_number_of_sends_in_flight(monkeypatch):
    """Done sends are dropped; beyond the bound the oldest are waited for (gloo's, which
    cannot be polled, hold their tensors until then)."""
    from types import SimpleNamespace

    from islands.runtime import asynchronous
    from islands.transports.dist import DistTransport
    from islands.transports.streams import Work

    monkeypatch.setattr(asynchronous, "MAX_SENDS_IN_FLIGHT", 4)
    waited: list = []
    done, pending = Work(), [object() for _ in range(5)]
    done.finish()
    transport = SimpleNamespace(unfinished=DistTransport.unfinished,
                                wait_sends=lambda works, phase: waited.append(works),
                                send_post=lambda msg, to, phase: ["new"])
    me = SimpleNamespace(transport=transport, _sends=[done, *pending])
    asynchronous.AsyncMember._send(me, None, (1,), "post/7")
    assert waited == [pending[:1]] and me._sends == [*pending[1:], "new"]
    asynchronous.AsyncMember._send(me, None, (), "post/8")  # no peer: nothing sent
    assert me._sends == [*pending[1:], "new"]


def test_an_asynchronous_worker_without_a_coordinator_is_refused():
    """torchrun alone (a fixed group) has nobody to number the updates."""
    import pytest

    from islands.core.config import load_config
    from islands.core.errors import ConfigError
    from islands.runtime.asynchronous import AsyncMember
    from islands.runtime.membership import FixedMembership

    cfg = load_config(None, ["algorithm.name=async_local_sgd"])
    with pytest.raises(ConfigError, match="needs a coordinator, which numbers the updates"):
        AsyncMember(cfg, 0, FixedMembership(2), None, None, None, None, None,
                    background=False)
