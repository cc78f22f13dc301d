"""The events the workout service publishes and the one it consumes.

Published (through the outbox, with deterministic ids so each fact is one event however often a
completion or an erasure is retried):

* ``SessionCompleted``, id ``fact_id("workout.session_completed", <session name>)``;
* ``PersonalRecordAchieved``, id ``fact_id("workout.personal_record_achieved", <session name>,
  <record name>)``;
* ``DataErased``, id ``fact_id("workout.data_erased", <deletion_request_id>)``.

Consumed: ``UserDeleted`` from the user service's stream, in group "workout": every routine,
session and record of the user is erased, then DataErased answers the deletion saga.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2

from services.runtime.events import fact_id, make_envelope
from services.runtime.timeutil import now, to_timestamp
from services.workout.catalog import Catalog
from services.workout.records import session_volume, summaries
from services.workout.repository import RecordRepository, RoutineRepository, SessionRepository

PRODUCER = "workout"
#: The consumer group of this service on other services' streams.
GROUP = "workout"

log = logging.getLogger("fittracker.workout.events")


class EventSink(Protocol):
    """Where events go: the outbox (``services.runtime.events.Outbox``)."""

    async def add(self, envelope: events_pb2.EventEnvelope) -> bool:
        """Store ``envelope`` for publishing; idempotent on its event_id."""
        ...


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


class UserDeletedHandler:
    """Erases a deleted user's workout data and answers the deletion saga with DataErased."""

    def __init__(self, routines: RoutineRepository, sessions: SessionRepository, records: RecordRepository,
                 sink: EventSink) -> None:
        """Erase through the repositories; publish DataErased through ``sink``."""
        self._routines = routines
        self._sessions = sessions
        self._records = records
        self._sink = sink

    async def __call__(self, envelope: events_pb2.EventEnvelope) -> None:
        """Handle one event of the user stream; anything but UserDeleted is not ours and is ignored."""
        if envelope.WhichOneof("payload") != "user_deleted":
            return
        user_id = envelope.user.removeprefix("users/")
        request_id = envelope.user_deleted.deletion_request_id
        # Deleting is idempotent, so a redelivered event simply finds nothing left to delete.
        erased = {
            "routines": await self._routines.erase_user(user_id),
            "sessions": await self._sessions.erase_user(user_id),
            "records": await self._records.erase_user(user_id),
        }
        erased_at = now()
        await self._sink.add(
            make_envelope(
                PRODUCER, user_id,
                events_pb2.DataErased(service=PRODUCER, deletion_request_id=request_id,
                                      erase_time=to_timestamp(erased_at)),
                event_id=fact_id("workout.data_erased", request_id), occur_time=erased_at,
            )
        )
        log.info("erased a deleted user's workout data",
                 extra={"fields": {"user": user_id, "deletion_request_id": request_id, **erased}})
