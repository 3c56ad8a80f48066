"""The control plane's wire format and its authentication.

Messages are JSON objects, one per line, at most :data:`MAX_LINE_BYTES` bytes until the
handshake has passed (a registered worker's lines may then reach
:data:`MAX_MEMBER_LINE_BYTES`: a commit carrying a verifier's evidence). A connection
opens with a challenge: the coordinator sends ``{"nonce": hex}``, the client answers
``{"mac": HMAC-SHA256(token, nonce), ...}``. A wrong MAC, a line that is not JSON or is too long,
or silence past the handshake timeout closes the connection with one log line; nothing from an
unauthenticated connection reaches the membership.

The token is a shared secret read from a file (``--token-file``). Without one the empty token
is used: the handshake still refuses garbage, but anyone who speaks the protocol can join.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import threading
from pathlib import Path

from islands.core.errors import AuthError, CommError, ConfigError, Stopping

MAX_LINE_BYTES = 1 << 16
# a registered worker's line: a verifier's evidence shows a 16 KiB leaf (about 22 KB of
# base64 and its path) of an aggregate and of every input to it: 4 MiB is 150 members
MAX_MEMBER_LINE_BYTES = 1 << 22


def load_token(path: str | Path | None) -> bytes:
    """Reads the shared secret (surrounding whitespace stripped); None gives the empty token."""
    if path is None:
        return b""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--token-file {str(p)!r} does not exist; create it with e.g. "
                          "`python -c 'import secrets; print(secrets.token_hex(32))' > FILE`")
    token = p.read_bytes().strip()
    if not token:
        raise ConfigError(f"--token-file {str(p)!r} is empty; put a random secret in it")
    return token


def mac(token: bytes, nonce: str) -> str:
    return hmac.new(token, nonce.encode(), hashlib.sha256).hexdigest()


def derive(token: bytes, label: str) -> str:
    """A value only holders of the token can compute (e.g. store key prefixes)."""
    return mac(token, "derive/" + label)[:16]


class Channel:
    """A line-delimited JSON connection with a read timeout.

    Args:
        sock: a connected socket.
        timeout_s: a read waiting longer raises :class:`CommError` (None: wait forever).
    """

    def __init__(self, sock: socket.socket, timeout_s: float | None = 5.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout_s)
        self._buf = b""
        self.max_line_bytes = MAX_LINE_BYTES  # raised once the peer is known

    def send(self, obj: dict) -> None:
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as e:
            raise CommError(f"send failed: {e}") from None

    def recv(self, stop: threading.Event | None = None) -> dict:
        """The next message. With ``stop``, a blocking read wakes every 0.2 s and gives up
        (:class:`Stopping`) once ``stop`` is set."""
        if stop is None:
            return self._recv(None)
        before = self.sock.gettimeout()
        self.sock.settimeout(0.2)
        try:
            return self._recv(stop)
        finally:
            self.sock.settimeout(before)

    def _recv(self, stop: threading.Event | None) -> dict:
        while b"\n" not in self._buf:
            if len(self._buf) > self.max_line_bytes:
                raise CommError(f"line longer than {self.max_line_bytes} bytes")
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                if stop is None:
                    raise CommError("read failed: timed out") from None
                if stop.is_set():
                    raise Stopping("asked to stop while waiting on the coordinator") from None
                continue
            except OSError as e:
                raise CommError(f"read failed: {e}") from None
            if not chunk:
                raise CommError("connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        if len(line) > self.max_line_bytes:
            raise CommError(f"line longer than {self.max_line_bytes} bytes")
        try:
            obj = json.loads(line)
        except ValueError:
            raise CommError(f"malformed line ({len(line)} bytes, not JSON)") from None
        if not isinstance(obj, dict):
            raise CommError("malformed line (not a JSON object)")
        return obj

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def server_handshake(ch: Channel, token: bytes) -> dict:
    """Challenges a new connection; returns the client's hello or raises :class:`AuthError`."""
    nonce = secrets.token_hex(16)
    ch.send({"nonce": nonce})
    hello = ch.recv()
    if not hmac.compare_digest(str(hello.get("mac", "")), mac(token, nonce)):
        raise AuthError("bad token (HMAC mismatch)")
    return hello


def client_connect(addr: str, token: bytes, hello: dict, *, timeout_s: float = 5.0) -> Channel:
    """Connects to ``host:port`` and authenticates with ``hello`` (a dict of facts)."""
    host, _, port = addr.rpartition(":")
    try:
        sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s)
    except (OSError, ValueError) as e:
        raise CommError(f"cannot connect to the coordinator at {addr}: {e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ch = Channel(sock, timeout_s)
    challenge = ch.recv()
    ch.send({**hello, "mac": mac(token, str(challenge.get("nonce", "")))})
    reply = ch.recv()
    if reply.get("error"):
        ch.close()
        raise AuthError(f"coordinator at {addr} refused us: {reply['error']}")
    return ch


def token_from_env() -> str | None:
    """The token file named by ``ISLANDS_TOKEN_FILE`` (for launchers), if any."""
    return os.environ.get("ISLANDS_TOKEN_FILE")
