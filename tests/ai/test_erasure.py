"""Account deletion: UserDeleted on the user stream erases the user's plans and is answered with DataErased."""

from __future__ import annotations

import uuid

import grpc
import pytest
from fittracker.ai.v1 import ai_pb2, ai_service_pb2
from fittracker.common.v1 import fitness_pb2 as fit
from fittracker.events.v1 import events_pb2

from services.runtime.events import fact_id, make_envelope
from tests.ai.conftest import Stack


def data_erased_for(request_id: str) -> object:
    def match(envelope: events_pb2.EventEnvelope) -> bool:
        return envelope.WhichOneof("payload") == "data_erased" and \
            envelope.data_erased.deletion_request_id == request_id

    return match


async def test_user_deleted_erases_plans_and_answers_the_saga(stack: Stack) -> None:
    gone, kept = await stack.register(), await stack.register()
    doomed = [
        await stack.ai.CreatePlan(ai_service_pb2.CreatePlanRequest(parent="users/me", plan=ai_pb2.Plan(
            goal=fit.FITNESS_GOAL_STRENGTH, days_per_week=2, week_count=2)), metadata=gone.metadata)
        for _ in range(2)
    ]
    survivor = await stack.ai.CreatePlan(ai_service_pb2.CreatePlanRequest(parent="users/me", plan=ai_pb2.Plan(
        goal=fit.FITNESS_GOAL_STRENGTH, days_per_week=2, week_count=2)), metadata=kept.metadata)
    request_id = uuid.uuid4().hex
    deleted = make_envelope("user", gone.user_id, events_pb2.UserDeleted(
        deletion_request_id=request_id, expected_services=["workout", "ai", "notification", "analytics"]))
    # Published twice, as an at-least-once bus may deliver it: the answer is still one fact.
    await stack.bus.publish(deleted)
    await stack.bus.publish(deleted)

    answer = await stack.ai_events.wait_for(data_erased_for(request_id))  # type: ignore[arg-type]
    assert answer.producer == "ai"
    assert answer.user == gone.name
    assert answer.data_erased.service == "ai"
    assert answer.event_id == fact_id("ai.data_erased", request_id)
    for plan in doomed:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stack.ai.GetPlan(ai_service_pb2.GetPlanRequest(name=plan.name), metadata=gone.metadata)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stack.ai.ListPlans(ai_service_pb2.ListPlansRequest(parent="users/me"), metadata=gone.metadata)
    assert list(listed.plans) == []
    still = await stack.ai.GetPlan(ai_service_pb2.GetPlanRequest(name=survivor.name), metadata=kept.metadata)
    assert still == survivor
    answers = [e for e in stack.ai_events.envelopes if data_erased_for(request_id)(e)]  # type: ignore[operator]
    assert len({e.event_id for e in answers}) == 1


async def test_other_events_on_the_user_stream_are_ignored(stack: Stack) -> None:
    caller = await stack.register()
    plan = await stack.ai.CreatePlan(ai_service_pb2.CreatePlanRequest(parent="users/me", plan=ai_pb2.Plan(
        goal=fit.FITNESS_GOAL_ENDURANCE, days_per_week=1, week_count=1)), metadata=caller.metadata)
    await stack.bus.publish(make_envelope("user", caller.user_id, events_pb2.UserRegistered(display_name="X")))
    # A deletion of someone else, published after: once it is answered, the event before it was handled too.
    other = uuid.uuid4().hex
    await stack.bus.publish(make_envelope("user", uuid.uuid4().hex, events_pb2.UserDeleted(deletion_request_id=other)))
    await stack.ai_events.wait_for(data_erased_for(other))  # type: ignore[arg-type]
    assert await stack.ai.GetPlan(ai_service_pb2.GetPlanRequest(name=plan.name), metadata=caller.metadata) == plan
