"""The real transport's wire format: one header, then each payload tensor's raw bytes.

A message from one worker to another travels as

* a **header**: ``u32 length | JSON`` with the collective's fields (weight, header bytes), the
  payload's (numel, dtype, the codec's header bytes and meta) and, per payload tensor in name
  order, its name, dtype and shape; ``null`` when the sender has nothing for this receiver.
  The receiver takes it into a buffer of :data:`MAX_HEADER_BYTES` (gloo accepts a message
  shorter than the buffer posted for it), so no round trip announces its size;
* then each non-empty tensor's bytes, sent from the tensor's own memory (nothing is copied
  into a packed buffer) and received into memory the caller may choose (``place``), such as
  the slice of a result where the decoded values belong.

Bytes on the wire per message: ``4 + len(JSON) + Σ tensor bytes``. The accounting shared with
the simulator counts ``Message.nbytes = Σ tensor bytes + codec header bytes + the collective's
16-byte header``; the difference, ``4 + len(JSON) − 16 − codec header bytes``, is the
serialization overhead, counted in ``wire_bytes_sent``: at most
:data:`MAX_HEADER_OVERHEAD_BYTES` per message for the built-in codecs but PowerSGD, whose meta
lists the matrices of its plan (a JSON header of 100 to 200 bytes).

Everything a peer sends is checked before use: the header's fields and sizes here (refused
with :class:`~islands.core.errors.PeerRefused` naming the peer), and floating values finite
(:func:`check_finite`, unless the caller checks the decoded values itself, as the butterfly
does).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from islands.codecs.base import PAYLOAD_DTYPES, Encoded, all_finite
from islands.core import memory, signing
from islands.core.errors import CommError, PeerGaveUp, PeerRefused
from islands.transports.base import Message, Sources

MAX_HEADER_BYTES = 1 << 20  # received into a buffer this large; only the pages used are touched
MAX_MESSAGE_BYTES = 1 << 33  # 8 GiB: a payload above this from a peer is malformed
# Bytes per send/recv of a tensor's bytes: a receiver works on a chunk while the next ones
# arrive, and an exchange that makes progress is never cut by the per-wait timeout.
CHUNK_BYTES = 4 << 20
# Bytes on the wire beyond Message.nbytes, per message, for every built-in codec but PowerSGD
# (a test checks it over gloo).
MAX_HEADER_OVERHEAD_BYTES = 256

# (name, dtype, shape) -> where to receive that tensor of one message (None: a fresh tensor)
TensorPlace = Callable[[str, torch.dtype, tuple[int, ...]], "torch.Tensor | None"]


@dataclass
class Header:
    """A received header, validated: everything but the tensors' bytes."""

    weight: float
    header_bytes: int
    numel: int
    dtype: torch.dtype
    codec_header_bytes: int
    meta: dict
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]
    proof: dict | None = None  # a signed header: {"h": the signed JSON, "s": its signature}
    claim: bool = False  # the weight is the sender's claim for its own contribution
    relay: bool = False  # the sender can relay its all-gather shard (Message.relay)


