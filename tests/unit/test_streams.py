"""islands' framed streams in one process (two listeners on loopback): messages matched to
their receives by sender and tag in order, a message longer than its receive refused naming
its sender, a connection whose hello is not signed by the member it names shut unread, and
pending transfers failed when the epoch closes."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from islands.core.errors import CommError, PeerRefused
from islands.core.signing import Signer
from islands.transports.streams import Epoch, Listener

SIGNERS = {0: Signer(), 1: Signer()}
KEYS = {w: s.public for w, s in SIGNERS.items()}


@pytest.fixture
def pair():
    """Workers 0 and 1, each with its listener and the epoch ``e/`` open."""
    ls = {w: Listener("127.0.0.1", SIGNERS[w]) for w in (0, 1)}
    es = {w: Epoch(ls[w], "e/", w, {1 - w: f"127.0.0.1:{ls[1 - w].port}"}, KEYS, 5.0)
          for w in (0, 1)}
    yield es
    for w in (0, 1):
        es[w].close()
        ls[w].close()


def _settled(work) -> None:
    """``work.wait()``, once it has finished (a transfer left pending fails the test, it
    does not hang it)."""
    assert work._done.wait(10), "a transfer never finished"
    work.wait()


def _bytes(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def test_messages_reach_the_receives_posted_for_their_tag_in_order(pair):
    got = [torch.zeros(4, dtype=torch.uint8) for _ in range(3)]
    # the receives of tag 1 posted first; the sender's tag-0 message waits for its own
    works = pair[1].post([], [(got[1], 0), (got[2], 0)], 1)
    works += pair[0].post([(_bytes(1, 2), 1)], [], 0)
    works += pair[0].post([(_bytes(3, 4, 5), 1), (_bytes(6), 1)], [], 1)
    works += pair[1].post([], [(got[0], 0)], 0)
    for w in works:
        _settled(w)
    assert [g.tolist() for g in got] == [[1, 2, 0, 0], [3, 4, 5, 0], [6, 0, 0, 0]]


def test_a_message_longer_than_its_receive_is_refused_naming_the_sender(pair):
    small, later = torch.zeros(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)
    works = pair[1].post([], [(small, 0), (later, 0)], 0)
    pair[0].post([(torch.ones(8, dtype=torch.uint8), 1)], [], 0)
    with pytest.raises(PeerRefused, match="worker 0 sent a message of 8 bytes where 4"):
        _settled(works[0])
    with pytest.raises(PeerRefused) as e:  # nothing more is taken from it in this epoch
        _settled(works[1])
    assert e.value.sender == 0
    with pytest.raises(PeerRefused):
        _settled(pair[1].post([], [(later, 0)], 0)[0])


def test_a_connection_not_signed_by_the_member_it_names_is_shut_unread(pair):
    listener = pair[1].listener
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as s:
        forged = SIGNERS[1].sign(b"islands streams e/ 0>1").hex()  # worker 1's key, not 0's
        s.sendall(json.dumps({"epoch": "e/", "from": 0, "sig": forged}).encode() + b"\n")
        s.settimeout(5)
        assert s.recv(16) == b""  # closed
    got = torch.zeros(2, dtype=torch.uint8)
    works = pair[1].post([], [(got, 0)], 0) + pair[0].post([(_bytes(7, 8), 1)], [], 0)
    for w in works:  # the real worker 0 still gets through
        _settled(w)
    assert got.tolist() == [7, 8]


def test_closing_the_epoch_fails_what_is_still_pending(pair):
    work = pair[1].post([], [(torch.zeros(4, dtype=torch.uint8), 0)], 0)[0]
    pair[1].close()
    with pytest.raises(CommError, match="closed"):
        _settled(work)


def test_a_stream_that_ends_mid_message_fails_the_receive_in_progress(pair):
    """The sender's connection goes after half a message: the receive it was filling fails
    (no waiter is left hanging on it), and so does every later one from that peer."""
    got, later = torch.zeros(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    works = pair[1].post([], [(got, 0), (later, 0)], 0)
    sender = pair[0].senders[1]
    _settled(pair[0].post([(_bytes(1), 1)], [], 0)[0])  # connected; the first receive filled
    sender.sock.sendall(b"\x00\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    sender.sock.close()
    _settled(works[0])
    with pytest.raises(CommError, match="ended"):
        _settled(works[1])
    with pytest.raises(CommError):
        _settled(pair[1].post([], [(later, 0)], 0)[0])
