"""Domain errors and their one mapping to gRPC status codes.

Handlers raise these; the error interceptor turns them into a status with a clear message and,
where a client can act on it, rich details (``google.rpc.BadRequest`` naming the field,
``RetryInfo``, ``ErrorInfo``). Anything else becomes INTERNAL without leaking internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2
from google.rpc.status_pb2 import Status

DOMAIN = "fittracker.app"


class DomainError(Exception):
    """An expected failure with the status code a client should see."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "UNKNOWN"

    def __init__(self, message: str) -> None:
        """Keep ``message``: it is sent to the client as the status message."""
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        """Rich error details for ``grpc-status-details-bin``; an ErrorInfo by default."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> Status:
        """The full google.rpc.Status this error is sent as."""
        numeric_code: int = self.code.value[0]
        return Status(code=numeric_code, message=self.message, details=self.details())


class InvalidArgument(DomainError):
    """A request field breaks its rules. Sent with a BadRequest naming each field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        """``violations`` are (field path, what is wrong) pairs; the first one leads the message."""
        self.violations = list(violations)
        first_field, first_problem = self.violations[0]
        extra = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        super().__init__(f"invalid {first_field}: {first_problem}{extra}")

    @classmethod
    def field(cls, field: str, problem: str) -> InvalidArgument:
        """One invalid field."""
        return cls([(field, problem)])

    def details(self) -> list[any_pb2.Any]:
        """A BadRequest listing every field violation, then the ErrorInfo."""
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [packed, *super().details()]


class NotFound(DomainError):
    """The resource does not exist, or the caller may not know that it does."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    """A resource with the same unique key exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    """The resource is not in a state that allows the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    """A concurrent change won (stale etag); re-read and retry."""

    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class Unauthenticated(DomainError):
    """No valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """Valid credentials that do not allow this operation."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class ResourceExhausted(DomainError):
    """A rate limit was hit. Sent with RetryInfo telling when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        """``retry_after_seconds`` becomes the RetryInfo delay."""
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        """RetryInfo, then the ErrorInfo."""
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=self.retry_after_seconds))
        packed = any_pb2.Any()
        packed.Pack(retry)
        return [packed, *super().details()]


class Unavailable(DomainError):
    """A dependency is down; the call may succeed if retried."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(DomainError):
    """The caller's deadline passed before the work could be done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"
