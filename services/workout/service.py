"""The workout service's domain: the exercise catalog, routines, sessions with their sets, and records."""

from __future__ import annotations

import bisect
import uuid
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from fittracker.common.v1 import fitness_pb2
from fittracker.workout.v1 import workout_pb2, workout_service_pb2, workout_service_pb2_grpc

from services.runtime import paging
from services.runtime.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.runtime.fieldmask import apply_update_mask
from services.runtime.names import USER, Pattern
from services.runtime.storage import Document, DuplicateKeyError
from services.runtime.timeutil import from_timestamp, now, to_timestamp
from services.workout.catalog import Catalog, fold
from services.workout.completion import Completer
from services.workout.errors import QuotaExceeded, UnknownExercise
from services.workout.events import record_name, session_name
from services.workout.records import epley, session_volume
from services.workout.repository import (
    ACTIVE,
    COMPLETED,
    DISCARDED,
    IN_PROGRESS,
    MAX_ATTEMPTS,
    RecordRepository,
    RoutineRepository,
    SessionRepository,
    etag_of,
)

SERVICE = "fittracker.workout.v1.WorkoutService"
#: Every method needs a token (the contract: "The catalog is readable by every signed-in user").
PUBLIC_METHODS: frozenset[str] = frozenset()

MAX_ROUTINES = 200
MAX_SETS = 500
DEFAULT_EXERCISE_PAGE = 50
DEFAULT_ROUTINE_PAGE = 50
DEFAULT_SESSION_PAGE = 20
DEFAULT_RECORD_PAGE = 50
#: Device clocks run a little fast; a start or end time this far ahead is taken as "now".
CLOCK_SKEW = timedelta(minutes=1)
DEFAULT_SESSION_NAME = "Workout"

ROUTINE_FIELDS = ("display_name", "description", "exercises")
SET_FIELDS = ("exercise", "set_type", "reps", "weight_kg", "duration_seconds", "distance_m", "rpe", "notes")

# Ids of resources created under a request_id derive from it (and from the owner, so two users'
# request ids never meet): a retried create finds what the first attempt wrote.
ROUTINE_NAMESPACE = uuid.UUID("0b6c7f0e-5d0a-4c55-a1a4-8f2f3d3e8c01")
SESSION_NAMESPACE = uuid.UUID("5a0f7a8e-2b7e-4d1d-9c1b-6f6e1d2c9a02")
SET_NAMESPACE = uuid.UUID("c4e1d9b2-7f3a-4e8b-b5d6-2a9c8e7f1d03")

Context = grpc.aio.ServicerContext[Any, Any]
ROUTINE = Pattern("users/{user}/routines/{routine}")
SESSION = Pattern("users/{user}/sessions/{session}")
SET = Pattern("users/{user}/sessions/{session}/sets/{set}")


# --- names and ownership --------------------------------------------------------------------------


def _new_session(
    session_id: str, user_id: str, routine: Document | None, display_name: str, started: datetime, time_zone: str,
    request_id: str,
) -> Document:
    """A session document in progress, copying a routine's name and targets when it starts from one."""
    created = now()
    return {
        "_id": session_id,
        "user_id": user_id,
        "routine": f"users/{user_id}/routines/{routine['_id']}" if routine else "",
        "display_name": display_name.strip() or (routine["display_name"] if routine else "") or DEFAULT_SESSION_NAME,
        "state": IN_PROGRESS,
        "active": ACTIVE,
        "start_time": started,
        "end_time": None,
        "time_zone": time_zone,
        "notes": "",
        "planned_exercises": list(routine["exercises"]) if routine else [],
        "sets": [],
        "set_count": 0,
        "personal_records": [],
        "finalized": False,
        "version": 1,
        "request_id": request_id,
        "create_time": created,
        "update_time": created,
    }


