"""What a collective checks in every payload another worker sent, before using it.

A payload must hold the shard's number of float values, have the wire size its codec gives
(when the codec knows it), decode, and decode to finite values. Otherwise
:class:`~islands.core.errors.PeerRefused` (a ``CommError``) names the sender, in either
transport, and the round aborts instead of crashing an honest worker.
"""

from __future__ import annotations

import torch

from islands.codecs.base import Codec, Encoded, all_finite
from islands.core.errors import PeerRefused
from islands.transports.base import Exchange, Message

_DECODE_ERRORS = (RuntimeError, ValueError, KeyError, IndexError, TypeError)


def received(pending: Exchange, key: tuple[int, int], what: str) -> Message:
    """The message ``key = (sender, receiver)`` of an exchange; a sender that sent nothing
    where a payload was due is refused by name."""
    msg = pending.messages.get(key)
    if msg is None:
        raise PeerRefused(f"{what}: no payload from worker {key[0]}; refused", key[0])
    return msg


def check_payload(codec: Codec, payload: Encoded, n: int, offset: int, sender: int,
                  what: str) -> None:
    """Refuses a payload whose numel, dtype or wire size do not fit a shard of ``n`` values
    at ``offset`` (from the header alone: nothing needs to have arrived)."""
    if payload.numel != n or not payload.dtype.is_floating_point:
        raise PeerRefused(f"{what}: payload from worker {sender} holds {payload.numel} values "
                          f"of {payload.dtype}, expected {n} floats; refused", sender)
    want = codec.wire_bytes(n, offset)
    if want is not None and payload.nbytes != want:
        raise PeerRefused(f"{what}: payload from worker {sender} is {payload.nbytes} bytes, "
                          f"its codec sends {want} for {n} values; refused", sender)


def _undecodable(e: Exception, sender: int, what: str) -> PeerRefused:
    return PeerRefused(f"{what}: payload from worker {sender} does not decode "
                       f"({type(e).__name__}: {str(e).splitlines()[0]}); refused", sender)


def decode_checked(codec: Codec, payload: Encoded, out: torch.Tensor, offset: int,
                   sender: int, what: str) -> None:
    """Decodes ``payload`` into ``out`` after :func:`check_payload`."""
    check_payload(codec, payload, out.numel(), offset, sender, what)
    try:
        codec.decode_into(payload, out)
    except _DECODE_ERRORS as e:
        raise _undecodable(e, sender, what) from None


def view_checked(codec: Codec, payload: Encoded, n: int, offset: int, sender: int,
                 what: str) -> torch.Tensor | None:
    """After :func:`check_payload`, the payload's decoded values without a copy (lossless
    codecs: :meth:`~islands.codecs.base.Codec.decoded_view`), or None when the codec must
    decode. The values themselves may still be on the wire."""
    check_payload(codec, payload, n, offset, sender, what)
    try:
        return codec.decoded_view(payload)
    except _DECODE_ERRORS as e:
        raise _undecodable(e, sender, what) from None


def refuse_non_finite(rows: list[torch.Tensor], senders: tuple[int, ...], what: str) -> None:
    """Raises naming the first sender (in member order) whose row holds NaN/Inf, if any."""
    for i, row in zip(senders, rows):
        if not all_finite(row):
            raise non_finite(i, what)


def non_finite(sender: int, what: str) -> PeerRefused:
    return PeerRefused(f"{what}: payload from worker {sender} decodes to NaN/Inf; refused",
                       sender)
