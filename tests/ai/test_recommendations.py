"""RecommendNextWorkout from histories logged through the real workout service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from fittracker.ai.v1 import ai_pb2, ai_service_pb2
from fittracker.common.v1 import fitness_pb2 as fit

from services.ai.catalog import FALLBACK
from tests.ai.conftest import BARBELL_GYM, Caller, Stack, days_ago, start_stack, stop_stack

STRENGTH, HYPERTROPHY = fit.FITNESS_GOAL_STRENGTH, fit.FITNESS_GOAL_HYPERTROPHY
#: A caller's deadline that the degraded answer must meet: the service's peer budget (1.5 s) plus room to
#: build the answer on a busy machine. A service that waited out the dead peer would miss it.
DEGRADED_DEADLINE_SECONDS = 1.5 + 2.5


async def recommend(stack: Stack, caller: Caller, deadline: float = 10, **fields: object) -> ai_pb2.Recommendation:
    request = ai_service_pb2.RecommendNextWorkoutRequest(user="users/me", **fields)  # type: ignore[arg-type]
    return await stack.ai.RecommendNextWorkout(request, metadata=caller.metadata, timeout=deadline)


def by_exercise(recommendation: ai_pb2.Recommendation) -> dict[str, ai_pb2.RecommendedExercise]:
    return {e.exercise: e for e in recommendation.exercises}


async def test_two_histories_give_two_explained_recommendations(stack: Stack) -> None:
    ada = await stack.register(goal=STRENGTH, equipment=BARBELL_GYM)
    bob = await stack.register(goal=STRENGTH, equipment=BARBELL_GYM)
    # Ada squatted four days ago and struggled on the bench yesterday.
    await stack.log_session(ada, days_ago(4), [("barbell-back-squat", 5, 100.0, 7.0)] * 5)
    await stack.log_session(ada, days_ago(1), [("barbell-bench-press", 8, 60.0, 9.5),
                                               ("barbell-bench-press", 7, 60.0, 9.5),
                                               ("barbell-bench-press", 6, 60.0, 10.0)])
    # Bob benched five days ago and squatted yesterday.
    await stack.log_session(bob, days_ago(5), [("barbell-bench-press", 5, 80.0, 8.0)] * 5)
    await stack.log_session(bob, days_ago(1), [("barbell-back-squat", 5, 120.0, 8.0)] * 5)
    focus = [fit.MUSCLE_GROUP_QUADRICEPS, fit.MUSCLE_GROUP_CHEST]
    for_ada = await recommend(stack, ada, focus_muscle_groups=focus, max_exercises=4)
    for_bob = await recommend(stack, bob, focus_muscle_groups=focus, max_exercises=4)

    assert not for_ada.degraded and not for_bob.degraded
    assert for_ada.user == ada.name and for_bob.user == bob.name
    squat = by_exercise(for_ada)["exercises/barbell-back-squat"]
    assert (squat.sets, squat.reps, squat.weight_kg) == (5, 5, 102.5)
    assert any("5x5 at 100 kg with RPE 7 last time, so the load goes up by 2.5 kg" in r for r in squat.reasons)
    assert fit.MUSCLE_GROUP_CHEST not in for_ada.focus_muscle_groups
    assert fit.MUSCLE_GROUP_QUADRICEPS in for_ada.focus_muscle_groups
    assert any(r.startswith("You asked for your chest") and "left out" in r for r in for_ada.reasons)
    assert any("quadriceps" in r and "rested for 4 days" in r for r in for_ada.reasons)

    bench = by_exercise(for_bob)["exercises/barbell-bench-press"]
    assert (bench.sets, bench.reps, bench.weight_kg) == (5, 5, 82.5)
    assert any("5x5 at 80 kg with RPE 8 last time, so the load goes up by 2.5 kg" in r for r in bench.reasons)
    assert fit.MUSCLE_GROUP_QUADRICEPS not in for_bob.focus_muscle_groups
    assert any(r.startswith("You asked for your quadriceps") and "left out" in r for r in for_bob.reasons)
    assert set(by_exercise(for_ada)) != set(by_exercise(for_bob))
    for recommendation in (for_ada, for_bob):
        assert recommendation.reasons[0].startswith("Your goal is strength")
        assert all(e.reasons for e in recommendation.exercises)
        assert 0 < recommendation.estimated_duration_minutes <= 60


async def test_missed_reps_repeat_or_reduce_the_load(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH, equipment=BARBELL_GYM)
    # A hard but complete squat session, and a row session well short of its reps.
    await stack.log_session(caller, days_ago(5), [("barbell-back-squat", 5, 110.0, 9.0)] * 5)
    await stack.log_session(caller, days_ago(4), [("barbell-bent-over-row", 8, 70.0, 9.5),
                                                  ("barbell-bent-over-row", 5, 70.0, 10.0),
                                                  ("barbell-bent-over-row", 4, 70.0, 10.0)])
    recommendation = await recommend(stack, caller, focus_muscle_groups=[fit.MUSCLE_GROUP_QUADRICEPS,
                                                                          fit.MUSCLE_GROUP_UPPER_BACK])
    chosen = by_exercise(recommendation)
    squat, row = chosen["exercises/barbell-back-squat"], chosen["exercises/barbell-bent-over-row"]
    assert squat.weight_kg == 110.0
    assert any("so repeat it until it feels easier" in r for r in squat.reasons)
    assert row.weight_kg == 67.5  # 70 kg less 5%, to the nearest 2.5 kg plate step
    assert row.reps == 8
    assert any("You got 17 of 24 reps at 70 kg last time, so the load drops by 5%" in r for r in row.reasons)


async def test_estimated_maximum_sets_the_load_without_recent_sessions(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH, equipment=BARBELL_GYM)
    # Forty days ago: outside the four weeks of history read, but its record stays.
    await stack.log_session(caller, days_ago(40), [("conventional-deadlift", 5, 140.0, 8.0)] * 3)
    recommendation = await recommend(stack, caller, focus_muscle_groups=[fit.MUSCLE_GROUP_HAMSTRINGS])
    deadlift = by_exercise(recommendation)["exercises/conventional-deadlift"]
    # Epley: 140 * (1 + 5/30) = 163.3 kg; 5 reps at RPE 7.5 is 80% of it, 130.7, so 130 kg.
    assert deadlift.weight_kg == 130.0
    assert any("estimated one-rep maximum is 163.3 kg" in r for r in deadlift.reasons)


async def test_a_new_user_gets_a_basic_workout_for_their_goal_and_equipment(stack: Stack) -> None:
    caller = await stack.register(goal=HYPERTROPHY)
    recommendation = await recommend(stack, caller, available_minutes=30)
    assert not recommendation.degraded
    assert 2 <= len(recommendation.exercises) <= 3
    assert recommendation.estimated_duration_minutes <= 30
    assert any("no completed workouts in the last 28 days" in r for r in recommendation.reasons)
    assert any("body-weight" in r for r in recommendation.reasons)
    for exercise in recommendation.exercises:
        assert exercise.weight_kg == 0
        assert any("No history for this exercise yet" in r or "Hold each set" in r for r in exercise.reasons)


async def test_equipment_of_the_day_and_limits(stack: Stack) -> None:
    caller = await stack.register(goal=HYPERTROPHY, equipment=BARBELL_GYM)
    recommendation = await recommend(stack, caller, equipment=[fit.EQUIPMENT_DUMBBELL], max_exercises=3,
                                     available_minutes=120)
    assert len(recommendation.exercises) == 3
    catalog = await stack.catalog_equipment(caller)
    for exercise in recommendation.exercises:
        assert catalog[exercise.exercise] <= {fit.EQUIPMENT_DUMBBELL, fit.EQUIPMENT_BODYWEIGHT}, exercise.exercise
    assert any("dumbbell" in r for r in recommendation.reasons)


async def test_the_fallback_catalog_names_real_exercises(stack: Stack) -> None:
    caller = await stack.register()
    catalog = await stack.catalog_equipment(caller)
    assert {e.name for e in FALLBACK} <= set(catalog)


async def test_another_users_recommendation_is_not_found(stack: Stack) -> None:
    ada, bob = await stack.register(), await stack.register()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.ai.RecommendNextWorkout(ai_service_pb2.RecommendNextWorkoutRequest(user=bob.name),
                                            metadata=ada.metadata)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_request_rules_come_from_the_contract(stack: Stack) -> None:
    caller = await stack.register()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await recommend(stack, caller, available_minutes=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "available_minutes" in (error.value.details() or "")


# --- degraded mode -----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def doomed(backend: str, tmp_path_factory: pytest.TempPathFactory,
                 request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """A private trio of services whose workout (or user) service the test may stop."""
    mongo_url = request.getfixturevalue("mongo_url") if backend == "mongo" else ""
    redis_url = request.getfixturevalue("redis_url") if backend == "mongo" else ""
    trio = await start_stack(backend, tmp_path_factory.mktemp(f"ai-doomed-{backend}"), mongo_url, redis_url)
    yield trio
    await stop_stack(trio)


async def test_without_the_workout_service_the_answer_is_degraded_and_in_time(doomed: Stack) -> None:
    caller = await doomed.register(goal=STRENGTH, equipment=BARBELL_GYM)
    await doomed.log_session(caller, days_ago(3), [("barbell-back-squat", 5, 100.0, 7.0)] * 5)
    healthy = await recommend(doomed, caller)
    assert not healthy.degraded
    plan = await doomed.ai.CreatePlan(
        ai_service_pb2.CreatePlanRequest(parent=caller.name, plan=ai_pb2.Plan(goal=STRENGTH, days_per_week=2,
                                                                              week_count=2)),
        metadata=caller.metadata,
    )
    await doomed.stop("workout")

    for attempt in range(8):  # after five failures the circuit breaker answers at once
        degraded = await recommend(doomed, caller, deadline=DEGRADED_DEADLINE_SECONDS)
        assert degraded.degraded, attempt
        assert "workout history could not be read" in degraded.degraded_reason
        assert degraded.exercises and all(e.weight_kg == 0 for e in degraded.exercises)
        assert degraded.reasons[0].startswith("Your goal is strength")  # the user service still answers

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await doomed.ai.AdaptPlan(ai_service_pb2.AdaptPlanRequest(name=plan.name), metadata=caller.metadata)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    # Plans can still be made: loads become RPE targets, since no maximum can be read.
    rpe_plan = await doomed.ai.CreatePlan(
        ai_service_pb2.CreatePlanRequest(parent=caller.name, plan=ai_pb2.Plan(goal=STRENGTH, days_per_week=2,
                                                                              week_count=2)),
        metadata=caller.metadata,
    )
    prescriptions = [p for w in rpe_plan.weeks for d in w.days for p in d.exercises]
    assert prescriptions and all(p.WhichOneof("intensity") == "target_rpe" for p in prescriptions)


async def test_without_the_user_service_goals_fall_back_to_defaults(doomed: Stack) -> None:
    caller = await doomed.register(goal=STRENGTH, equipment=BARBELL_GYM)
    await doomed.stop("user")
    recommendation = await recommend(doomed, caller, deadline=DEGRADED_DEADLINE_SECONDS)
    assert recommendation.degraded
    assert "goals and equipment could not be read" in recommendation.degraded_reason
    assert any("goal could not be read" in r for r in recommendation.reasons)


async def test_a_short_caller_deadline_bounds_the_wait(doomed: Stack) -> None:
    caller = await doomed.register(goal=STRENGTH)
    await doomed.stop("workout")
    # The answer must beat the caller's 0.5 s deadline, or the call ends in DEADLINE_EXCEEDED.
    recommendation = await doomed.ai.RecommendNextWorkout(
        ai_service_pb2.RecommendNextWorkoutRequest(user="users/me"), metadata=caller.metadata, timeout=0.5,
    )
    assert recommendation.degraded
    # This process never read the catalog, so it answers from the built-in common exercises.
    assert {e.exercise for e in recommendation.exercises} <= {e.name for e in FALLBACK}
    assert any("catalog could not be read" in r for r in recommendation.reasons)