def _ms(value: datetime) -> datetime:
    """``value`` truncated to the millisecond, the precision the stores keep."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _time_key(key: list[Any] | None) -> tuple[datetime, str] | None:
    """A (time, id) keyset from a decoded page token."""
    if key is None:
        return None
    try:
        time, last_id = key
        return datetime.fromisoformat(str(time)), str(last_id)
    except (ValueError, TypeError):
        raise InvalidArgument.field("page_token", "is not a page token this method issued") from None


# --- documents <-> messages -----------------------------------------------------------------------


def _routine_exercise_doc(item: workout_pb2.RoutineExercise) -> Document:
    return {
        "exercise": item.exercise,
        "target_sets": item.target_sets,
        "target_reps": item.target_reps,
        "target_weight_kg": item.target_weight_kg,
        "rest_seconds": item.rest_seconds,
        "notes": item.notes,
        "target_duration_seconds": item.target_duration_seconds,
    }


def _routine_exercise(doc: Document) -> workout_pb2.RoutineExercise:
    return workout_pb2.RoutineExercise(**doc)


def _to_routine(doc: Document) -> workout_pb2.Routine:
    return workout_pb2.Routine(
        name=f"users/{doc['user_id']}/routines/{doc['_id']}",
        display_name=doc["display_name"],
        description=doc["description"],
        exercises=[_routine_exercise(e) for e in doc["exercises"]],
        create_time=to_timestamp(doc["create_time"]),
        update_time=to_timestamp(doc["update_time"]),
        etag=etag_of(doc),
    )


def _set_fields(workout_set: workout_pb2.WorkoutSet) -> Document:
    """The stored, writable fields of a set; an unspecified set type is stored as working."""
    set_type = workout_set.set_type or workout_pb2.SET_TYPE_WORKING
    return {
        "exercise": workout_set.exercise,
        "set_type": workout_pb2.SetType.Name(set_type),
        "reps": workout_set.reps,
        "weight_kg": workout_set.weight_kg,
        "duration_seconds": workout_set.duration_seconds,
        "distance_m": workout_set.distance_m,
        "rpe": workout_set.rpe if workout_set.HasField("rpe") else None,
        "notes": workout_set.notes,
    }


def _to_set(session: Document, doc: Document) -> workout_pb2.WorkoutSet:
    message = workout_pb2.WorkoutSet(
        name=f"{session_name(session)}/sets/{doc['id']}",
        exercise=doc["exercise"],
        set_type=workout_pb2.SetType.Value(doc["set_type"]),
        reps=doc["reps"],
        weight_kg=doc["weight_kg"],
        duration_seconds=doc["duration_seconds"],
        distance_m=doc["distance_m"],
        notes=doc["notes"],
        estimated_one_rep_max_kg=epley(doc["weight_kg"], doc["reps"]) if doc["set_type"] != "SET_TYPE_WARMUP" else 0.0,
        create_time=to_timestamp(doc["create_time"]),
        update_time=to_timestamp(doc["update_time"]),
    )
    if doc.get("rpe") is not None:
        message.rpe = doc["rpe"]
    return message


def _to_record(doc: Document) -> workout_pb2.PersonalRecord:
    user = doc["user_id"]
    message = workout_pb2.PersonalRecord(
        name=record_name(doc),
        exercise=doc["exercise"],
        kind=fitness_pb2.PersonalRecordKind.Value(doc["kind"]),
        value=doc["value"],
        weight_kg=doc["weight_kg"],
        reps=doc["reps"],
        session=f"users/{user}/sessions/{doc['session']}",
        set=f"users/{user}/sessions/{doc['session']}/sets/{doc['set']}" if doc["set"] else "",
        achieve_time=to_timestamp(doc["achieve_time"]),
    )
    if doc.get("previous_value") is not None:
        message.previous_value = doc["previous_value"]
    return message


def _to_session(doc: Document) -> workout_pb2.Session:
    return workout_pb2.Session(
        name=session_name(doc),
        routine=doc["routine"],
        display_name=doc["display_name"],
        state=workout_pb2.SessionState.Value(doc["state"]),
        start_time=to_timestamp(doc["start_time"]),
        end_time=to_timestamp(doc.get("end_time")),
        time_zone=doc["time_zone"],
        notes=doc["notes"],
        planned_exercises=[_routine_exercise(e) for e in doc["planned_exercises"]],
        sets=[_to_set(doc, s) for s in doc["sets"]],
        total_volume_kg=session_volume(doc["sets"]),
        personal_records=[_to_record(r) for r in doc.get("personal_records", [])],
        update_time=to_timestamp(doc["update_time"]),
        etag=etag_of(doc),
    )


def _check_amounts(workout_set: workout_pb2.WorkoutSet, field: str) -> None:
    """A set must record something: reps, a duration or a distance (the contract's cross-field rule)."""
    if workout_set.reps <= 0 and workout_set.duration_seconds <= 0 and workout_set.distance_m <= 0:
        raise InvalidArgument.field(f"{field}.reps", "one of reps, duration_seconds and distance_m must be above zero")


def _not_future(value: datetime, field: str) -> datetime:
    """``value`` unless it is in the future; a little ahead (clock skew) counts as now."""
    current = now()
    if value > current + CLOCK_SKEW:
        raise InvalidArgument.field(field, "must not be in the future")
    return min(_ms(value), current)


class WorkoutService(workout_service_pb2_grpc.WorkoutServiceServicer):
    """Implements fittracker.workout.v1.WorkoutService."""

    def __init__(
        self,
        catalog: Catalog,
        routines: RoutineRepository,
        sessions: SessionRepository,
        records: RecordRepository,
        completer: Completer,
        pages: paging.PageTokens,
    ) -> None:
        """Take every dependency from the caller (built once at start)."""
        self._pages = pages
        self._catalog = catalog
        self._routines = routines
        self._sessions = sessions
        self._records = records
        self._completer = completer

    # --- catalog ------------------------------------------------------------------------------------

    async def ListExercises(  # noqa: N802 - gRPC method names are the contract's
        self, request: workout_service_pb2.ListExercisesRequest, context: Context
    ) -> workout_service_pb2.ListExercisesResponse:
        """Filter the in-memory catalog and page through it by display name."""
        words = fold(request.query).split()
        query = paging.fingerprint("exercises", request.muscle_group, request.equipment,
                                   request.movement_pattern, words)
        matching = self._catalog.search(
            muscle_group=request.muscle_group, equipment=request.equipment,
            movement_pattern=request.movement_pattern, query=request.query,
        )
        after = self._pages.decode(request.page_token, query)
        keys = [(e.sort_key, e.name) for e in matching]
        start = 0 if after is None else bisect.bisect_right(keys, (str(after[0]), str(after[-1])))
        size = paging.page_size(request.page_size, DEFAULT_EXERCISE_PAGE)
        page = matching[start : start + size]
        more = start + size < len(matching)
        return workout_service_pb2.ListExercisesResponse(
            exercises=[e.exercise for e in page],
            next_page_token=self._pages.encode(query, [page[-1].sort_key, page[-1].name]) if more and page else "",
            total_size=len(matching),
        )

    async def GetExercise(  # noqa: N802
        self, request: workout_service_pb2.GetExerciseRequest, context: Context
    ) -> workout_pb2.Exercise:
        """One exercise of the catalog."""
        entry = self._catalog.get(request.name)
        if entry is None:
            raise NotFound(f"{request.name} not found")
        return entry.exercise

    def _check_exercises(self, items: Any, field: str) -> None:
        for i, item in enumerate(items):
            if item.exercise not in self._catalog:
                raise UnknownExercise(f"{field}[{i}].exercise", item.exercise)

    # --- routines -----------------------------------------------------------------------------------

    async def CreateRoutine(  # noqa: N802
        self, request: workout_service_pb2.CreateRoutineRequest, context: Context
    ) -> workout_pb2.Routine:
        """Create a routine; idempotent under request_id."""
        user_id = USER.owner(request.parent, "parent")
        routine = request.routine
        if not routine.display_name.strip():
            raise InvalidArgument.field("routine.display_name", "must not be empty")
        self._check_exercises(routine.exercises, "routine.exercises")
        if request.request_id:
            routine_id = uuid.uuid5(ROUTINE_NAMESPACE, f"{user_id}:{request.request_id}").hex
            existing = await self._routines.get(user_id, routine_id)
            if existing is not None:
                return _to_routine(existing)
        else:
            routine_id = uuid.uuid4().hex
        # Counted before the insert: two creates racing at 199 may both pass. The limit guards
        # against runaway clients, not against one routine too many.
        if await self._routines.count(user_id) >= MAX_ROUTINES:
            raise QuotaExceeded(f"users/{user_id}", MAX_ROUTINES, "routines")
        created = now()
        doc: Document = {
            "_id": routine_id,
            "user_id": user_id,
            "display_name": routine.display_name.strip(),
            "description": routine.description,
            "exercises": [_routine_exercise_doc(e) for e in routine.exercises],
            "version": 1,
            "request_id": request.request_id,
            "create_time": created,
            "update_time": created,
        }
        return _to_routine(await self._routines.create(doc))

    async def _owned_routine(self, name: str) -> tuple[str, Document]:
        user_id, ids = ROUTINE.owned(name)
        routine_id = ids["routine"]
        doc = await self._routines.get(user_id, routine_id)
        if doc is None:
            raise NotFound(f"{name} not found")
        return user_id, doc

    async def GetRoutine(  # noqa: N802
        self, request: workout_service_pb2.GetRoutineRequest, context: Context
    ) -> workout_pb2.Routine:
        """One routine of the caller."""
        _, doc = await self._owned_routine(request.name)
        return _to_routine(doc)

    async def ListRoutines(  # noqa: N802
        self, request: workout_service_pb2.ListRoutinesRequest, context: Context
    ) -> workout_service_pb2.ListRoutinesResponse:
        """The caller's routines, most recently changed first."""
        user_id = USER.owner(request.parent, "parent")
        query = paging.fingerprint("routines", user_id)
        after = _time_key(self._pages.decode(request.page_token, query))
        size = paging.page_size(request.page_size, DEFAULT_ROUTINE_PAGE)
        docs = await self._routines.page(user_id, after, size + 1)
        page, more = docs[:size], len(docs) > size
        token = self._pages.encode(query, [page[-1]["update_time"].isoformat(), page[-1]["_id"]]) if more else ""
        return workout_service_pb2.ListRoutinesResponse(routines=[_to_routine(d) for d in page], next_page_token=token)

    async def UpdateRoutine(  # noqa: N802
        self, request: workout_service_pb2.UpdateRoutineRequest, context: Context
    ) -> workout_pb2.Routine:
        """Apply the masked fields, against the routine's current version."""
        for _ in range(MAX_ATTEMPTS):
            _, stored = await self._owned_routine(request.routine.name)
            current = _to_routine(stored)
            updated, paths = apply_update_mask(current, request.routine, request.update_mask, ROUTINE_FIELDS)
            if "display_name" in paths and not updated.display_name.strip():
                raise InvalidArgument.field("routine.display_name", "must not be empty")
            if "exercises" in paths:
                self._check_exercises(updated.exercises, "routine.exercises")
            if request.routine.etag and request.routine.etag != current.etag:
                raise Aborted("the routine changed since it was read; read it again and retry")
            changes = {
                "display_name": updated.display_name.strip(),
                "description": updated.description,
                "exercises": [_routine_exercise_doc(e) for e in updated.exercises],
            }
            written = await self._routines.update(stored, changes)
            if written is not None:
                return _to_routine(written)
            # Another write came between the read and this one; without an etag the masked fields
            # are simply applied again to the newer routine.
        raise Aborted("the routine keeps changing concurrently; read it again and retry")

    async def DeleteRoutine(  # noqa: N802
        self, request: workout_service_pb2.DeleteRoutineRequest, context: Context
    ) -> workout_service_pb2.DeleteRoutineResponse:
        """Delete a routine; sessions keep their copy of its targets."""
        _, stored = await self._owned_routine(request.name)
        if request.etag and request.etag != etag_of(stored):
            raise Aborted("the routine changed since it was read; read it again and retry")
        if not await self._routines.delete(stored, at_version=bool(request.etag)):
            await self._owned_routine(request.name)  # NOT_FOUND if a concurrent delete won
            raise Aborted("the routine changed since it was read; read it again and retry")
        return workout_service_pb2.DeleteRoutineResponse()

    # --- sessions -----------------------------------------------------------------------------------

    async def StartSession(  # noqa: N802
        self, request: workout_service_pb2.StartSessionRequest, context: Context
    ) -> workout_pb2.Session:
        """Start a session, empty or from a routine; at most one in progress per user."""
        user_id = USER.owner(request.parent, "parent")
        routine = await self._start_routine(user_id, request.routine)
        started = _not_future(from_timestamp(request.start_time, "start_time"), "start_time") if request.HasField(
            "start_time") else now()
        time_zone = request.time_zone or "UTC"
        try:
            ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidArgument.field("time_zone", f"{time_zone!r} is not an IANA time zone") from None
        if request.request_id:
            session_id = uuid.uuid5(SESSION_NAMESPACE, f"{user_id}:{request.request_id}").hex
            existing = await self._sessions.get(user_id, session_id)
            if existing is not None:
                return _to_session(existing)
        else:
            session_id = uuid.uuid4().hex
        # A completion interrupted by a crash is finished first: its records must be in place
        # before this session can be compared with them.
        await self._completer.finalize_pending(user_id)
        doc = _new_session(session_id, user_id, routine, request.display_name, started, time_zone, request.request_id)
        try:
            stored, _ = await self._sessions.start(doc)
        except DuplicateKeyError:
            current = await self._sessions.in_progress(user_id)
            where = f": {session_name(current)}" if current else ""
            raise FailedPrecondition(f"users/{user_id} already has a session in progress{where}") from None
        return _to_session(stored)

    async def _start_routine(self, user_id: str, name: str) -> Document | None:
        """The caller's routine a session starts from, if one is named."""
        if not name:
            return None
        routine_user, ids = ROUTINE.owned(name, "routine")
        routine = await self._routines.get(user_id, ids["routine"]) if routine_user == user_id else None
        if routine is None:
            raise NotFound(f"{name} not found")
        return routine

    async def _owned_session(self, name: str) -> tuple[str, Document]:
        user_id, ids = SESSION.owned(name)
        session_id = ids["session"]
        doc = await self._sessions.get(user_id, session_id)
        if doc is None:
            raise NotFound(f"{name} not found")
        return user_id, doc

    async def GetSession(  # noqa: N802
        self, request: workout_service_pb2.GetSessionRequest, context: Context
    ) -> workout_pb2.Session:
        """One session with its sets."""
        _, doc = await self._owned_session(request.name)
        return _to_session(doc)

    async def ListSessions(  # noqa: N802
        self, request: workout_service_pb2.ListSessionsRequest, context: Context
    ) -> workout_service_pb2.ListSessionsResponse:
        """The workout history, newest start first, optionally within a time range and state."""
        user_id = USER.owner(request.parent, "parent")
        start = from_timestamp(request.start_time, "start_time") if request.HasField("start_time") else None
        end = from_timestamp(request.end_time, "end_time") if request.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        state = workout_pb2.SessionState.Name(request.state) if request.state else ""
        query = paging.fingerprint("sessions", user_id, start, end, state)
        after = _time_key(self._pages.decode(request.page_token, query))
        size = paging.page_size(request.page_size, DEFAULT_SESSION_PAGE)
        docs = await self._sessions.page(
            user_id, after, size + 1, started_from=start, started_before=end, state=state
        )
        page, more = docs[:size], len(docs) > size
        token = self._pages.encode(query, [page[-1]["start_time"].isoformat(), page[-1]["_id"]]) if more else ""
        return workout_service_pb2.ListSessionsResponse(sessions=[_to_session(d) for d in page], next_page_token=token)

    # --- sets ---------------------------------------------------------------------------------------

    async def LogSet(  # noqa: N802
        self, request: workout_service_pb2.LogSetRequest, context: Context
    ) -> workout_pb2.WorkoutSet:
        """Append a set to a session in progress; idempotent under request_id."""
        user_id, ids = SESSION.owned(request.parent, "parent")
        session_id = ids["session"]
        if not request.set.exercise:
            raise InvalidArgument.field("set.exercise", "is required")
        _check_amounts(request.set, "set")
        if request.set.exercise not in self._catalog:
            raise UnknownExercise("set.exercise", request.set.exercise)
        set_id = (
            uuid.uuid5(SET_NAMESPACE, f"{session_id}:{request.request_id}").hex
            if request.request_id else uuid.uuid4().hex
        )
        logged = now()
        doc: Document = {
            "id": set_id, **_set_fields(request.set), "request_id": request.request_id,
            "create_time": logged, "update_time": logged,
        }
        for _ in range(MAX_ATTEMPTS):
            written = await self._sessions.push_set(session_id, user_id, doc, MAX_SETS)
            if written is not None:
                return _to_set(written, doc)
            # Nothing matched: find out why from the session as it is now.
            session = await self._sessions.get(user_id, session_id)
            if session is None:
                raise NotFound(f"{request.parent} not found")
            earlier = next((s for s in session["sets"] if s["id"] == set_id), None)
            if earlier is not None:
                return _to_set(session, earlier)
            if session["state"] != IN_PROGRESS:
                raise FailedPrecondition(f"{request.parent} is not in progress; sets can only be logged while it is")
            if session["set_count"] >= MAX_SETS:
                raise QuotaExceeded(request.parent, MAX_SETS, "sets")
        raise Aborted("the session keeps changing concurrently; retry the call")

    async def _change_sets(self, name: str, change: Any) -> Document | None:
        """Run ``change(session, set) -> (new sets, result)`` against the session's current version."""
        user_id, ids = SET.owned(name)
        session_id, set_id = ids["session"], ids["set"]
        for _ in range(MAX_ATTEMPTS):
            session = await self._sessions.get(user_id, session_id)
            current = next((s for s in session["sets"] if s["id"] == set_id), None) if session else None
            if session is None or current is None:
                raise NotFound(f"{name} not found")
            if session["state"] != IN_PROGRESS:
                raise FailedPrecondition(f"{session_name(session)} is not in progress; its sets cannot change")
            sets, result = change(session, current)
            written = await self._sessions.replace_sets(session, sets)
            if written is not None:
                return {"session": written, "set": result}
        raise Aborted("the session keeps changing concurrently; retry the call")

    async def UpdateSet(  # noqa: N802
        self, request: workout_service_pb2.UpdateSetRequest, context: Context
    ) -> workout_pb2.WorkoutSet:
        """Apply the masked fields of a set in a session in progress."""

        def change(session: Document, current: Document) -> tuple[list[Document], Document]:
            updated, paths = apply_update_mask(_to_set(session, current), request.set, request.update_mask, SET_FIELDS)
            if "exercise" in paths:
                if not updated.exercise:
                    raise InvalidArgument.field("set.exercise", "is required")
                if updated.exercise not in self._catalog:
                    raise UnknownExercise("set.exercise", updated.exercise)
            _check_amounts(updated, "set")
            new = {**current, **_set_fields(updated), "update_time": now()}
            return [new if s["id"] == current["id"] else s for s in session["sets"]], new

        outcome = await self._change_sets(request.set.name, change)
        assert outcome is not None
        return _to_set(outcome["session"], outcome["set"])

    async def DeleteSet(  # noqa: N802
        self, request: workout_service_pb2.DeleteSetRequest, context: Context
    ) -> workout_service_pb2.DeleteSetResponse:
        """Remove a set from a session in progress."""

        def change(session: Document, current: Document) -> tuple[list[Document], Document]:
            return [s for s in session["sets"] if s["id"] != current["id"]], current

        await self._change_sets(request.name, change)
        return workout_service_pb2.DeleteSetResponse()

    # --- completing ---------------------------------------------------------------------------------

    async def CompleteSession(  # noqa: N802
        self, request: workout_service_pb2.CompleteSessionRequest, context: Context
    ) -> workout_service_pb2.CompleteSessionResponse:
        """Close the session, then compute its records and publish its events (see completion.py)."""
        for _ in range(MAX_ATTEMPTS):
            _, session = await self._owned_session(request.name)
            if session["state"] == COMPLETED:
                return self._completed(await self._completer.finalize(session))
            if session["state"] == DISCARDED:
                raise FailedPrecondition(f"{request.name} was discarded and cannot be completed")
            if request.etag and request.etag != etag_of(session):
                raise Aborted("the session changed since it was read; read it again and retry")
            if request.HasField("end_time"):
                ended = _not_future(from_timestamp(request.end_time, "end_time"), "end_time")
                if ended < session["start_time"]:
                    raise InvalidArgument.field("end_time", "must not be before the session's start_time")
            else:
                ended = max(now(), session["start_time"])
            if not session["sets"]:
                raise FailedPrecondition(f"{request.name} has no sets; log a set or discard it")
            changes: dict[str, Any] = {"state": COMPLETED, "end_time": ended, "finalized": False}
            if request.notes:
                changes["notes"] = request.notes
            closed = await self._sessions.finish(session, changes)
            if closed is not None:
                return self._completed(await self._completer.finalize(closed))
            # A set was logged or the session completed in between: look again.
        raise Aborted("the session keeps changing concurrently; retry the call")

    @staticmethod
    def _completed(doc: Document) -> workout_service_pb2.CompleteSessionResponse:
        session = _to_session(doc)
        return workout_service_pb2.CompleteSessionResponse(session=session, personal_records=session.personal_records)

    async def DiscardSession(  # noqa: N802
        self, request: workout_service_pb2.DiscardSessionRequest, context: Context
    ) -> workout_pb2.Session:
        """Discard a session in progress; it stays in history and counts towards nothing."""
        for _ in range(MAX_ATTEMPTS):
            _, session = await self._owned_session(request.name)
            if session["state"] == DISCARDED:
                return _to_session(session)
            if session["state"] == COMPLETED:
                raise FailedPrecondition(f"{request.name} was completed and cannot be discarded")
            if request.etag and request.etag != etag_of(session):
                raise Aborted("the session changed since it was read; read it again and retry")
            closed = await self._sessions.finish(
                session, {"state": DISCARDED, "end_time": max(now(), session["start_time"]), "finalized": True}
            )
            if closed is not None:
                return _to_session(closed)
        raise Aborted("the session keeps changing concurrently; retry the call")

    # --- records ------------------------------------------------------------------------------------

    async def ListPersonalRecords(  # noqa: N802
        self, request: workout_service_pb2.ListPersonalRecordsRequest, context: Context
    ) -> workout_service_pb2.ListPersonalRecordsResponse:
        """The user's current records, by exercise then kind (then weight)."""
        user_id = USER.owner(request.parent, "parent")
        flt: dict[str, Any] = {}
        if request.exercise:
            flt["exercise"] = request.exercise
        if request.kind:
            flt["kind"] = fitness_pb2.PersonalRecordKind.Name(request.kind)
        query = paging.fingerprint("records", user_id, request.exercise, request.kind)
        after = self._pages.decode(request.page_token, query)
        size = paging.page_size(request.page_size, DEFAULT_RECORD_PAGE)
        docs = await self._records.page(user_id, flt, str(after[0]) if after else None, size + 1)
        page, more = docs[:size], len(docs) > size
        return workout_service_pb2.ListPersonalRecordsResponse(
            personal_records=[_to_record(d) for d in page],
            next_page_token=self._pages.encode(query, [page[-1]["sort_key"]]) if more else "",
        )
