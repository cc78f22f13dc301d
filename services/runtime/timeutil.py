"""Time in one shape everywhere: timezone-aware UTC, at the millisecond precision MongoDB stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from services.runtime.errors import InvalidArgument

_MS = timedelta(milliseconds=1)
#: The last value handed out (a one-element list rather than a global statement).
_last = [datetime.min.replace(tzinfo=UTC)]


def now() -> datetime:
    """The current UTC time truncated to milliseconds, so a stored value reads back equal.

    Strictly increasing within a process: two changes made in the same millisecond still sort in
    the order they happened ("most recently changed first" lists), instead of by a random id.
    """
    current = datetime.now(UTC)
    current = current.replace(microsecond=current.microsecond // 1000 * 1000)
    if current <= _last[0]:
        current = _last[0] + _MS
    _last[0] = current
    return current


def to_timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp for ``value`` (None stays None)."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


def from_timestamp(stamp: Timestamp, field: str | None = None) -> datetime:
    """A UTC datetime for a protobuf Timestamp.

    A Timestamp can hold what no datetime can (nanos outside [0, 1e9), years outside 1-9999).
    For a request field, named by ``field``, that is the caller's mistake: InvalidArgument naming
    it, never an INTERNAL. Without ``field`` it stays the ValueError of stored or internal data.
    """
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as error:
        if field is None:
            raise ValueError(f"timestamp {stamp.seconds}s {stamp.nanos}ns is out of range") from error
        raise InvalidArgument.field(field, "is not a valid timestamp (years 1-9999, nanos 0-999999999)") from None
