"""Errors: one exception per gRPC code a caller handles differently, each carrying the code and
the field the server named.

The server names the field twice: in a `google.rpc.BadRequest` detail in the
`grpc-status-details-bin` trailer (read first), and at the start of the message
(`task_type: must not be empty`, the fallback).
"""

from __future__ import annotations

from typing import Any, Optional

import grpc

STATUS_DETAILS_KEY = "grpc-status-details-bin"
#: The trailer a node sets when it refused a call before doing anything (a rate limit, a busy
#: node): how many milliseconds to wait before calling again.
PUSHBACK_KEY = "grpc-retry-pushback-ms"


class MaosError(Exception):
    """A refused or failed call. `code` is the gRPC status code (None for client-side errors),
    `field` the request field the server named (None when it named none), `pushback_s` how long
    the server asked the caller to wait before calling again (None when it did not)."""

    def __init__(
        self,
        message: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        field: Optional[str] = None,
        endpoint: Optional[str] = None,
        pushback_s: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field
        self.endpoint = endpoint
        self.pushback_s = pushback_s

    def __str__(self) -> str:
        code = f"{self.code.name}: " if self.code is not None else ""
        where = f" (at {self.endpoint})" if self.endpoint else ""
        return f"{code}{self.message}{where}"


class InvalidArgument(MaosError):
    """Bad input: fix the named field."""


class NotFound(MaosError):
    """Unknown task, agent, node or worker id."""


class FailedPrecondition(MaosError):
    """The call does not fit the current state (for a worker: a stale fencing token)."""


class LeaseLost(FailedPrecondition):
    """A worker's lease on the task is gone: its reports are refused and its work is someone else's."""


class ResourceExhausted(MaosError):
    """Backpressure (a full queue, too many streams, a batch too large): retry later or split."""


class Unavailable(MaosError):
    """No endpoint could serve the call within its deadline."""


class DeadlineExceeded(Unavailable):
    """The call's deadline passed; a submit is safe to repeat with the same idempotency key."""


class PermissionDenied(MaosError):
    pass


class Unauthenticated(MaosError):
    pass


class TaskFailed(Exception):
    """Raised by a worker's agent function to fail its attempt; `retryable=False` fails the task
    for good instead of letting it run again."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


_BY_CODE: dict[grpc.StatusCode, type[MaosError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}

_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def code_from_number(number: int) -> Optional[grpc.StatusCode]:
    """The status code with this wire number (as in `BatchSubmitItem.code`)."""
    return _CODE_BY_NUMBER.get(number)


def field_from_details(trailers: Any) -> Optional[str]:
    """The first field violation of a `google.rpc.BadRequest` in the status details trailer."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in trailers or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, (bytes, bytearray)):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(bytes(value))
        except Exception:  # a malformed trailer: fall back to the message
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                for violation in bad_request.field_violations:
                    if violation.field:
                        return str(violation.field)
    return None


def pushback_from(trailers: Any) -> Optional[float]:
    """The wait in `grpc-retry-pushback-ms`, in seconds, if the trailers carry one."""
    for key, value in trailers or ():
        if key == PUSHBACK_KEY:
            try:
                return max(int(value), 0) / 1000
            except (TypeError, ValueError):
                return None
    return None


def field_from_message(message: str) -> Optional[str]:
    """`"task_type: must not be empty"` → `"task_type"`."""
    head, sep, _ = message.partition(": ")
    if sep and head and " " not in head:
        return head
    return None


def error_for(code: Optional[grpc.StatusCode], message: str, field: Optional[str] = None,
              endpoint: Optional[str] = None) -> MaosError:
    """The typed error for a code and message; the field from the message unless given."""
    kind = _BY_CODE.get(code, MaosError) if code is not None else MaosError
    if field is None and code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        field = field_from_message(message)
    return kind(message, code=code, field=field, endpoint=endpoint)


def from_rpc_error(error: grpc.RpcError, endpoint: Optional[str] = None) -> MaosError:
    """The typed error for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code: Optional[grpc.StatusCode] = error.code() if hasattr(error, "code") else None
    message = str(error.details() if hasattr(error, "details") else error) or ""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    field = field_from_details(trailers)
    error_ = error_for(code, message, field, endpoint)
    error_.pushback_s = pushback_from(trailers)
    return error_