def pack_header(msg: Message | None, signer: signing.Signer | None = None,
                ctx: str = "", roots: dict | None = None) -> torch.Tensor:
    """``u32 length | JSON`` as a uint8 tensor (``null`` for no message).

    With ``signer`` (an open job), a message's header also names its context ``ctx`` (round,
    attempt, phase, sender and receiver: a signed header cannot be replayed elsewhere) and
    each tensor's Merkle root, and travels as ``{"h": header JSON, "s": signature}``: the
    receiver checks it against the sender's registered key, and can later show a third party
    what the sender said, and any 16 KiB of its payload (:mod:`islands.core.signing`).
    ``roots`` caches the roots of the tensors of one exchange (a shard's aggregate goes to
    every member: hashed once)."""
    if msg is None:
        head = b"null"
    else:
        p = msg.payload
        fields = {"w": msg.weight, "hb": msg.header_bytes, "n": p.numel, "dt": str(p.dtype),
                  "eh": p.header_bytes, "meta": p.meta,
                  "t": [[k, str(p.tensors[k].dtype), list(p.tensors[k].shape)]
                        for k in sorted(p.tensors)]}
        if msg.claim:
            fields["c"] = 1
        if msg.relay:
            fields["r"] = 1
        if signer is not None:
            roots = {} if roots is None else roots
            fields["ctx"] = ctx
            fields["mr"] = [_root(p.tensors[k], roots) for k in sorted(p.tensors)]
            if msg.sources is not None:
                fields["in"] = _sources(msg.sources, roots)
        try:
            head = json.dumps(fields, separators=(",", ":")).encode()
        except TypeError as e:
            raise CommError(f"codec meta {p.meta!r} is not JSON-serializable: {e}") from None
        if signer is not None:
            head = json.dumps({"h": head.decode(), "s": signer.sign(head).hex()},
                              separators=(",", ":")).encode()
    if 4 + len(head) > MAX_HEADER_BYTES:
        raise CommError(f"a message header of {len(head)} bytes exceeds the wire's "
                        f"{MAX_HEADER_BYTES - 4} (codec meta too large)")
    return _framed(head)


def _sources(src: Sources, roots: dict) -> dict:
    """An aggregate's inputs as its signed header names them: the members, the weights the
    rule was given, and the Merkle roots of each input's bytes as the owner holds them
    (hashed here, never copied from the sender's header: a sender whose signed roots do
    not match its bytes must not make the owner vouch for bytes it never aggregated)."""
    return {"m": list(src.members), "w": None if src.weights is None else list(src.weights),
            "mr": [[_root(m.payload.tensors[k], roots) for k in sorted(m.payload.tensors)]
                   for m in src.messages]}


def _root(t: torch.Tensor, roots: dict) -> str:
    key = (t.data_ptr(), t.numel(), t.dtype, t.device)
    if key not in roots:
        roots[key] = signing.merkle_root(as_bytes(t).numpy())
    return roots[key]


def pack_void(reason: str) -> torch.Tensor:
    """A header that says: no message follows, this worker gave up the exchange (why)."""
    return _framed(json.dumps({"void": str(reason)[:500]}, separators=(",", ":")).encode())


def _framed(head: bytes) -> torch.Tensor:
    """``head`` after its length (4 bytes, little-endian), as the uint8 tensor gloo sends."""
    return torch.frombuffer(bytearray(struct.pack("<I", len(head)) + head), dtype=torch.uint8)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def header_length(buf: torch.Tensor) -> int:
    """Bytes of the header at the start of ``buf`` (length prefix included)."""
    return 4 + struct.unpack("<I", buf[:4].numpy().tobytes())[0]


def unpack_header(buf: torch.Tensor, peer: int, key: str | None = None,
                  ctx: str = "") -> Header | None:
    """Parses and validates a header received from ``peer`` (None: no message).

    Args:
        key: ``peer``'s registered public key (an open job): a message's header must be
            signed with it and name ``ctx`` as its context.
    """
    try:
        if buf.numel() < 4:
            raise ValueError(f"{buf.numel()} bytes, shorter than the length prefix")
        (hlen,) = struct.unpack("<I", buf[:4].numpy().tobytes())
        if 4 + hlen > buf.numel():
            raise ValueError(f"a header of {hlen} bytes, longer than the message")
        raw = json.loads(buf[4:4 + hlen].numpy().tobytes())
        if raw is None:
            return None
        if isinstance(raw, dict) and "void" in raw:
            raise PeerGaveUp(f"worker {peer} gave up the exchange: {str(raw['void'])[:500]}",
                             peer)
        proof = None
        if key is not None:
            raw, proof = _signed(raw, peer, key, ctx)
        tensors, names, total = [], set(), 0
        for name, dtype, shape in raw["t"]:
            if not isinstance(name, str) or name in names:
                raise ValueError(f"bad or repeated tensor name {name!r}")
            if not isinstance(shape, list) or any(not isinstance(s, int) or s < 0
                                                  for s in shape):
                raise ValueError(f"bad shape {shape}")
            names.add(name)
            tensors.append((name, PAYLOAD_DTYPES[dtype], tuple(shape)))
            total += _nbytes(*tensors[-1][1:])
        if total > MAX_MESSAGE_BYTES:
            raise ValueError(f"a payload of {total} bytes (at most {MAX_MESSAGE_BYTES})")
        h = Header(float(raw["w"]), int(raw["hb"]), int(raw["n"]), PAYLOAD_DTYPES[raw["dt"]],
                   int(raw["eh"]), dict(raw["meta"]), tensors, proof, raw.get("c") == 1,
                   raw.get("r") == 1)
    except (ValueError, KeyError, TypeError, struct.error, RuntimeError) as e:
        raise PeerRefused(f"malformed message from worker {peer}: {e}", peer) from None
    if h.numel < 0 or h.header_bytes < 0 or h.codec_header_bytes < 0 \
            or not math.isfinite(h.weight):
        raise PeerRefused(f"message from worker {peer}: bad numel, header size or weight; "
                          "refused", peer)
    return h


