"""Time in one shape everywhere: timezone-aware UTC, at the millisecond precision MongoDB stores."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp


def now() -> datetime:
    """The current UTC time truncated to milliseconds, so a stored value reads back equal."""
    current = datetime.now(UTC)
    return current.replace(microsecond=current.microsecond // 1000 * 1000)


def to_timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp for ``value`` (None stays None)."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


def from_timestamp(stamp: Timestamp) -> datetime:
    """A UTC datetime for a protobuf Timestamp."""
    return stamp.ToDatetime(tzinfo=UTC)
