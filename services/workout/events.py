"""The events the workout service publishes and the one it consumes.

Published (through the outbox, with deterministic ids so each fact is one event however often a
completion or an erasure is retried):

* ``SessionCompleted``, id ``fact_id("workout.session_completed", <session name>)``;
* ``PersonalRecordAchieved``, id ``fact_id("workout.personal_record_achieved", <session name>,
  <record name>)``;
* ``DataErased``, id ``fact_id("workout.data_erased", <deletion_request_id>)``.

Consumed: ``UserDeleted`` from the user service's stream, in group "workout": every routine,
session and record of the user is erased, then DataErased answers the deletion saga
(``services.runtime.events.erasure``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2

from services.runtime.events import Eraser, fact_id, make_envelope
from services.runtime.timeutil import to_timestamp
from services.workout.catalog import Catalog
from services.workout.records import session_volume, summaries
from services.workout.repository import RecordRepository, RoutineRepository, SessionRepository

PRODUCER = "workout"
#: The consumer group of this service on other services' streams.
GROUP = "workout"

log = logging.getLogger("fittracker.workout.events")


def session_name(doc: dict[str, Any]) -> str:
    """"users/{user}/sessions/{session}" of a session document."""
    return f"users/{doc['user_id']}/sessions/{doc['_id']}"


def record_name(record: dict[str, Any]) -> str:
    """"users/{user}/personalRecords/{record}" of a record document."""
    return f"users/{record['user_id']}/personalRecords/{record['record_id']}"


def completion_events(
    session: dict[str, Any], records: list[dict[str, Any]], catalog: Catalog
) -> list[events_pb2.EventEnvelope]:
    """SessionCompleted and one PersonalRecordAchieved per record, for a completed session."""
    name = session_name(session)
    counted = [s for s in session["sets"] if s["set_type"] != "SET_TYPE_WARMUP"]
    completed = events_pb2.SessionCompleted(
        session=name,
        routine=session.get("routine", ""),
        start_time=to_timestamp(session["start_time"]),
        end_time=to_timestamp(session["end_time"]),
        time_zone=session["time_zone"],
        exercises=summaries(session["sets"], catalog),
        total_volume_kg=session_volume(session["sets"]),
        total_sets=len(counted),
        personal_record_count=len(records),
    )
    envelopes = [
        make_envelope(
            PRODUCER, session["user_id"], completed,
            event_id=fact_id("workout.session_completed", name), occur_time=session["end_time"],
        )
    ]
    for record in records:
        achieved = events_pb2.PersonalRecordAchieved(
            personal_record=record_name(record),
            exercise=record["exercise"],
            kind=fitness_pb2.PersonalRecordKind.Value(record["kind"]),
            value=record["value"],
            weight_kg=record["weight_kg"],
            reps=record["reps"],
            session=name,
        )
        if record.get("previous_value") is not None:
            achieved.previous_value = record["previous_value"]
        envelopes.append(
            make_envelope(
                PRODUCER, session["user_id"], achieved,
                event_id=fact_id("workout.personal_record_achieved", name, record_name(record)),
                occur_time=session["end_time"],
            )
        )
    return envelopes


def eraser(routines: RoutineRepository, sessions: SessionRepository, records: RecordRepository) -> Eraser:
    """What erasing a deleted user means here: every routine, session and record of theirs."""

    async def erase(user_id: str) -> Mapping[str, int]:
        return {
            "routines": await routines.erase_user(user_id),
            "sessions": await sessions.erase_user(user_id),
            "records": await records.erase_user(user_id),
        }

    return erase
