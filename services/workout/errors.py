"""The workout service's own failures, built on the runtime's domain errors so they map in one place."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from services.runtime.errors import DomainError, FailedPrecondition


class UnknownExercise(FailedPrecondition):
    """A request names an exercise the catalog does not have.

    The contract answers FAILED_PRECONDITION (the request is well formed; the catalog lacks the
    exercise) and this error names the field, in the message and as a PreconditionFailure whose
    subject is the field path, so a client can point at the offending input.
    """

    reason = "UNKNOWN_EXERCISE"

    def __init__(self, field: str, exercise: str) -> None:
        """``field`` is the request path (``routine.exercises[2].exercise``); ``exercise`` its value."""
        super().__init__(f"invalid {field}: {exercise} is not in the exercise catalog")
        self.field = field
        self.exercise = exercise

    def details(self) -> list[any_pb2.Any]:
        """A PreconditionFailure naming the field, then the ErrorInfo."""
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="EXERCISE_CATALOG", subject=self.field, description=f"{self.exercise} is not in the catalog"
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed, *super().details()]


class QuotaExceeded(DomainError):
    """A per-user or per-session limit is reached (200 routines, 500 sets): RESOURCE_EXHAUSTED.

    Unlike a rate limit, waiting does not help, so it carries a QuotaFailure rather than RetryInfo.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"

    def __init__(self, subject: str, limit: int, what: str) -> None:
        """``subject`` holds at most ``limit`` ``what`` (e.g. "users/u1", 200, "routines")."""
        super().__init__(f"{subject} already has the maximum of {limit} {what}")
        self.subject = subject
        self.limit = limit

    def details(self) -> list[any_pb2.Any]:
        """A QuotaFailure naming the subject, then the ErrorInfo."""
        failure = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=self.subject, description=self.message)]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed, *super().details()]