def signed_header(frame: dict, key: str) -> dict | None:
    """The header inside a signed frame ``{"h": JSON, "s": signature}`` when the signature
    is ``key``'s (None otherwise): what a receiver reads, and what a third party checks in
    evidence (:mod:`islands.runtime.evidence`)."""
    try:
        sig = bytes.fromhex(frame["s"])
        if not signing.check_signature(key, frame["h"].encode(), sig):
            return None
        inner = json.loads(frame["h"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return inner if isinstance(inner, dict) else None


def _signed(raw, peer: int, key: str, ctx: str) -> tuple[dict, dict]:
    """The header inside a signed frame, once its signature and context are checked."""
    if not isinstance(raw, dict) or not isinstance(raw.get("h"), str) \
            or not isinstance(raw.get("s"), str):
        raise ValueError("not signed (this job's members sign every message)")
    inner = signed_header(raw, key)
    if inner is None:
        raise ValueError("a signature that is not its registered key's")
    if inner.get("ctx") != ctx:
        raise ValueError(f"signed for {str(inner.get('ctx'))[:80]!r} "
                         f"(context {ctx!r}): replayed or misdirected")
    if not isinstance(inner.get("mr"), list) or len(inner["mr"]) != len(inner.get("t", ())):
        raise ValueError("no Merkle root per tensor")
    return inner, {"h": raw["h"], "s": raw["s"]}


def receive_buffers(h: Header, place: TensorPlace | None) -> dict[str, torch.Tensor]:
    """Where each tensor of ``h`` is received: what ``place`` offers when it fits exactly
    (dtype, shape, contiguous, on the CPU), else a fresh tensor."""
    out = {}
    for name, dtype, shape in h.tensors:
        t = place(name, dtype, shape) if place is not None else None
        if t is None or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() \
                or t.device.type != "cpu":
            t = memory.empty(shape, dtype)
        out[name] = t
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as flat uint8 (a view; a copy only if not contiguous or not on
    the CPU)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def chunks(nbytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of the chunks a tensor of ``nbytes`` bytes travels in."""
    return [(a, min(nbytes, a + CHUNK_BYTES)) for a in range(0, nbytes, CHUNK_BYTES)]


def message(h: Header, tensors: dict[str, torch.Tensor]) -> Message:
    payload = Encoded(tensors, numel=h.numel, dtype=h.dtype, header_bytes=h.codec_header_bytes,
                      meta=h.meta)
    return Message(payload, h.header_bytes, weight=h.weight, claim=h.claim, proof=h.proof,
                   relay=h.relay)


def check_finite(msg: Message, peer: int) -> None:
    """Refuses a message whose floating tensors hold NaN/Inf, naming ``peer``."""
    for name, t in msg.payload.tensors.items():
        if t.is_floating_point() and not all_finite(t):
            raise PeerRefused(f"message from worker {peer}: tensor {name!r} holds NaN/Inf; "
                              "refused", peer)
