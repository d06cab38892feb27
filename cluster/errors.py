"""Every error replkv raises, as one tree.

Errors that cross the wire carry a ``code``; :func:`error_for_code` turns a code received
from a server back into the matching class, so clients can catch by class and check
``retriable`` before retrying.
"""

from __future__ import annotations


class ReplError(Exception):
    """Base of every replkv error.

    An error of a write (``set``/``delete``) says what became of it in ``applied``:
    ``"no"`` (it took no effect: safe to retry), ``"yes"``, or ``"unknown"`` (it may
    still take effect: read before retrying); ``index`` and ``epoch`` say where its entry is
    in the log when it got one. All three are None for reads and other requests."""

    code = "error"
    retriable = False
    applied: str | None = None
    index: int | None = None
    epoch: int | None = None

    def outcome(self) -> str:
        """The write's outcome as words for a message, ``""`` when there is none."""
        if self.applied is None:
            return ""
        where = "" if self.index is None else f", index {self.index}"
        return f"(applied: {self.applied}{where})"


class ConfigError(ReplError):
    code = "config"


# --- protocol: the bytes on the wire are wrong ---------------------------------------------


class ProtocolError(ReplError):
    """A frame or message that does not follow docs/PROTOCOL.md."""

    code = "protocol"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow here."""


class ForeignPeer(RemoteProtocolError):
    """The peer answered with bytes that are not replkv at all: it is another program (so
    a write sent to it was not applied anywhere)."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow (a bug here)."""


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class BadFrame(ProtocolError):
    """The frame's payload is not one msgpack map."""

    code = "bad_frame"


class BadRequest(ProtocolError):
    """A well-formed map with a missing field or a field of the wrong type or size."""

    code = "bad_request"


class UnknownOp(ProtocolError):
    code = "unknown_op"


class TooLarge(BadRequest):
    """A key or value over the configured limit."""

    code = "too_large"


# --- the request was understood but cannot be served here and now ---------------------------


class RequestFailed(ReplError):
    """The server understood the request and refused it."""


class NotMaster(RequestFailed):
    code = "not_master"
    retriable = True

    def __init__(self, message: str, master: str | None = None) -> None:
        super().__init__(message)
        self.master = master  # the node this one believes is master, when it knows


class Unavailable(RequestFailed):
    """No node that could serve the request is reachable."""

    code = "unavailable"
    retriable = True


class NoQuorum(RequestFailed):
    """The master is not in contact with enough nodes for the acknowledgement level asked
    (a majority for ``acks=majority``, N slaves for ``acks=N``, every node for
    ``acks=all``), or it lost that contact while the write waited."""

    code = "no_quorum"
    retriable = True


class Behind(RequestFailed):
    """The node has not yet applied the index the read asked for."""

    code = "behind"
    retriable = True


class WriteLost(RequestFailed):
    """A read token names a write that is not in the master's history: it was lost (the
    master lost its unsynced tail, or a slave's copy was cut). Retrying cannot help."""

    code = "write_lost"


class StaleEpoch(RequestFailed):
    """A message from an epoch older than the receiver's: a deposed master."""

    code = "stale_epoch"
    retriable = True


class StorageFailure(RequestFailed):
    """The write could not be made durable (a full disk, say); nothing was applied."""

    code = "storage"


class RequestTimeout(RequestFailed):
    """No answer in time: a write's acknowledgement level was not met within its
    ``timeout_ms`` (the master), or a node did not answer within the deadline (the router,
    the client). A write that timed out may still take effect (``applied: unknown``)."""

    code = "timeout"
    retriable = True


class ShuttingDown(RequestFailed):
    code = "shutting_down"
    retriable = True


class InternalError(RequestFailed):
    code = "internal"


# --- network and storage on this side ----------------------------------------------------------


class NetworkError(ReplError):
    """The connection failed or closed before the reply arrived."""

    code = "network"
    retriable = True


class ClusterError(ReplError):
    """A local cluster (``replctl cluster up``) could not start or manage a process."""

    code = "cluster"


class CorruptLog(ReplError):
    """A damaged record in the middle of the write-ahead log or a damaged snapshot."""

    code = "corrupt_log"


_BY_CODE: dict[str, type[ReplError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        FrameTooLarge,
        BadFrame,
        BadRequest,
        UnknownOp,
        TooLarge,
        NotMaster,
        Unavailable,
        NoQuorum,
        Behind,
        WriteLost,
        StaleEpoch,
        StorageFailure,
        RequestTimeout,
        ShuttingDown,
        InternalError,
    )
}

WIRE_ERROR_CODES: tuple[str, ...] = tuple(_BY_CODE)


def error_for_code(code: str, message: str, *, master: str | None = None,
                   applied: str | None = None, index: int | None = None,
                   epoch: int | None = None) -> ReplError:
    """The exception for an error reply received from a server; its message ends with the
    write's outcome when the reply gave one."""
    cls = _BY_CODE.get(code, RequestFailed)
    err = NotMaster(f"{code}: {message}", master) if cls is NotMaster \
        else cls(f"{code}: {message}")
    if cls is RequestFailed:
        err.code = code
    return with_outcome(err, applied, index, epoch)


def with_outcome(err: ReplError, applied: str | None, index: int | None = None,
                 epoch: int | None = None) -> ReplError:
    """``err`` (a write's error) with its outcome set, and said at the end of its message."""
    text, said = str(err), err.outcome()
    if said and text.endswith(" " + said):
        text = text.removesuffix(" " + said)
    err.applied, err.index, err.epoch = applied, index, epoch
    err.args = (f"{text} {err.outcome()}" if applied is not None else text,)
    return err


def reason(exc: BaseException) -> str:
    """``exc`` as the reason in a log line or a message: its text, or its class name when
    it has none (``TimeoutError()`` and some msgpack errors carry no text)."""
    return str(exc) or type(exc).__name__
