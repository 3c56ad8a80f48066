"""A member forming an epoch gives up at once when asked to stop, also while it waits for a
peer that formed the process group and then left before publishing its stream address (the
wait would otherwise last the store's whole timeout)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from islands.core.errors import Stopping
from islands.core.signing import Signer
from islands.runtime.auth import derive
from islands.runtime.member import Member
from islands.transports.dist import DistTransport, new_group, open_store
from islands.transports.streams import Listener


def test_a_sigterm_while_waiting_for_a_gone_peers_stream_address_stops_the_member():
    token, res = b"t", {"epoch": 1, "prefix": "e1", "members": [0, 1]}
    prefix = f"e1/{derive(token, 'e1')}/"
    store = open_store("127.0.0.1", 0, is_master=True, timeout_s=60)
    signer = Signer()
    transport = DistTransport(0, timeout_s=10, signer=signer,
                              streams=Listener("127.0.0.1", signer))
    member = SimpleNamespace(
        epoch=None, _prefix=None, me=0, store=store, token=token, membership=None,
        engine=SimpleNamespace(in_flight=False), transport=transport,
        cfg=SimpleNamespace(runtime=SimpleNamespace(collective_timeout_s=60)),
        stopping=threading.Event())
    member._form = lambda make: Member._form(member, make)

    kept = []  # the peer's group lives to the end: dropped early, it closes its sockets
    # while worker 0 may still be connecting, and worker 0 fails to form instead of waiting

    def peer() -> None:  # forms the group, then leaves without publishing its address
        own = open_store("127.0.0.1", store.port, is_master=False, timeout_s=60)
        kept.append(new_group(own, prefix, 1, 2, 60))
        own.wait([f"{prefix}streams/0"])  # worker 0 is now waiting for worker 1's
        member.stopping.set()  # SIGTERM

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    with pytest.raises(Stopping):
        Member._join_epoch(member, res)
    t.join(5)
    assert not t.is_alive()
    assert member.epoch is None  # the epoch was not joined
    transport.streams.close()
