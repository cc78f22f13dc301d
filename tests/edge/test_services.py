"""Every service through the edge, over each protocol: JSON, gRPC-Web and native gRPC.

One cheap call per service, the same call over each protocol, checked by parsing the reply as the
contract's response message; and the notification stream as the server-streaming case over
gRPC-Web and gRPC. A service whose ``services/<name>/__main__.py`` does not exist yet is not in the
stack: its cases are strict xfails ("service not built yet"), so they turn into failures to fix
the moment the service lands and does not answer, and nothing is skipped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from fittracker.ai.v1 import ai_pb2, ai_service_pb2
from fittracker.analytics.v1 import analytics_pb2, analytics_service_pb2
from fittracker.common.v1 import fitness_pb2
from fittracker.notification.v1 import notification_service_pb2
from fittracker.user.v1 import user_service_pb2
from fittracker.workout.v1 import workout_service_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from tests.edge.conftest import Account, Edge
from tools import envoy_config
from tools.devstack import present_services

pytestmark = pytest.mark.edge

PRESENT = set(present_services())


@dataclass(frozen=True)
class Call:
    """One cheap call of a service, as JSON (verb, path, body) and as a gRPC method."""

    service: str
    method: str
    request: Message
    response: type[Message]
    json_verb: str
    json_path: str
    json_body: dict[str, Any] | None = None
    authenticated: bool = True


CALLS = [
    Call("user", "/fittracker.user.v1.UserService/GetJwks", user_service_pb2.GetJwksRequest(),
         user_service_pb2.GetJwksResponse, "GET", "/v1/auth/jwks", authenticated=False),
    Call("workout", "/fittracker.workout.v1.WorkoutService/ListExercises",
         workout_service_pb2.ListExercisesRequest(page_size=1), workout_service_pb2.ListExercisesResponse,
         "GET", "/v1/exercises?page_size=1"),
    Call("ai", "/fittracker.ai.v1.AiService/CreatePlan",
         ai_service_pb2.CreatePlanRequest(parent="users/me", plan=ai_pb2.Plan(
             goal=fitness_pb2.FITNESS_GOAL_STRENGTH, days_per_week=3, week_count=1)),
         ai_pb2.Plan, "POST", "/v1/users/me/plans",
         {"goal": "FITNESS_GOAL_STRENGTH", "days_per_week": 3, "week_count": 1}),
    Call("notification", "/fittracker.notification.v1.NotificationService/GetUnreadCount",
         notification_service_pb2.GetUnreadCountRequest(parent="users/me"),
         notification_service_pb2.GetUnreadCountResponse, "GET", "/v1/users/me/notifications:unreadCount"),
    Call("analytics", "/fittracker.analytics.v1.AnalyticsService/GetUserStats",
         analytics_service_pb2.GetUserStatsRequest(name="users/me/stats"), analytics_pb2.UserStats,
         "GET", "/v1/users/me/stats"),
]


def not_built(service: str) -> list[pytest.MarkDecorator]:
    """The strict xfail of a service that is not in the tree yet."""
    if service in PRESENT:
        return []
    return [pytest.mark.xfail(reason="service not built yet", strict=True)]


def test_the_matrix_covers_every_service() -> None:
    assert sorted(c.service for c in CALLS) == sorted(envoy_config.BASE_PORTS)


def _json(edge: Edge, call: Call, account: Account) -> Message:
    reply = edge.json(call.json_verb, call.json_path, call.json_body,
                      token=account.access_token if call.authenticated else None)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    # Strict: every field of the reply must belong to the contract's response message.
    return json_format.Parse(reply.body, call.response())


def _grpc_web(edge: Edge, call: Call, account: Account) -> Message:
    reply = edge.grpc_web(call.method, call.request, token=account.access_token if call.authenticated else None)
    assert reply.http_status == 200
    assert reply.grpc_status == 0, reply.trailers or reply.headers
    assert len(reply.messages) == 1
    return call.response.FromString(reply.messages[0])


def _grpc(channel: grpc.Channel, call: Call, account: Account) -> Message:
    invoke: grpc.UnaryUnaryMultiCallable[Message, Message] = channel.unary_unary(
        call.method, request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=call.response.FromString)
    metadata = (("authorization", f"Bearer {account.access_token}"),) if call.authenticated else None
    return invoke(call.request, metadata=metadata, timeout=10)


PROTOCOLS: dict[str, Callable[[Edge, grpc.Channel, Call, Account], Message]] = {
    "json": lambda edge, _, call, account: _json(edge, call, account),
    "grpc-web": lambda edge, _, call, account: _grpc_web(edge, call, account),
    "grpc": lambda _, channel, call, account: _grpc(channel, call, account),
}


@pytest.mark.parametrize(("call", "protocol"), [
    pytest.param(call, protocol, id=f"{call.service}-{protocol}", marks=not_built(call.service))
    for call in CALLS for protocol in PROTOCOLS
])
def test_service_answers_over_each_protocol(edge: Edge, channel: grpc.Channel, account: Account,
                                            call: Call, protocol: str) -> None:
    reply = PROTOCOLS[protocol](edge, channel, call, account)

    assert isinstance(reply, call.response)
    if call.service == "ai":
        assert isinstance(reply, ai_pb2.Plan)
        assert reply.name.startswith(f"{account.name}/plans/")
    if call.service == "analytics":
        assert isinstance(reply, analytics_pb2.UserStats)
        assert reply.name == f"{account.name}/stats"


SUBSCRIBE = "/fittracker.notification.v1.NotificationService/Subscribe"


def _subscribe_request() -> notification_service_pb2.SubscribeRequest:
    return notification_service_pb2.SubscribeRequest(parent="users/me", heartbeat_interval_seconds=5)


@pytest.mark.parametrize("protocol", [
    pytest.param(p, marks=not_built("notification")) for p in ("grpc-web", "grpc")
])
def test_subscribe_streams_a_first_heartbeat(edge: Edge, channel: grpc.Channel, account: Account,
                                             protocol: str) -> None:
    if protocol == "grpc-web":
        status, headers, frame = edge.grpc_web_stream_first(SUBSCRIBE, _subscribe_request(),
                                                            token=account.access_token)
        assert status == 200, headers
        assert headers["content-type"].startswith("application/grpc-web")
        first = notification_service_pb2.SubscribeResponse.FromString(frame)
    else:
        stream: grpc.UnaryStreamMultiCallable[Message, notification_service_pb2.SubscribeResponse] = (
            channel.unary_stream(SUBSCRIBE, request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=notification_service_pb2.SubscribeResponse.FromString))
        replies = stream(_subscribe_request(), metadata=(("authorization", f"Bearer {account.access_token}"),),
                         timeout=10)
        try:
            first = next(iter(replies))
        finally:
            replies.cancel()

    assert first.WhichOneof("event") == "heartbeat", json.dumps(json_format.MessageToDict(first))
    assert first.heartbeat.send_time.seconds > 0
