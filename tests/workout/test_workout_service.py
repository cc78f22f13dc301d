"""The workout service through a real channel: catalog, routines, sessions, records, events, erasure."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2
from fittracker.workout.v1 import workout_pb2, workout_service_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.runtime.events import fact_id, make_envelope
from services.workout.catalog import fold
from tests.support import field_violations
from tests.workout.conftest import Caller, WorkoutApi

pb = workout_service_pb2
SQUAT = "exercises/barbell-back-squat"
BENCH = "exercises/barbell-bench-press"
ROW = "exercises/barbell-bent-over-row"


def stamp(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


def precondition_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    """The subjects of the PreconditionFailure detail of a FAILED_PRECONDITION."""
    status = rpc_status.from_call(error)
    assert status is not None
    subjects = []
    for detail in status.details:
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            subjects += [v.subject for v in failure.violations]
    return subjects


async def start(api: WorkoutApi, who: Caller, **fields: Any) -> workout_pb2.Session:
    return await api.stub.StartSession(pb.StartSessionRequest(parent=who.parent, **fields), metadata=who.metadata)


async def log(api: WorkoutApi, who: Caller, session: str, exercise: str, reps: int, weight: float,
              set_type: int = workout_pb2.SET_TYPE_WORKING, **fields: Any) -> workout_pb2.WorkoutSet:
    return await api.stub.LogSet(
        pb.LogSetRequest(parent=session, set=workout_pb2.WorkoutSet(
            exercise=exercise, reps=reps, weight_kg=weight, set_type=set_type, **fields)),  # type: ignore[arg-type]  # set_type is an int here
        metadata=who.metadata,
    )


async def complete(api: WorkoutApi, who: Caller, session: str, **fields: Any) -> pb.CompleteSessionResponse:
    return await api.stub.CompleteSession(pb.CompleteSessionRequest(name=session, **fields), metadata=who.metadata)


# --- catalog ---------------------------------------------------------------------------------------


async def test_the_catalog_pages_through_at_least_100_exercises_by_display_name(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    names: list[str] = []
    display: list[str] = []
    token = ""
    for _ in range(20):
        page = await workout_api.stub.ListExercises(pb.ListExercisesRequest(page_size=40, page_token=token),
                                                    metadata=who.metadata)
        assert page.total_size >= 100
        assert len(page.exercises) <= 40
        names += [e.name for e in page.exercises]
        display += [fold(e.display_name) for e in page.exercises]
        token = page.next_page_token
        if not token:
            break
    assert len(names) == page.total_size == len(set(names))
    assert display == sorted(display)
    default = await workout_api.stub.ListExercises(pb.ListExercisesRequest(), metadata=who.metadata)
    assert len(default.exercises) == 50


async def test_catalog_filters_combine(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    list_ = workout_api.stub.ListExercises
    chest = await list_(pb.ListExercisesRequest(muscle_group=fitness_pb2.MUSCLE_GROUP_CHEST, page_size=100),
                        metadata=who.metadata)
    assert BENCH in [e.name for e in chest.exercises]
    assert all(fitness_pb2.MUSCLE_GROUP_CHEST in [*e.primary_muscle_groups, *e.secondary_muscle_groups]
               for e in chest.exercises)
    barbell = await list_(pb.ListExercisesRequest(equipment=fitness_pb2.EQUIPMENT_BARBELL, page_size=100),
                          metadata=who.metadata)
    usable = {fitness_pb2.EQUIPMENT_BARBELL, fitness_pb2.EQUIPMENT_BODYWEIGHT}
    assert SQUAT in [e.name for e in barbell.exercises]
    assert BENCH not in [e.name for e in barbell.exercises]  # it needs a bench too
    assert all(set(e.equipment) <= usable for e in barbell.exercises)
    found = await list_(pb.ListExercisesRequest(query="  PRESS bench "), metadata=who.metadata)
    assert BENCH in [e.name for e in found.exercises]
    assert all("bench" in e.display_name.lower() and "press" in e.display_name.lower() for e in found.exercises)
    accents = await list_(pb.ListExercisesRequest(query="FARMÉR"), metadata=who.metadata)
    assert [e.name for e in accents.exercises] == ["exercises/farmers-walk"]
    hinge = await list_(pb.ListExercisesRequest(movement_pattern=fitness_pb2.MOVEMENT_PATTERN_HINGE,
                                                equipment=fitness_pb2.EQUIPMENT_BARBELL, query="deadlift"),
                        metadata=who.metadata)
    assert {e.name for e in hinge.exercises} >= {"exercises/conventional-deadlift", "exercises/romanian-deadlift"}
    assert hinge.total_size == len(hinge.exercises)
    nothing = await list_(pb.ListExercisesRequest(query="no such exercise"), metadata=who.metadata)
    assert (nothing.total_size, list(nothing.exercises), nothing.next_page_token) == (0, [], "")


async def test_a_tampered_or_foreign_page_token_is_invalid(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    first = await workout_api.stub.ListExercises(pb.ListExercisesRequest(page_size=5), metadata=who.metadata)
    token = first.next_page_token
    body, _, checksum = token.partition(".")
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-3] ^= 1
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode() + "." + checksum
    for bad, request in (
        (forged, pb.ListExercisesRequest(page_size=5, page_token=forged)),
        ("garbage", pb.ListExercisesRequest(page_size=5, page_token="garbage!!")),
        ("other filters", pb.ListExercisesRequest(page_size=5, page_token=token, query="squat")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await workout_api.stub.ListExercises(request, metadata=who.metadata)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert field_violations(err.value) == ["page_token"]
    second = await workout_api.stub.ListExercises(pb.ListExercisesRequest(page_size=5, page_token=token),
                                                  metadata=who.metadata)
    assert not {e.name for e in second.exercises} & {e.name for e in first.exercises}


async def test_get_exercise_and_catalog_access(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    squat = await workout_api.stub.GetExercise(pb.GetExerciseRequest(name=SQUAT), metadata=who.metadata)
    assert squat.display_name == "Barbell Back Squat"
    assert squat.is_compound and squat.instructions
    assert fitness_pb2.MUSCLE_GROUP_QUADRICEPS in squat.primary_muscle_groups
    assert squat.movement_pattern == fitness_pb2.MOVEMENT_PATTERN_SQUAT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workout_api.stub.GetExercise(pb.GetExerciseRequest(name="exercises/moon-walk"), metadata=who.metadata)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workout_api.stub.GetExercise(pb.GetExerciseRequest(name=SQUAT))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- routines --------------------------------------------------------------------------------------


def push_day(*exercises: str) -> workout_pb2.Routine:
    return workout_pb2.Routine(
        display_name="Push day",
        description="Chest and shoulders",
        exercises=[workout_pb2.RoutineExercise(exercise=e, target_sets=3, target_reps=8, target_weight_kg=60,
                                               rest_seconds=120) for e in exercises or (BENCH,)],
    )


async def test_routine_crud_with_field_masks_and_etags(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    stub = workout_api.stub
    created = await stub.CreateRoutine(pb.CreateRoutineRequest(parent="users/me", routine=push_day(BENCH, SQUAT)),
                                       metadata=who.metadata)
    assert created.name.startswith(f"users/{who.user_id}/routines/")
    assert [e.exercise for e in created.exercises] == [BENCH, SQUAT]
    assert created.etag
    got = await stub.GetRoutine(pb.GetRoutineRequest(name=created.name), metadata=who.metadata)
    assert got == created

    # Only the masked field changes; display_name is not even sent.
    patched = await stub.UpdateRoutine(
        pb.UpdateRoutineRequest(routine=workout_pb2.Routine(name=created.name, description="Heavy"),
                                update_mask=FieldMask(paths=["description"])),
        metadata=who.metadata,
    )
    assert (patched.display_name, patched.description, len(patched.exercises)) == ("Push day", "Heavy", 2)
    assert patched.etag != created.etag
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateRoutine(
            pb.UpdateRoutineRequest(routine=workout_pb2.Routine(name=created.name, description="x", etag=created.etag),
                                    update_mask=FieldMask(paths=["description"])),
            metadata=who.metadata,
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
    for paths, field in ((["create_time"], "update_mask"), (["display_name"], "routine.display_name")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateRoutine(
                pb.UpdateRoutineRequest(routine=workout_pb2.Routine(name=created.name),
                                        update_mask=FieldMask(paths=paths)),
                metadata=who.metadata,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(err.value) == [field]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateRoutine(
            pb.UpdateRoutineRequest(
                routine=workout_pb2.Routine(name=created.name, exercises=[
                    workout_pb2.RoutineExercise(exercise=ROW, target_sets=1),
                    workout_pb2.RoutineExercise(exercise="exercises/unicorn-press", target_sets=1)]),
                update_mask=FieldMask(paths=["exercises"])),
            metadata=who.metadata,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "routine.exercises[1].exercise" in (err.value.details() or "")
    assert precondition_subjects(err.value) == ["routine.exercises[1].exercise"]
    replaced = await stub.UpdateRoutine(
        pb.UpdateRoutineRequest(routine=workout_pb2.Routine(
            name=created.name, etag=patched.etag, exercises=[workout_pb2.RoutineExercise(exercise=ROW, target_sets=5)]),
            update_mask=FieldMask(paths=["exercises"])),
        metadata=who.metadata,
    )
    assert [(e.exercise, e.target_sets) for e in replaced.exercises] == [(ROW, 5)]

    other = await stub.CreateRoutine(pb.CreateRoutineRequest(parent=who.parent, routine=push_day()),
                                     metadata=who.metadata)
    listed = await stub.ListRoutines(pb.ListRoutinesRequest(parent="users/me", page_size=1), metadata=who.metadata)
    assert [r.name for r in listed.routines] == [other.name]  # most recently changed first
    rest = await stub.ListRoutines(pb.ListRoutinesRequest(parent="users/me", page_size=1,
                                                          page_token=listed.next_page_token), metadata=who.metadata)
    assert [r.name for r in rest.routines] == [created.name]
    assert rest.next_page_token == ""

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteRoutine(pb.DeleteRoutineRequest(name=created.name, etag=patched.etag), metadata=who.metadata)
    assert err.value.code() == grpc.StatusCode.ABORTED
    await stub.DeleteRoutine(pb.DeleteRoutineRequest(name=created.name, etag=replaced.etag), metadata=who.metadata)
    for call in (stub.GetRoutine(pb.GetRoutineRequest(name=created.name), metadata=who.metadata),
                 stub.DeleteRoutine(pb.DeleteRoutineRequest(name=created.name), metadata=who.metadata)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_create_routine_checks_its_input_and_is_idempotent(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    stub = workout_api.stub
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateRoutine(pb.CreateRoutineRequest(parent=who.parent, routine=push_day(BENCH, "exercises/nope")),
                                 metadata=who.metadata)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_subjects(err.value) == ["routine.exercises[1].exercise"]
    bad_targets = push_day()
    bad_targets.exercises[0].target_sets = 0
    for routine, field in ((workout_pb2.Routine(display_name=""), "routine.display_name"),
                           (bad_targets, "routine.exercises[0].target_sets")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateRoutine(pb.CreateRoutineRequest(parent=who.parent, routine=routine), metadata=who.metadata)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(err.value) == [field]
    request = pb.CreateRoutineRequest(parent=who.parent, routine=push_day(), request_id=str(uuid.uuid4()))
    first, again = [await stub.CreateRoutine(request, metadata=who.metadata) for _ in range(2)]
    assert first == again
    listed = await stub.ListRoutines(pb.ListRoutinesRequest(parent=who.parent), metadata=who.metadata)
    assert [r.name for r in listed.routines] == [first.name]


# --- ownership -------------------------------------------------------------------------------------


async def test_another_user_gets_not_found_for_every_rpc(workout_api: WorkoutApi) -> None:
    alice, bob = await workout_api.sign_in(), await workout_api.sign_in()
    stub = workout_api.stub
    routine = await stub.CreateRoutine(pb.CreateRoutineRequest(parent=alice.parent, routine=push_day()),
                                       metadata=alice.metadata)
    session = await start(workout_api, alice)
    logged = await log(workout_api, alice, session.name, BENCH, 5, 80)
    calls: list[tuple[str, object]] = [
        ("CreateRoutine", pb.CreateRoutineRequest(parent=alice.parent, routine=push_day())),
        ("GetRoutine", pb.GetRoutineRequest(name=routine.name)),
        ("ListRoutines", pb.ListRoutinesRequest(parent=alice.parent)),
        ("UpdateRoutine", pb.UpdateRoutineRequest(routine=workout_pb2.Routine(name=routine.name, description="mine"),
                                                  update_mask=FieldMask(paths=["description"]))),
        ("DeleteRoutine", pb.DeleteRoutineRequest(name=routine.name)),
        ("StartSession", pb.StartSessionRequest(parent=alice.parent)),
        ("StartSession", pb.StartSessionRequest(parent=bob.parent, routine=routine.name)),
        ("GetSession", pb.GetSessionRequest(name=session.name)),
        ("ListSessions", pb.ListSessionsRequest(parent=alice.parent)),
        ("LogSet", pb.LogSetRequest(parent=session.name, set=workout_pb2.WorkoutSet(exercise=BENCH, reps=1))),
        ("UpdateSet", pb.UpdateSetRequest(set=workout_pb2.WorkoutSet(name=logged.name, reps=9),
                                          update_mask=FieldMask(paths=["reps"]))),
        ("DeleteSet", pb.DeleteSetRequest(name=logged.name)),
        ("CompleteSession", pb.CompleteSessionRequest(name=session.name)),
        ("DiscardSession", pb.DiscardSessionRequest(name=session.name)),
        ("ListPersonalRecords", pb.ListPersonalRecordsRequest(parent=alice.parent)),
    ]
    for method, request in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(stub, method)(request, metadata=bob.metadata)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, (method, err.value.details())
    still = await stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=alice.metadata)
    assert still.state == workout_pb2.SESSION_STATE_IN_PROGRESS and len(still.sets) == 1
    again = await stub.GetRoutine(pb.GetRoutineRequest(name=routine.name), metadata=alice.metadata)
    assert again == routine
    admin = await workout_api.sign_in(role="admin")
    assert await stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=admin.metadata) == still


# --- sessions --------------------------------------------------------------------------------------


async def test_session_lifecycle_and_its_error_codes(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    stub = workout_api.stub
    routine = await stub.CreateRoutine(pb.CreateRoutineRequest(parent=who.parent, routine=push_day(BENCH, ROW)),
                                       metadata=who.metadata)
    session = await start(workout_api, who, routine=routine.name, time_zone="Europe/Paris")
    assert session.state == workout_pb2.SESSION_STATE_IN_PROGRESS
    assert (session.display_name, session.routine, session.time_zone) == ("Push day", routine.name, "Europe/Paris")
    assert [e.exercise for e in session.planned_exercises] == [BENCH, ROW]
    assert not session.HasField("end_time")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await start(workout_api, who)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert session.name in (err.value.details() or "")

    warmup = await log(workout_api, who, session.name, BENCH, 10, 40, workout_pb2.SET_TYPE_WARMUP)
    working = await log(workout_api, who, session.name, BENCH, 5, 100, rpe=8.5)
    assert working.name.startswith(session.name + "/sets/")
    assert working.rpe == 8.5 and working.HasField("rpe")
    assert working.estimated_one_rep_max_kg == pytest.approx(116.7)
    assert warmup.estimated_one_rep_max_kg == 0
    unspecified = await log(workout_api, who, session.name, ROW, 8, 70, workout_pb2.SET_TYPE_UNSPECIFIED)
    assert unspecified.set_type == workout_pb2.SET_TYPE_WORKING

    bad = [
        (workout_pb2.WorkoutSet(exercise=BENCH, reps=5, rpe=7.3), "set.rpe", grpc.StatusCode.INVALID_ARGUMENT),
        (workout_pb2.WorkoutSet(exercise=BENCH, reps=5, rpe=11), "set.rpe", grpc.StatusCode.INVALID_ARGUMENT),
        (workout_pb2.WorkoutSet(exercise=BENCH, weight_kg=100), "set.reps", grpc.StatusCode.INVALID_ARGUMENT),
        (workout_pb2.WorkoutSet(exercise=BENCH, reps=5, weight_kg=-1), "set.weight_kg",
         grpc.StatusCode.INVALID_ARGUMENT),
        (workout_pb2.WorkoutSet(reps=5), "set.exercise", grpc.StatusCode.INVALID_ARGUMENT),
        (workout_pb2.WorkoutSet(exercise="exercises/air-guitar", reps=5), "set.exercise",
         grpc.StatusCode.FAILED_PRECONDITION),
    ]
    for workout_set, field, code in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LogSet(pb.LogSetRequest(parent=session.name, set=workout_set), metadata=who.metadata)
        assert err.value.code() == code, field
        assert field in (err.value.details() or ""), err.value.details()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert field_violations(err.value) == [field]

    changed = await stub.UpdateSet(
        pb.UpdateSetRequest(set=workout_pb2.WorkoutSet(name=unspecified.name, reps=10),
                            update_mask=FieldMask(paths=["reps"])),
        metadata=who.metadata,
    )
    assert (changed.exercise, changed.reps, changed.weight_kg) == (ROW, 10, 70)
    cleared = await stub.UpdateSet(
        pb.UpdateSetRequest(set=workout_pb2.WorkoutSet(name=working.name), update_mask=FieldMask(paths=["rpe"])),
        metadata=who.metadata,
    )
    assert not cleared.HasField("rpe") and cleared.reps == 5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateSet(pb.UpdateSetRequest(set=workout_pb2.WorkoutSet(name=working.name),
                                                 update_mask=FieldMask(paths=["reps"])), metadata=who.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # a set must keep reps, time or distance
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateSet(pb.UpdateSetRequest(set=workout_pb2.WorkoutSet(name=working.name, reps=3),
                                                 update_mask=FieldMask(paths=["create_time"])), metadata=who.metadata)
    assert field_violations(err.value) == ["update_mask"]
    await stub.DeleteSet(pb.DeleteSetRequest(name=unspecified.name), metadata=who.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteSet(pb.DeleteSetRequest(name=unspecified.name), metadata=who.metadata)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    current = await stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=who.metadata)
    assert [s.name for s in current.sets] == [warmup.name, working.name]
    assert current.total_volume_kg == 500  # the warm-up does not count
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(workout_api, who, session.name, etag=session.etag)
    assert err.value.code() == grpc.StatusCode.ABORTED
    for end, problem in ((datetime.now(UTC) + timedelta(hours=1), "future"),
                         (session.start_time.ToDatetime(UTC) - timedelta(minutes=1), "start_time")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await complete(workout_api, who, session.name, end_time=stamp(end))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(err.value) == ["end_time"] and problem in (err.value.details() or "")
    done = await complete(workout_api, who, session.name, etag=current.etag, notes="Felt strong")
    assert done.session.state == workout_pb2.SESSION_STATE_COMPLETED
    assert done.session.notes == "Felt strong" and done.session.HasField("end_time")
    again = await complete(workout_api, who, session.name, notes="changed my mind")
    assert again == done

    after_completion: list[Awaitable[object]] = [
        stub.LogSet(pb.LogSetRequest(parent=session.name, set=workout_pb2.WorkoutSet(exercise=BENCH, reps=1)),
                    metadata=who.metadata),
        stub.UpdateSet(pb.UpdateSetRequest(set=workout_pb2.WorkoutSet(name=working.name, reps=9),
                                           update_mask=FieldMask(paths=["reps"])), metadata=who.metadata),
        stub.DeleteSet(pb.DeleteSetRequest(name=working.name), metadata=who.metadata),
        stub.DiscardSession(pb.DiscardSessionRequest(name=session.name), metadata=who.metadata),
    ]
    for call in after_completion:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    empty = await start(workout_api, who, display_name="Legs")
    assert (empty.display_name, empty.routine, empty.time_zone) == ("Legs", "", "UTC")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(workout_api, who, empty.name)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # no sets
    discarded = await stub.DiscardSession(pb.DiscardSessionRequest(name=empty.name, etag=empty.etag),
                                          metadata=who.metadata)
    assert discarded.state == workout_pb2.SESSION_STATE_DISCARDED
    assert await stub.DiscardSession(pb.DiscardSessionRequest(name=empty.name), metadata=who.metadata) == discarded
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(workout_api, who, empty.name)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_start_session_checks_its_input_and_is_idempotent(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    for fields, field in (
        ({"start_time": stamp(datetime.now(UTC) + timedelta(hours=2))}, "start_time"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"time_zone": "Europe Paris"}, "time_zone"),
        ({"routine": f"users/{who.user_id}/routines/missing"}, ""),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await start(workout_api, who, **fields)
        if field:
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field_violations(err.value) == [field]
        else:
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    request_id = str(uuid.uuid4())
    first = await start(workout_api, who, request_id=request_id)
    assert await start(workout_api, who, request_id=request_id) == first
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await start(workout_api, who, request_id=str(uuid.uuid4()))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_log_set_is_idempotent_under_a_request_id(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    session = await start(workout_api, who)
    request = pb.LogSetRequest(parent=session.name, set=workout_pb2.WorkoutSet(exercise=SQUAT, reps=5, weight_kg=100),
                               request_id=str(uuid.uuid4()))
    first = await workout_api.stub.LogSet(request, metadata=who.metadata)
    again = await workout_api.stub.LogSet(request, metadata=who.metadata)
    assert again == first
    stored = await workout_api.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=who.metadata)
    assert [s.name for s in stored.sets] == [first.name]


async def test_concurrent_log_sets_are_all_kept(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    session = await start(workout_api, who)
    logged = await asyncio.gather(*(log(workout_api, who, session.name, SQUAT, reps, 100) for reps in range(1, 41)))
    stored = await workout_api.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=who.metadata)
    assert len(stored.sets) == 40
    assert {s.name for s in stored.sets} == {s.name for s in logged}
    assert sorted(s.reps for s in stored.sets) == list(range(1, 41))
    assert stored.total_volume_kg == 100 * sum(range(1, 41))


# --- personal records ------------------------------------------------------------------------------


def kinds(records: object) -> dict[tuple[int, float], tuple[float, float | None]]:
    """(kind, weight for most-reps records) -> (value, previous value)."""
    out = {}
    for r in records:  # type: ignore[attr-defined]
        weight = r.weight_kg if r.kind == fitness_pb2.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT else 0.0
        out[(r.kind, weight)] = (r.value, r.previous_value if r.HasField("previous_value") else None)
    return out


async def test_personal_records_from_known_numbers(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    stub = workout_api.stub
    k = fitness_pb2
    first = await start(workout_api, who)
    await log(workout_api, who, first.name, BENCH, 10, 120, workout_pb2.SET_TYPE_WARMUP)  # never a record
    top = await log(workout_api, who, first.name, BENCH, 5, 100)
    await log(workout_api, who, first.name, BENCH, 8, 90)
    await log(workout_api, who, first.name, BENCH, 4, 100)
    done = await complete(workout_api, who, first.name)
    assert kinds(done.personal_records) == {
        (k.PERSONAL_RECORD_KIND_HEAVIEST_WEIGHT, 0.0): (100, None),
        (k.PERSONAL_RECORD_KIND_BEST_ESTIMATED_ONE_REP_MAX, 0.0): (pytest.approx(116.7), None),
        (k.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, 90.0): (8, None),
        (k.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, 100.0): (5, None),
        (k.PERSONAL_RECORD_KIND_BEST_SESSION_VOLUME, 0.0): (500 + 720 + 400, None),
    }
    assert list(done.session.personal_records) == list(done.personal_records)
    heaviest = next(r for r in done.personal_records if r.kind == k.PERSONAL_RECORD_KIND_HEAVIEST_WEIGHT)
    assert (heaviest.weight_kg, heaviest.reps, heaviest.set, heaviest.session) == (100, 5, top.name, first.name)
    assert heaviest.achieve_time == done.session.end_time

    second = await start(workout_api, who)
    await log(workout_api, who, second.name, BENCH, 3, 105)
    await log(workout_api, who, second.name, BENCH, 6, 100)
    await log(workout_api, who, second.name, BENCH, 8, 90)  # equals the record: not a new one
    beaten = await complete(workout_api, who, second.name)
    assert kinds(beaten.personal_records) == {
        (k.PERSONAL_RECORD_KIND_HEAVIEST_WEIGHT, 0.0): (105, 100),
        (k.PERSONAL_RECORD_KIND_BEST_ESTIMATED_ONE_REP_MAX, 0.0): (120, pytest.approx(116.7)),
        (k.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, 100.0): (6, 5),
        (k.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, 105.0): (3, None),
        (k.PERSONAL_RECORD_KIND_BEST_SESSION_VOLUME, 0.0): (315 + 600 + 720, 1620),
    }
    current = await stub.ListPersonalRecords(pb.ListPersonalRecordsRequest(parent="users/me"), metadata=who.metadata)
    assert [(r.kind, r.weight_kg) for r in current.personal_records] == [
        (k.PERSONAL_RECORD_KIND_HEAVIEST_WEIGHT, 105),
        (k.PERSONAL_RECORD_KIND_BEST_ESTIMATED_ONE_REP_MAX, 100),
        (k.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, 90),
        (k.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, 100),
        (k.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, 105),
        (k.PERSONAL_RECORD_KIND_BEST_SESSION_VOLUME, 0),
    ]
    volume = current.personal_records[-1]
    assert (volume.value, volume.previous_value, volume.set) == (1635, 1620, "")
    paged = await stub.ListPersonalRecords(
        pb.ListPersonalRecordsRequest(parent=who.parent, kind=k.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, page_size=2),
        metadata=who.metadata,
    )
    rest = await stub.ListPersonalRecords(
        pb.ListPersonalRecordsRequest(parent=who.parent, kind=k.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, page_size=2,
                                      page_token=paged.next_page_token),
        metadata=who.metadata,
    )
    assert [r.weight_kg for r in [*paged.personal_records, *rest.personal_records]] == [90, 100, 105]
    assert rest.next_page_token == ""
    squat_only = await stub.ListPersonalRecords(pb.ListPersonalRecordsRequest(parent=who.parent, exercise=SQUAT),
                                                metadata=who.metadata)
    assert list(squat_only.personal_records) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListPersonalRecords(
            pb.ListPersonalRecordsRequest(parent=who.parent, exercise=SQUAT, page_token=paged.next_page_token),
            metadata=who.metadata)
    assert field_violations(err.value) == ["page_token"]


# --- history ---------------------------------------------------------------------------------------


async def test_history_by_time_range_newest_first_with_paging(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    stub = workout_api.stub
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=10)
    names = []
    for day in range(6):
        session = await start(workout_api, who, start_time=stamp(base + timedelta(days=day)))
        await log(workout_api, who, session.name, SQUAT, 5, 60 + day)
        if day == 4:
            await stub.DiscardSession(pb.DiscardSessionRequest(name=session.name), metadata=who.metadata)
        else:
            await complete(workout_api, who, session.name, end_time=stamp(base + timedelta(days=day, hours=1)))
        names.append(session.name)
    window = pb.ListSessionsRequest(parent="users/me", start_time=stamp(base + timedelta(days=1)),
                                    end_time=stamp(base + timedelta(days=5)), page_size=2)
    seen: list[str] = []
    for _ in range(5):
        page = await stub.ListSessions(window, metadata=who.metadata)
        seen += [s.name for s in page.sessions]
        assert all(s.sets for s in page.sessions)
        if not page.next_page_token:
            break
        window.page_token = page.next_page_token
    assert seen == [names[4], names[3], names[2], names[1]]  # [day 1, day 5) newest first
    completed = await stub.ListSessions(
        pb.ListSessionsRequest(parent=who.parent, state=workout_pb2.SESSION_STATE_COMPLETED), metadata=who.metadata)
    assert [s.name for s in completed.sessions] == [names[5], names[3], names[2], names[1], names[0]]
    everything = await stub.ListSessions(pb.ListSessionsRequest(parent=who.parent), metadata=who.metadata)
    assert [s.name for s in everything.sessions] == names[::-1]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListSessions(pb.ListSessionsRequest(parent=who.parent, start_time=stamp(base),
                                                       end_time=stamp(base)), metadata=who.metadata)
    assert field_violations(err.value) == ["end_time"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListSessions(pb.ListSessionsRequest(parent=who.parent, page_token=page.next_page_token or "x.y"),
                                metadata=who.metadata)
    assert field_violations(err.value) == ["page_token"]


# --- events ----------------------------------------------------------------------------------------


async def test_completion_publishes_each_fact_exactly_once(workout_api: WorkoutApi) -> None:
    who = await workout_api.sign_in()
    session = await start(workout_api, who, time_zone="America/New_York")
    await log(workout_api, who, session.name, SQUAT, 5, 100)
    await log(workout_api, who, session.name, SQUAT, 10, 60, workout_pb2.SET_TYPE_WARMUP)
    await log(workout_api, who, session.name, BENCH, 8, 80)
    first, second = await asyncio.gather(complete(workout_api, who, session.name),
                                         complete(workout_api, who, session.name))
    assert first == second
    third = await complete(workout_api, who, session.name)
    assert third == first

    def about(envelope: events_pb2.EventEnvelope) -> bool:
        return envelope.user == who.parent

    completed = await workout_api.events.wait_for(
        lambda e: about(e) and e.WhichOneof("payload") == "session_completed")
    event = completed[0]
    assert event.event_id == fact_id("workout.session_completed", session.name)
    assert (event.producer, event.event_type) == ("workout", "fittracker.events.v1.SessionCompleted")
    payload = event.session_completed
    assert (payload.session, payload.time_zone, payload.total_sets) == (session.name, "America/New_York", 2)
    assert payload.total_volume_kg == 500 + 640
    assert payload.personal_record_count == len(first.personal_records) == 8  # 4 kinds x 2 exercises
    squat = payload.exercises[0]
    assert (squat.exercise, squat.set_count, squat.total_reps, squat.best_set_weight_kg, squat.best_set_reps) == (
        SQUAT, 1, 5, 100, 5)
    assert squat.estimated_one_rep_max_kg == pytest.approx(116.7)
    assert fitness_pb2.MUSCLE_GROUP_QUADRICEPS in squat.primary_muscle_groups
    assert [e.exercise for e in payload.exercises] == [SQUAT, BENCH]
    records = await workout_api.events.wait_for(
        lambda e: about(e) and e.WhichOneof("payload") == "personal_record_achieved", count=8)
    assert {e.personal_record_achieved.personal_record for e in records} == {r.name for r in first.personal_records}

    # A barrier: the outbox relays in order, so once a later session's event has arrived, any
    # duplicate of the first session's events would have arrived before it.
    later = await start(workout_api, who)
    await log(workout_api, who, later.name, SQUAT, 1, 20)
    await complete(workout_api, who, later.name)
    await workout_api.events.wait_for(lambda e: about(e) and e.session_completed.session == later.name)
    mine = workout_api.events.matching(lambda e: about(e) and later.name not in (
        e.session_completed.session, e.personal_record_achieved.session))
    ids = [e.event_id for e in mine]
    assert len(ids) == len(set(ids)) == 9


async def test_user_deletion_erases_everything_and_answers_the_saga(workout_api: WorkoutApi) -> None:
    who, bystander = await workout_api.sign_in(), await workout_api.sign_in()
    stub = workout_api.stub
    for person in (who, bystander):
        await stub.CreateRoutine(pb.CreateRoutineRequest(parent=person.parent, routine=push_day()),
                                 metadata=person.metadata)
        done = await start(workout_api, person)
        await log(workout_api, person, done.name, BENCH, 5, 80)
        await complete(workout_api, person, done.name)
        open_session = await start(workout_api, person)
        await log(workout_api, person, open_session.name, BENCH, 5, 80)
    request_id = uuid.uuid4().hex
    deleted = make_envelope("user", who.user_id, events_pb2.UserDeleted(
        deletion_request_id=request_id, expected_services=["workout"]))
    await workout_api.bus.publish(deleted)
    await workout_api.bus.publish(deleted)  # at-least-once: a redelivery must be harmless
    erased = await workout_api.events.wait_for(
        lambda e: e.WhichOneof("payload") == "data_erased" and e.data_erased.deletion_request_id == request_id)
    assert erased[0].user == who.parent
    assert erased[0].data_erased.service == "workout"
    assert erased[0].event_id == fact_id("workout.data_erased", request_id)
    for person, expected in ((who, 0), (bystander, 1)):
        routines = await stub.ListRoutines(pb.ListRoutinesRequest(parent=person.parent), metadata=person.metadata)
        sessions = await stub.ListSessions(pb.ListSessionsRequest(parent=person.parent), metadata=person.metadata)
        records = await stub.ListPersonalRecords(pb.ListPersonalRecordsRequest(parent=person.parent),
                                                 metadata=person.metadata)
        assert len(routines.routines) == expected
        assert len(sessions.sessions) == 2 * expected
        assert bool(records.personal_records) == bool(expected)


async def test_health_reports_serving(workout_api: WorkoutApi) -> None:
    health = health_pb2_grpc.HealthStub(workout_api.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="fittracker.workout.v1.WorkoutService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
