"""Plans through the real server: design, storage and paging, and adaptation to logged sessions."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import grpc
import pytest
from fittracker.ai.v1 import ai_pb2, ai_service_pb2
from fittracker.common.v1 import fitness_pb2 as fit

from services.ai.planner import target_rpe_of
from tests.ai.conftest import BARBELL_GYM, Caller, SetSpec, Stack, days_ago
from tests.support import field_violations

STRENGTH, HYPERTROPHY, ENDURANCE, WEIGHT_LOSS = (
    fit.FITNESS_GOAL_STRENGTH, fit.FITNESS_GOAL_HYPERTROPHY, fit.FITNESS_GOAL_ENDURANCE, fit.FITNESS_GOAL_WEIGHT_LOSS,
)
ACC, INT, DEL = ai_pb2.WEEK_KIND_ACCUMULATION, ai_pb2.WEEK_KIND_INTENSIFICATION, ai_pb2.WEEK_KIND_DELOAD
SQUAT = "exercises/barbell-back-squat"


async def create(stack: Stack, caller: Caller, request_id: str = "", **fields: Any) -> ai_pb2.Plan:
    plan = ai_pb2.Plan(**fields)
    return await stack.ai.CreatePlan(
        ai_service_pb2.CreatePlanRequest(parent="users/me", plan=plan, request_id=request_id),
        metadata=caller.metadata, timeout=10,
    )


async def adapt(stack: Stack, caller: Caller, plan: ai_pb2.Plan, etag: str = "") -> ai_service_pb2.AdaptPlanResponse:
    return await stack.ai.AdaptPlan(ai_service_pb2.AdaptPlanRequest(name=plan.name, etag=etag),
                                    metadata=caller.metadata, timeout=10)


def today() -> date:
    return datetime.now(UTC).date()


def main_lift(day: ai_pb2.PlanDay) -> ai_pb2.PrescribedExercise:
    return day.exercises[0]


def intensity(p: ai_pb2.PrescribedExercise) -> float:
    return target_rpe_of(p)


# --- design ------------------------------------------------------------------------------------


async def test_a_strength_plan_is_periodised(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH, equipment=BARBELL_GYM)
    plan = await create(stack, caller, goal=STRENGTH, days_per_week=3, week_count=8)
    assert plan.name.startswith(f"{caller.name}/plans/")
    assert plan.display_name == "Strength: 3 days a week for 8 weeks"
    start = date.fromisoformat(plan.start_date)
    assert start.weekday() == 0 and 0 < (start - today()).days <= 7  # the next Monday
    assert [w.kind for w in plan.weeks] == [ACC, ACC, INT, DEL, ACC, ACC, INT, DEL]
    assert sorted(plan.equipment) == sorted(BARBELL_GYM)
    for week in plan.weeks:
        assert [d.date for d in week.days] == [
            (start + timedelta(days=7 * (week.week_number - 1) + offset)).isoformat() for offset in (0, 2, 4)
        ]
        assert [d.day_number for d in week.days] == [1, 2, 3]
    first, second, third, deload = (plan.weeks[i].days[0] for i in range(4))
    assert [main_lift(d).reps for d in (first, second, third)] == [5, 4, 3]
    assert main_lift(second).sets == main_lift(first).sets + 1  # accumulation builds volume
    assert intensity(main_lift(first)) < intensity(main_lift(second)) < intensity(main_lift(third))
    assert main_lift(deload).sets < main_lift(third).sets
    assert intensity(main_lift(deload)) < intensity(main_lift(first))
    assert "(deload)" in deload.focus
    # The second block starts where the first did, half an RPE point harder.
    assert intensity(main_lift(plan.weeks[4].days[0])) == intensity(main_lift(first)) + 0.5
    catalog = await stack.catalog_equipment(caller)
    usable = {*BARBELL_GYM, fit.EQUIPMENT_BODYWEIGHT}
    for day in plan.weeks[0].days:
        assert len(day.exercises) >= 3
        assert len({p.exercise for p in day.exercises}) == len(day.exercises)
        for p in day.exercises:
            assert catalog[p.exercise] <= usable, p.exercise
            assert p.WhichOneof("intensity") == "target_rpe"  # no maxima known yet
    assert {main_lift(d).exercise for d in plan.weeks[0].days} == {
        SQUAT, "exercises/conventional-deadlift", "exercises/barbell-front-squat"}


async def test_known_maxima_become_loads(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH, equipment=BARBELL_GYM)
    await stack.log_session(caller, days_ago(10), [("barbell-back-squat", 5, 120.0, 8.0)] * 3)
    plan = await create(stack, caller, goal=STRENGTH, days_per_week=2, week_count=4)
    squat = main_lift(plan.weeks[0].days[0])
    assert squat.exercise == SQUAT
    # Epley: 120 * (1 + 5/30) = 140 kg; 5 reps at RPE 7.5 is 80%: 112 kg, to the plate step 112.5.
    assert squat.percent_one_rep_max == 80.0
    assert squat.weight_kg == 112.5
    week3 = main_lift(plan.weeks[2].days[0])
    assert week3.weight_kg > squat.weight_kg


@pytest.mark.parametrize(("days", "focus"), [
    (1, ["Full body A"]),
    (2, ["Full body A", "Full body B"]),
    (4, ["Upper body, heavy", "Lower body, heavy", "Upper body, light", "Lower body, light"]),
    (5, ["Upper body", "Lower body", "Push", "Pull", "Legs"]),
    (6, ["Push, heavy", "Pull, heavy", "Legs, heavy", "Push, light", "Pull, light", "Legs, light"]),
    (7, ["Push, heavy", "Pull, heavy", "Legs, heavy", "Push, light", "Pull, light", "Legs, light", "Conditioning"]),
])
async def test_the_split_follows_the_days_per_week(stack: Stack, days: int, focus: list[str]) -> None:
    caller = await stack.register(goal=HYPERTROPHY, equipment=(fit.EQUIPMENT_DUMBBELL, fit.EQUIPMENT_BENCH,
                                                              fit.EQUIPMENT_CABLE, fit.EQUIPMENT_MACHINE))
    plan = await create(stack, caller, goal=HYPERTROPHY, days_per_week=days, week_count=1,
                        start_date=today().isoformat())
    assert [d.focus for d in plan.weeks[0].days] == focus
    dates = [date.fromisoformat(d.date) for d in plan.weeks[0].days]
    assert len(set(dates)) == days and max(dates) - min(dates) < timedelta(days=7)
    assert plan.weeks[0].kind == ACC  # a one-week plan has no deload


@pytest.mark.parametrize(("goal", "reps", "conditioning"), [
    (STRENGTH, 5, False), (HYPERTROPHY, 10, False), (ENDURANCE, 15, True), (WEIGHT_LOSS, 12, True),
])
async def test_the_goal_sets_reps_and_conditioning(stack: Stack, goal: int, reps: int, conditioning: bool) -> None:
    caller = await stack.register(goal=goal)  # no equipment: body weight only
    plan = await create(stack, caller, goal=goal, days_per_week=3, week_count=6)
    assert [w.kind for w in plan.weeks] == [ACC, ACC, INT, DEL, ACC, DEL]  # the last week of a 6-week plan deloads
    catalog = await stack.catalog_equipment(caller)
    for day in plan.weeks[0].days:
        assert main_lift(day).reps in (reps, 0)
        for p in day.exercises:
            assert catalog[p.exercise] == {fit.EQUIPMENT_BODYWEIGHT}, p.exercise
    last = [d.exercises[-1].exercise for d in plan.weeks[0].days]
    assert all(e == "exercises/burpee" for e in last) == conditioning


async def test_create_is_idempotent_under_a_request_id(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH)
    request_id = str(uuid.uuid4())
    first = await create(stack, caller, request_id, goal=STRENGTH, days_per_week=2, week_count=4)
    again = await create(stack, caller, request_id, goal=STRENGTH, days_per_week=2, week_count=4)
    assert again == first
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await create(stack, caller, request_id, goal=STRENGTH, days_per_week=3, week_count=4)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error.value) == ["request_id"]


async def test_plans_are_listed_newest_first_in_pages(stack: Stack) -> None:
    caller = await stack.register()
    created = [await create(stack, caller, goal=ENDURANCE, days_per_week=1, week_count=1, display_name=f"P{i}")
               for i in range(5)]
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = await stack.ai.ListPlans(ai_service_pb2.ListPlansRequest(parent="users/me", page_size=2,
                                                                        page_token=token), metadata=caller.metadata)
        assert len(page.plans) <= 2
        seen += [p.display_name for p in page.plans]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["P4", "P3", "P2", "P1", "P0"]
    got = await stack.ai.GetPlan(ai_service_pb2.GetPlanRequest(name=created[2].name), metadata=caller.metadata)
    assert got == created[2]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.ai.ListPlans(ai_service_pb2.ListPlansRequest(parent="users/me", page_token="bm90LWEtdG9rZW4"),
                                 metadata=caller.metadata)
    assert field_violations(error.value) == ["page_token"]


async def test_other_users_plans_are_not_found(stack: Stack) -> None:
    ada, bob = await stack.register(), await stack.register()
    plan = await create(stack, ada, goal=STRENGTH, days_per_week=1, week_count=1)
    calls: list[Awaitable[object]] = [
        stack.ai.GetPlan(ai_service_pb2.GetPlanRequest(name=plan.name), metadata=bob.metadata),
        stack.ai.AdaptPlan(ai_service_pb2.AdaptPlanRequest(name=plan.name), metadata=bob.metadata),
        stack.ai.ListPlans(ai_service_pb2.ListPlansRequest(parent=ada.name), metadata=bob.metadata),
        stack.ai.CreatePlan(ai_service_pb2.CreatePlanRequest(parent=ada.name, plan=ai_pb2.Plan(
            goal=STRENGTH, days_per_week=1, week_count=1)), metadata=bob.metadata),
        stack.ai.GetPlan(ai_service_pb2.GetPlanRequest(name=f"{ada.name}/plans/nope"), metadata=ada.metadata),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_user_keeps_at_most_twenty_plans(stack: Stack) -> None:
    caller = await stack.register()
    for _ in range(20):
        await create(stack, caller, goal=ENDURANCE, days_per_week=1, week_count=1)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await create(stack, caller, goal=ENDURANCE, days_per_week=1, week_count=1)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(("fields", "field"), [
    ({"goal": STRENGTH, "days_per_week": 0, "week_count": 4}, "plan.days_per_week"),
    ({"goal": STRENGTH, "days_per_week": 8, "week_count": 4}, "plan.days_per_week"),
    ({"goal": STRENGTH, "days_per_week": 3, "week_count": 17}, "plan.week_count"),
    ({"days_per_week": 3, "week_count": 4}, "plan.goal"),
    ({"goal": STRENGTH, "days_per_week": 3, "week_count": 4, "start_date": "2025-02-30"}, "plan.start_date"),
    ({"goal": STRENGTH, "days_per_week": 3, "week_count": 4, "start_date": "1999-01-04"}, "plan.start_date"),
])
async def test_plan_rules(stack: Stack, fields: dict[str, Any], field: str) -> None:
    caller = await stack.register()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await create(stack, caller, **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error.value) == [field]


# --- adaptation --------------------------------------------------------------------------------


def day_sets(day: ai_pb2.PlanDay, *, rpe_change: float = 0.0, reps_change: int = 0,
             short: frozenset[str] = frozenset(), short_rpe: float = 9.5) -> list[SetSpec]:
    """The sets of a plan day as done: as prescribed, or changed; ``short`` exercises get 3 reps a set."""
    sets: list[SetSpec] = []
    for p in day.exercises:
        slug = p.exercise.removeprefix("exercises/")
        weight = p.weight_kg or 20.0
        if p.exercise in short:
            sets += [(slug, 3, weight, short_rpe)] * p.sets
            continue
        rpe = max(1.0, min(10.0, round((target_rpe_of(p) + rpe_change) * 2) / 2))
        sets += [(slug, p.reps + reps_change if p.reps else 0, weight, rpe)] * p.sets
    return sets


def on(day: ai_pb2.PlanDay) -> datetime:
    return datetime.combine(date.fromisoformat(day.date), time(10), tzinfo=UTC)


async def started_plan(stack: Stack, caller: Caller) -> ai_pb2.Plan:
    """A 3-day, 4-week strength plan that started six days ago: week 1 is over, week 2 ahead."""
    await stack.log_session(caller, days_ago(20), [("barbell-back-squat", 5, 120.0, 8.0)] * 3)
    return await create(stack, caller, goal=STRENGTH, days_per_week=3, week_count=4,
                        start_date=(today() - timedelta(days=6)).isoformat())


async def test_easy_sessions_raise_the_loads_ahead(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH, equipment=BARBELL_GYM)
    plan = await started_plan(stack, caller)
    sessions = [await stack.log_session(caller, on(day), day_sets(day, rpe_change=-2, reps_change=2))
                for day in plan.weeks[0].days]
    response = await adapt(stack, caller, plan)
    adapted, adaptation = response.plan, response.adaptation
    assert adaptation.revision == 1 == adapted.revision
    assert list(adapted.adaptations) == [adaptation]
    assert [d.session for d in adapted.weeks[0].days] == [s.name for s in sessions]
    assert adaptation.changes
    assert {c.kind for c in adaptation.changes} == {ai_pb2.PLAN_CHANGE_KIND_LOAD_INCREASED}
    assert {c.week_number for c in adaptation.changes} == {2, 3, 4}
    squat = next(c for c in adaptation.changes if c.after.exercise == SQUAT and c.week_number == 2)
    assert squat.after.percent_one_rep_max == squat.before.percent_one_rep_max + 2.5
    assert squat.after.weight_kg > squat.before.weight_kg
    assert "Barbell Back Squat was easy on day 1 of week 1" in squat.explanation
    assert squat.explanation.endswith("sooner than planned.")
    rpe_based = next(c for c in adaptation.changes if c.after.WhichOneof("intensity") == "target_rpe")
    assert rpe_based.after.target_rpe == rpe_based.before.target_rpe + 0.5
    week2 = next(d for d in adapted.weeks[1].days if d.day_number == squat.day_number)
    assert next(p for p in week2.exercises if p.exercise == SQUAT) == squat.after

    again = await adapt(stack, caller, adapted, etag=adapted.etag)
    assert again.adaptation.revision == 2
    assert list(again.adaptation.changes) == []  # the same sessions are never judged twice
    assert again.plan.weeks == adapted.weeks


async def test_shortfalls_and_missed_sessions_hold_the_plan_back(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH, equipment=BARBELL_GYM)
    plan = await started_plan(stack, caller)
    day1 = plan.weeks[0].days[0]
    short = frozenset({day1.exercises[0].exercise, day1.exercises[1].exercise})
    await stack.log_session(caller, on(day1), day_sets(day1, short=short))  # then days 2 and 3 are missed
    response = await adapt(stack, caller, plan)
    changes = response.adaptation.changes
    repeated = [c for c in changes if c.kind == ai_pb2.PLAN_CHANGE_KIND_WEEK_REPEATED]
    assert [(c.week_number, c.day_number) for c in repeated] == [(2, 0)]
    assert repeated[0].explanation == ("You did 1 of 3 sessions in week 1, so week 2 repeats week 1 before the plan "
                                       "progresses.")
    decreased = [c for c in changes if c.kind == ai_pb2.PLAN_CHANGE_KIND_LOAD_DECREASED]
    assert {c.after.exercise for c in decreased} == short
    squat = next(c for c in decreased if c.after.exercise == SQUAT and c.week_number == 2)
    assert squat.after.percent_one_rep_max == squat.before.percent_one_rep_max - 5
    assert "You did 15 of 25 reps of Barbell Back Squat on day 1 of week 1" in squat.explanation
    adapted = response.plan
    assert adapted.weeks[1].kind == plan.weeks[0].kind
    assert [[p.exercise for p in d.exercises] for d in adapted.weeks[1].days] == \
        [[p.exercise for p in d.exercises] for d in plan.weeks[0].days]
    assert main_lift(adapted.weeks[1].days[0]).reps == main_lift(plan.weeks[0].days[0]).reps  # not progressed
    assert [d.session for d in adapted.weeks[0].days][1:] == ["", ""]


async def test_repeated_hard_sessions_bring_the_deload_forward(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH, equipment=BARBELL_GYM)
    plan = await started_plan(stack, caller)
    for day in plan.weeks[0].days[:2]:
        await stack.log_session(caller, on(day), day_sets(day, short=frozenset({day.exercises[0].exercise}),
                                                          short_rpe=10.0))
    response = await adapt(stack, caller, plan)
    inserted = [c for c in response.adaptation.changes if c.kind == ai_pb2.PLAN_CHANGE_KIND_DELOAD_INSERTED]
    assert [c.week_number for c in inserted] == [2]
    assert "so week 2 becomes a deload week" in inserted[0].explanation
    week2 = response.plan.weeks[1]
    assert week2.kind == DEL
    assert all(main_lift(a).sets < main_lift(b).sets for a, b in zip(week2.days, plan.weeks[1].days, strict=True))
    assert not any(c.week_number == 2 and c.kind == ai_pb2.PLAN_CHANGE_KIND_LOAD_DECREASED
                   for c in response.adaptation.changes)


async def test_a_stale_etag_is_aborted(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH)
    plan = await create(stack, caller, goal=STRENGTH, days_per_week=2, week_count=2,
                        start_date=(today() - timedelta(days=3)).isoformat())
    await adapt(stack, caller, plan, etag=plan.etag)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await adapt(stack, caller, plan, etag=plan.etag)
    assert error.value.code() == grpc.StatusCode.ABORTED


async def test_an_ended_plan_cannot_be_adapted(stack: Stack) -> None:
    caller = await stack.register(goal=STRENGTH)
    plan = await create(stack, caller, goal=STRENGTH, days_per_week=2, week_count=1,
                        start_date=(today() - timedelta(days=30)).isoformat())
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await adapt(stack, caller, plan)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
