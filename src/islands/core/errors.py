"""The small exception tree of islands.

Every error a user can cause names what was wrong and how to fix it; internal invariants use
``assert``. A communication failure inside a round raises :class:`RoundAborted` after the round
has been rolled back, never a bare traceback from a thread.
"""


class IslandsError(Exception):
    """Base class of every error raised on purpose by islands."""


class ConfigError(IslandsError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(IslandsError, ValueError):
    """A corpus path is missing, empty or unreadable."""


class StorageError(IslandsError):
    """A file islands writes cannot be written (a full disk, a read-only folder). Names the
    path, the bytes needed and the bytes free; whatever was written before stays valid.

    Args:
        message: what failed and how to fix it.
        path: the file.
        needed: bytes the write needed.
        free: bytes free in its folder (None: unknown).
    """

    def __init__(self, message: str, *, path: str = "", needed: int = 0,
                 free: int | None = None) -> None:
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free


class TaskError(IslandsError, TypeError):
    """A task returned something islands cannot use (a loss that is not a scalar)."""


class CodecError(IslandsError, ValueError):
    """A tensor cannot be encoded (NaN/Inf, wrong dtype) or a payload cannot be decoded."""


class CommError(IslandsError):
    """A transfer between workers failed (peer gone, timeout, malformed payload)."""


class PeerRefused(CommError):
    """A peer's message was refused (malformed, wrong length or dtype, non-finite, not
    decodable). ``sender`` names the peer to blame, so the round can be retried without it.

    Args:
        message: what was wrong.
        sender: the worker whose message it was.
        exhibit: what the refusing worker saw, where a third party could check it (a
            verifier's :class:`~islands.collectives.verify.Mismatch`), for
            :mod:`islands.runtime.evidence`; None otherwise.
    """

    def __init__(self, message: str, sender: int, exhibit: object = None) -> None:
        super().__init__(message)
        self.sender = sender
        self.exhibit = exhibit


class PeerGaveUp(CommError):
    """A peer gave up the exchange before sending (its own contribution could not be
    encoded, or it refused another's): this attempt is void, without blame on ``sender``
    (who reports the culprit itself).

    Args:
        message: what the peer said.
        sender: the worker that gave up.
    """

    def __init__(self, message: str, sender: int) -> None:
        super().__init__(message)
        self.sender = sender


class Stopping(CommError):
    """This worker was asked to stop (SIGTERM) while it waited on a peer or the coordinator."""


class RoundAborted(CommError):
    """A round was aborted and rolled back to the last committed global state."""


class AuthError(CommError):
    """A peer failed authentication."""


class IslandsWarning(UserWarning):
    """Something a user would want to know before trusting a run (it still runs)."""
