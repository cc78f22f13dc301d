"""Hostile input through the real edge answers 4xx / a client-side status, never a 5xx or a hang.

Each case is one an attacker found, on the protocol they found it: times at the ends of what a
Timestamp holds over JSON; undecodable, oversized and truncated messages over gRPC and gRPC-Web.
Calls carry deadlines (a socket timeout for raw HTTP), so a hang fails the test instead of
stalling it.
"""

from __future__ import annotations

import select
import socket
import struct
from http.client import HTTPConnection

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from fittracker.workout.v1 import workout_service_pb2

from tests.edge.conftest import GRPC_WEB, Account, Edge, parse_grpc_web
from tools.devstack import Stack

pytestmark = pytest.mark.edge

LIST_EXERCISES = "/fittracker.workout.v1.WorkoutService/ListExercises"
YEAR_1, YEAR_9999 = "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"
#: A call that should answer at once gets this long; a hung one fails instead of stalling the suite.
DEADLINE = 5.0

#: (JSON path with {t} for the hostile time, the field it lands in) for every time a request takes.
TIME_QUERIES = [
    ("/v1/users/me/periodReport?start_time={t}&end_time=2025-01-08T00:00:00Z", "start_time"),
    ("/v1/users/me/periodReport?start_time=2025-01-01T00:00:00Z&end_time={t}", "end_time"),
    ("/v1/users/me/exerciseTrends/barbell-back-squat?start_time={t}", "start_time"),
    ("/v1/users/me/exerciseTrends/barbell-back-squat?start_time=2025-01-01T00:00:00Z&end_time={t}", "end_time"),
    ("/v1/users/me/sessions?start_time={t}", "start_time"),
    ("/v1/users/me/sessions?end_time={t}", "end_time"),
    ("/v1/users/me/personalRecordTimeline?start_time={t}", "start_time"),
    ("/v1/users/me/personalRecordTimeline?end_time={t}", "end_time"),
]


def invalid_field(reply_body: dict[str, object]) -> list[str]:
    """The fields a google.rpc.Status JSON body's BadRequest names."""
    fields: list[str] = []
    for detail in reply_body.get("details", []):  # type: ignore[attr-defined]  # a JSON list
        fields += [v["field"] for v in detail.get("field_violations", [])]
    return fields


@pytest.mark.parametrize("moment", [YEAR_1, YEAR_9999])
@pytest.mark.parametrize(("path", "field"), TIME_QUERIES)
def test_times_at_the_ends_of_the_timestamp_range_are_a_400_naming_the_field(
    edge: Edge, account: Account, path: str, field: str, moment: str
) -> None:
    reply = edge.json("GET", path.format(t=moment), token=account.access_token)
    assert reply.status == 400, reply.body
    body = reply.json()
    assert body["code"] == 3
    assert invalid_field(body) == [field], body


@pytest.mark.parametrize("moment", [YEAR_1, "1999-12-31T23:59:59Z", YEAR_9999])
def test_a_session_dated_outside_the_window_is_refused_not_stored(
    edge: Edge, account: Account, moment: str
) -> None:
    # Year 1 used to be stored, and then dead-lettered by analytics when it completed.
    reply = edge.json("POST", "/v1/users/me/sessions:start", {"start_time": moment}, token=account.access_token)
    assert reply.status == 400, reply.body
    assert invalid_field(reply.json()) == ["start_time"]
    listed = edge.json("GET", "/v1/users/me/sessions", token=account.access_token)
    assert listed.status == 200
    assert listed.json()["sessions"] == []


def test_a_session_in_the_window_is_accepted(edge: Edge, account: Account) -> None:
    reply = edge.json("POST", "/v1/users/me/sessions:start", {"start_time": "2000-01-01T00:00:00Z"},
                      token=account.access_token)
    assert reply.status == 200, reply.body


# --- gRPC and gRPC-Web: malformed, oversized and truncated messages ------------------------


