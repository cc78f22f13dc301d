"""Finishing an interrupted completion: records and events come out the same, once, however often it runs.

The crash is reproduced by writing what the closing step leaves behind (a completed session not yet
finalized) straight into a real store, then letting the sweep and concurrent finalizers at it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fittracker.events.v1 import events_pb2

from services.runtime.storage import DocumentStore, EmbeddedStore, MongoStore
from services.runtime.timeutil import now
from services.workout.catalog import Catalog
from services.workout.completion import Completer
from services.workout.repository import (
    ALL_COLLECTIONS,
    COMPLETED,
    RecordRepository,
    SessionRepository,
)


class Collected:
    """An event sink that keeps envelopes by id, as the outbox does (a repeated id is dropped)."""

    def __init__(self) -> None:
        self.by_id: dict[str, events_pb2.EventEnvelope] = {}
        self.adds = 0

    async def add(self, envelope: events_pb2.EventEnvelope) -> bool:
        self.adds += 1
        if envelope.event_id in self.by_id:
            return False
        self.by_id[envelope.event_id] = envelope
        return True


@pytest_asyncio.fixture(params=["embedded", "mongo"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DocumentStore]:
    opened: DocumentStore = (
        MongoStore(request.getfixturevalue("mongo_url"), f"completion_{uuid.uuid4().hex[:8]}")
        if request.param == "mongo" else EmbeddedStore(tmp_path / "workout.sqlite3")
    )
    await opened.ensure(ALL_COLLECTIONS)
    yield opened
    await opened.close()


def closed_session(user_id: str, sets: list[tuple[int, float]]) -> dict[str, Any]:
    """A session as the closing write leaves it: completed, sets frozen, not finalized."""
    session_id = uuid.uuid4().hex
    ended = now() - timedelta(minutes=5)
    return {
        "_id": session_id, "user_id": user_id, "routine": "", "display_name": "Workout", "state": COMPLETED,
        "active": session_id, "start_time": ended - timedelta(hours=1), "end_time": ended, "time_zone": "UTC",
        "notes": "", "planned_exercises": [], "set_count": len(sets), "personal_records": [], "finalized": False,
        "version": 3, "request_id": "", "create_time": ended, "update_time": ended,
        "sets": [
            {"id": f"set{i}", "exercise": "exercises/barbell-back-squat", "set_type": "SET_TYPE_WORKING",
             "reps": reps, "weight_kg": weight, "duration_seconds": 0, "distance_m": 0.0, "rpe": None, "notes": "",
             "request_id": "", "create_time": ended, "update_time": ended}
            for i, (reps, weight) in enumerate(sets)
        ],
    }


async def test_an_interrupted_completion_is_finished_once(store: DocumentStore) -> None:
    sessions, records, sink = SessionRepository(store), RecordRepository(store), Collected()
    completer = Completer(sessions, records, sink, Catalog.packaged())
    user_id = uuid.uuid4().hex
    crashed = closed_session(user_id, [(5, 100), (3, 110)])
    await store.collection(ALL_COLLECTIONS[1]).insert(crashed)

    # A fresh completion is not the sweep's business yet: its call may still be running.
    assert await completer.sweep_once(stale_after=timedelta(hours=1)) == 0
    finished = await asyncio.gather(completer.sweep_once(stale_after=timedelta(0)),
                                    completer.finalize(crashed), completer.finalize(crashed))
    assert finished[0] == 1
    stored = await sessions.get(user_id, crashed["_id"])
    assert stored is not None and stored["finalized"] is True
    achieved = {r["record_id"]: (r["value"], r["previous_value"]) for r in stored["personal_records"]}
    assert achieved == {
        "barbell-back-squat_heaviest-weight": (110, None),
        "barbell-back-squat_best-estimated-1rm": (121.0, None),
        "barbell-back-squat_most-reps-at-100kg": (5, None),
        "barbell-back-squat_most-reps-at-110kg": (3, None),
        "barbell-back-squat_best-session-volume": (830, None),
    }
    # Every finalizer added the same 6 events (1 SessionCompleted + 5 records); the outbox keeps one of each.
    assert len(sink.by_id) == 6 and sink.adds >= 6
    assert sum(1 for e in sink.by_id.values() if e.WhichOneof("payload") == "session_completed") == 1
    assert await completer.sweep_once(stale_after=timedelta(0)) == 0

    # The next session compares with those records, not with a half-written state.
    later = closed_session(user_id, [(4, 110)])
    await store.collection(ALL_COLLECTIONS[1]).insert(later)
    await completer.finalize_pending(user_id)
    again = await sessions.get(user_id, later["_id"])
    assert again is not None
    assert {r["record_id"]: (r["value"], r["previous_value"]) for r in again["personal_records"]} == {
        "barbell-back-squat_best-estimated-1rm": (124.7, 121.0),
        "barbell-back-squat_most-reps-at-110kg": (4, 3),
    }
