"""The shared state of a run: hashing it, snapshotting it, and streaming it to joiners.

The shared state is ``Algorithm.shared_state(worker)``: the global parameters, the model's
synced buffers (BatchNorm statistics) and the outer optimizer state, what must be identical on
every worker after a committed round. Its hash
(SHA-256 over names, dtypes, shapes and bytes, in name order) is compared across workers every
round. A joiner, a worker left behind, or one whose hash disagrees with the majority receives
it from a live worker over the process group (:func:`transfer`), never through the coordinator;
what arrives is checked against the receiver's own layout (names, shapes, dtypes, finite).
"""

from __future__ import annotations

import hashlib

import torch

from islands.algorithms.base import Algorithm, Worker
from islands.codecs.base import Encoded
from islands.collectives.butterfly import MESSAGE_HEADER_BYTES
from islands.core.errors import CommError
from islands.transports.base import Message, Transport


def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and values, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def snapshot(algorithm: Algorithm, worker: Worker) -> dict[str, torch.Tensor]:
    """A detached copy of the shared state (to restore an aborted round; gossip: the
    worker's own, ``Algorithm.handover``)."""
    return {k: v.detach().clone() for k, v in algorithm.handover(worker).items()}


def load(algorithm: Algorithm, worker: Worker, state: dict[str, torch.Tensor],
         *, reset_params: bool = True) -> None:
    """Installs ``state`` as the worker's shared state (``algorithm.load_shared_state``)."""
    algorithm.load_shared_state(worker, state, reset_params=reset_params)


def check(received: dict[str, torch.Tensor], template: dict[str, torch.Tensor],
          src: int) -> None:
    """Refuses a received state that does not fit this worker's layout."""
    g = received.get("global_params")
    want = template["global_params"]
    if g is None or g.shape != want.shape or g.dtype != want.dtype:
        raise CommError(f"state from worker {src}: global_params "
                        f"{None if g is None else (tuple(g.shape), g.dtype)} does not match "
                        f"{(tuple(want.shape), want.dtype)} (same config on every worker?)")
    for k, v in received.items():
        if k not in ("global_params", "global_buffers") and not k.startswith("outer/"):
            raise CommError(f"state from worker {src}: unexpected entry {k!r}")
        if k in template and (v.shape != template[k].shape or v.dtype != template[k].dtype):
            raise CommError(f"state from worker {src}: {k} has shape {tuple(v.shape)}, "
                            f"expected {tuple(template[k].shape)}")
    if ("global_buffers" in template) != ("global_buffers" in received):
        raise CommError(f"state from worker {src}: global_buffers "
                        f"{'missing' if 'global_buffers' in template else 'unexpected'} "
                        "(same model on every worker?)")


def inner_state(worker: Worker) -> dict[str, torch.Tensor]:
    """The worker's inner optimizer moments as ``inner/<param>/<name>`` tensors (sent to a
    joiner beside the shared state; never part of it or of its hash)."""
    sd = worker.inner.state_dict()["state"]
    return {f"inner/{i}/{k}": v for i, slot in sd.items() for k, v in slot.items()
            if torch.is_tensor(v)}


def adopt_inner(worker: Worker, tensors: dict[str, torch.Tensor]) -> bool:
    """Starts a fresh inner optimizer from a peer's moments (:func:`inner_state`), as torchft
    hands a healing replica its peer's optimizer state: with empty moments Adam's first steps
    are sign-like lr-sized jumps in every coordinate, which DiLoCo's outer momentum carries
    on. Returns whether it adopted them (not when this worker already has moments of its own,
    or the peer's do not fit its optimizer)."""
    if worker.inner.state or not tensors:
        return False
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        _, i, k = name.split("/", 2)
        slots.setdefault(int(i), {})[k] = v.clone()
    groups = worker.inner.state_dict()["param_groups"]
    try:
        worker.inner.load_state_dict({"state": slots, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError):
        return False
    return True


def transfer(transport: Transport, members: tuple[int, ...], src: int, dsts: list[int],
             state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Streams ``state`` from ``src`` to ``dsts`` (every one of them calls this).

    Returns the received state on a destination, None on the source. Bytes are counted like
    every other message (payload plus the collective's header).
    """
    me = transport.local[0]
    outgoing = {}
    if me == src:
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        numel = sum(v.numel() for v in tensors.values())
        payload = Encoded(tensors, numel=numel)
        outgoing = {(src, d): Message(payload, MESSAGE_HEADER_BYTES) for d in dsts}
    incoming = transport.exchange(outgoing, tuple(sorted({src, *dsts})), phase="state-sync")
    if me == src:
        return None
    return {k: v.clone() for k, v in incoming[(src, me)].payload.tensors.items()}


def gather_digests(transport: Transport, members: tuple[int, ...], mine: str) -> dict[int, str]:
    """Every member's state digest (for a fixed group, where no coordinator compares them)."""
    me = transport.local[0]
    raw = torch.frombuffer(bytearray(bytes.fromhex(mine)), dtype=torch.uint8)
    msg = Message(Encoded({"digest": raw}, numel=0, dtype=torch.uint8), 0)
    incoming = transport.exchange({(me, m): msg for m in members}, members, phase="hash")
    return {src: bytes(m.payload.tensors["digest"].tolist()).hex()
            for (src, _), m in incoming.items()}