def raw_unary(target: str, payload: bytes, token: str) -> grpc.RpcError:
    """Send ``payload`` as the serialized request of ListExercises; the call must fail."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(LIST_EXERCISES)
        with pytest.raises(grpc.RpcError) as raised:
            call(payload, metadata=(("authorization", f"Bearer {token}"),), timeout=DEADLINE)
    return raised.value


def targets(stack: Stack) -> dict[str, str]:
    """The edge and one workout replica, directly."""
    replica = stack.replica("workout", 0).address
    return {"edge": stack.edge_target, "replica": f"{replica.host}:{replica.port}"}


@pytest.mark.parametrize("where", ["edge", "replica"])
def test_undecodable_protobuf_is_invalid_argument_without_internals(
    stack: Stack, account: Account, where: str
) -> None:
    error = raw_unary(targets(stack)[where], b"\xff\xff\xff\xff", account.access_token)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "ListExercisesRequest" in (error.details() or "")
    assert "class" not in (error.details() or "") and "Error" not in (error.details() or "")


def oversized_request() -> bytes:
    """A 5 MB ListExercisesRequest: over the edge's body limit and the replicas' message limit."""
    return workout_service_pb2.ListExercisesRequest(query="a" * (5 << 20)).SerializeToString()


@pytest.mark.parametrize("where", ["edge", "replica"])
def test_a_5_mb_message_is_resource_exhausted(stack: Stack, account: Account, where: str) -> None:
    error = raw_unary(targets(stack)[where], oversized_request(), account.access_token)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()


def grpc_web_post(edge: Edge, body: bytes, token: str) -> tuple[int, dict[str, str]]:
    """POST a raw gRPC-Web body; (HTTP status, status headers and trailers). Fails after DEADLINE."""
    connection = HTTPConnection(edge.stack.host, edge.edge_port, timeout=DEADLINE)
    try:
        connection.request("POST", LIST_EXERCISES, body=body, headers={
            "content-type": GRPC_WEB, "x-grpc-web": "1", "authorization": f"Bearer {token}"})
        response = connection.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        _, trailers = parse_grpc_web(response.read())
        return response.status, {**headers, **trailers}
    finally:
        connection.close()


def grpc_web_over_h2(edge: Edge, body: bytes, token: str) -> dict[str, str]:
    """POST a gRPC-Web body over HTTP/2 and return the response headers, as soon as they come.

    Over HTTP/1.1 an early answer to a body still being sent ends in a connection reset that
    hides it; HTTP/2 (what browsers use with the edge's TLS in front) carries it cleanly.
    """
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection((edge.stack.host, edge.edge_port), timeout=DEADLINE) as sock:
        connection.initiate_connection()
        connection.send_headers(1, [
            (":method", "POST"), (":scheme", "http"), (":authority", "edge"), (":path", LIST_EXERCISES),
            ("content-type", GRPC_WEB), ("x-grpc-web", "1"), ("authorization", f"Bearer {token}"),
        ])
        sent = 0
        while True:
            window = min(connection.local_flow_control_window(1), connection.max_outbound_frame_size)
            can_send = sent < len(body) and window > 0
            if can_send:
                chunk = body[sent:sent + window]
                sent += len(chunk)
                connection.send_data(1, chunk, end_stream=sent == len(body))
            sock.sendall(connection.data_to_send())
            # Keep sending while the window allows; wait for the edge only when it does not.
            readable, _, _ = select.select([sock], [], [], 0 if can_send else DEADLINE)
            if not readable:
                assert can_send, "the edge did not answer in time"
                continue
            data = sock.recv(65536)
            assert data, "the edge closed the connection without answering"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    return {k.decode().lower(): v.decode() for k, v in event.headers}
                assert not isinstance(event, h2.events.StreamReset), event


def test_a_5_mb_grpc_web_message_is_resource_exhausted(edge: Edge, account: Account) -> None:
    payload = oversized_request()
    answer = grpc_web_over_h2(edge, struct.pack(">BI", 0, len(payload)) + payload, account.access_token)
    assert answer[":status"] == "200"
    assert answer["grpc-status"] == "8", answer


@pytest.mark.parametrize("body", [
    struct.pack(">BI", 0, 100) + b"ab",
    struct.pack(">BI", 0, 50) + b"x" * 10 + struct.pack(">BI", 0, 50) + b"y",
    b"\x00\x00",
], ids=["one-cut-frame", "two-cut-frames", "cut-prefix"])
def test_truncated_grpc_web_frames_are_refused_at_once(edge: Edge, account: Account, body: bytes) -> None:
    # They used to hang until the edge's 15 s stream limit, then answer 504.
    status, answer = grpc_web_post(edge, body, account.access_token)
    assert status == 200
    assert answer["grpc-status"] == "3", answer
