"""Envelope construction: the payload oneof, ids, times, users, streams."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from fittracker.events.v1 import events_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.runtime.events import SERVICE_STREAMS, fact_id, make_envelope, stream_of


def test_make_envelope_fills_every_field_from_the_payload() -> None:
    occurred = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    envelope = make_envelope(
        "workout", "u42", events_pb2.PersonalRecordAchieved(exercise="exercises/deadlift", value=180.0),
        occur_time=occurred, schema_version=2,
    )
    assert envelope.WhichOneof("payload") == "personal_record_achieved"
    assert envelope.personal_record_achieved.value == 180.0
    assert envelope.event_type == "fittracker.events.v1.PersonalRecordAchieved"
    assert (envelope.producer, envelope.user, envelope.schema_version) == ("workout", "users/u42", 2)
    assert uuid.UUID(envelope.event_id).version == 4
    assert envelope.occur_time.ToDatetime(tzinfo=UTC) == occurred
    assert envelope.publish_time.ToDatetime(tzinfo=UTC) >= occurred
    assert envelope.traceparent == ""  # no span is active


def test_fact_ids_are_deterministic_uuids_and_keep_parts_apart() -> None:
    assert fact_id("user.deleted", "u1") == fact_id("user.deleted", "u1")
    assert uuid.UUID(fact_id("user.deleted", "u1")).version == 5
    assert fact_id("a:b", "c") != fact_id("a", "b:c")
    envelope = make_envelope("user", "users/u1", events_pb2.UserDeleted(deletion_request_id="d1"),
                             event_id=fact_id("user.deleted", "u1"))
    assert envelope.event_id == fact_id("user.deleted", "u1")
    assert envelope.user == "users/u1"


def test_make_envelope_refuses_what_the_contract_refuses() -> None:
    with pytest.raises(ValueError, match="not an EventEnvelope payload"):
        make_envelope("workout", "u1", Timestamp())
    with pytest.raises(ValueError, match="user id"):
        make_envelope("workout", "no/slashes", events_pb2.UserRegistered())
    with pytest.raises(ValueError, match="producer"):
        make_envelope("Workout Service", "u1", events_pb2.UserRegistered())


def test_streams_are_named_after_producers() -> None:
    assert stream_of("workout") == "events.workout"
    assert SERVICE_STREAMS == tuple(f"events.{s}" for s in ("user", "workout", "ai", "notification", "analytics"))
