"""A person's whole journey through the real edge: every service, JSON and gRPC, events between them.

Register, build a routine, train, set a personal record; the record arrives on an open Subscribe
stream and in the inbox, analytics counts the volume, the ai service recommends from the history,
and deleting the account leaves nothing of theirs readable anywhere.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from typing import Any

import grpc
import pytest
from fittracker.notification.v1 import notification_service_pb2, notification_service_pb2_grpc

from tools.devstack import Stack

SERVICES = ["user", "workout", "ai", "notification", "analytics"]
PASSWORD = "journey password 42"
#: Events cross processes through the bus: allow them this long to arrive.
EVENTUAL_SECONDS = 20.0
#: An operator account: after the deletion the user's own token is void, so erasure is checked by an admin.
ADMIN_EMAIL = "operator@fittracker.test"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """All five services (one replica each, to spare the two cores) behind the real Envoy."""
    running = Stack(
        tmp_path_factory.mktemp("journey"),
        services=SERVICES,
        replicas=1,
        use_free_ports=True,
        service_env={
            "FITTRACKER_ENVIRONMENT": "test",
            "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
            "FITTRACKER_ARGON2_TIME_COST": "1",
            "FITTRACKER_GRACE_SECONDS": "1",
            "FITTRACKER_DRAIN_NOTICE_SECONDS": "0",
            "FITTRACKER_LOG_LEVEL": "WARNING",
            "FITTRACKER_REVOCATION_POLL_SECONDS": "0.2",
            "FITTRACKER_ERASURE_DELAY_SECONDS": "2",
            "FITTRACKER_ADMIN_EMAILS": ADMIN_EMAIL,
        },
        sink=lambda line: None,
    )
    running.start(timeout=90)
    try:
        yield running
    finally:
        running.stop()


class Api:
    """JSON calls through the edge for one user."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.token = ""

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        connection = HTTPConnection(self.stack.host, self.stack.edge_port, timeout=15)
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        try:
            connection.request(method, path, body=None if payload is None else json.dumps(payload), headers=headers)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        return response.status, (json.loads(body) if body else None)

    def ok(self, method: str, path: str, payload: Any = None) -> Any:
        status, body = self.call(method, path, payload)
        assert status == 200, (method, path, status, body)
        return body


def eventually(probe: Callable[[], Any], what: str, timeout: float = EVENTUAL_SECONDS) -> Any:
    """Poll ``probe`` until it returns something truthy, or fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s (last: {result!r})")
        time.sleep(0.1)


def subscribe(stack: Stack, token: str, into: queue.Queue[Any]) -> Callable[[], None]:
    """Hold a native gRPC Subscribe stream open through the edge; return a function that closes it."""
    channel = grpc.insecure_channel(stack.edge_target)
    stub = notification_service_pb2_grpc.NotificationServiceStub(channel)
    call = stub.Subscribe(
        notification_service_pb2.SubscribeRequest(parent="users/me"),
        metadata=(("authorization", f"Bearer {token}"),),
        timeout=60,
    )

    def pump() -> None:
        try:
            for item in call:
                into.put(item)
        except grpc.RpcError as error:
            into.put(error)

    threading.Thread(target=pump, daemon=True).start()

    def close() -> None:
        call.cancel()
        channel.close()

    return close


def test_a_whole_training_journey(stack: Stack) -> None:
    api = Api(stack)
    email = f"journey-{uuid.uuid4().hex[:8]}@example.com"
    registered = api.ok("POST", "/v1/users:register", {"email": email, "password": PASSWORD, "display_name": "Jo"})
    api.token = registered["tokens"]["access_token"]
    user = registered["user"]["name"]

    exercises = api.ok("GET", "/v1/exercises?query=back%20squat&page_size=5")["exercises"]
    squat = exercises[0]["name"]
    routine = api.ok("POST", "/v1/users/me/routines", {
        "display_name": "Leg day",
        "exercises": [{"exercise": squat, "target_sets": 3, "target_reps": 5, "target_weight_kg": 100}],
    })

    arrivals: queue.Queue[Any] = queue.Queue()
    close_stream = subscribe(stack, api.token, arrivals)
    first = arrivals.get(timeout=10)
    assert not isinstance(first, grpc.RpcError), first
    assert first.WhichOneof("event") == "heartbeat"

    session = api.ok("POST", "/v1/users/me/sessions:start", {"routine": routine["name"], "time_zone": "Europe/Paris"})
    for weight, reps in ((60, 8), (100, 5), (105, 5)):
        api.ok("POST", f"/v1/{session['name']}/sets", {
            "exercise": squat, "set_type": "SET_TYPE_WORKING", "reps": reps, "weight_kg": weight, "rpe": 8,
        })
    completed = api.ok("POST", f"/v1/{session['name']}:complete", {})
    assert completed["session"]["state"] == "SESSION_STATE_COMPLETED"
    assert completed["personal_records"], "a first session sets records"
    volume = 60 * 8 + 100 * 5 + 105 * 5

    def record_notification() -> Any:
        while not arrivals.empty():
            item = arrivals.get()
            assert not isinstance(item, grpc.RpcError), item
            if item.WhichOneof("event") == "notification" and item.notification.category == 1:
                return item.notification
        return None

    pushed = eventually(record_notification, "a personal-record notification on the open stream")
    close_stream()
    inbox = api.ok("GET", "/v1/users/me/notifications")["notifications"]
    assert pushed.name in {n["name"] for n in inbox}

    def counted() -> Any:
        current = api.ok("GET", "/v1/users/me/stats")
        return current if current.get("total_sessions") == 1 else None

    stats = eventually(counted, "analytics counting the session")
    assert stats["total_volume_kg"] == pytest.approx(volume)
    timeline = api.ok("GET", "/v1/users/me/personalRecordTimeline")
    assert timeline.get("entries") or timeline.get("records") or timeline.get("personal_records"), timeline

    recommendation = api.ok("POST", "/v1/users/me:recommendNextWorkout", {})
    assert not recommendation["degraded"], recommendation.get("degraded_reason")
    assert recommendation["exercises"] and recommendation["reasons"]
    trained = {squat}
    squat_again = [e for e in recommendation["exercises"] if e["exercise"] in trained]
    assert all(e["weight_kg"] >= 100 for e in squat_again), "progression starts from the logged history"

    admin = Api(stack)
    admin.token = admin.ok("POST", "/v1/users:register", {
        "email": ADMIN_EMAIL, "password": PASSWORD, "display_name": "Operator"})["tokens"]["access_token"]
    api.ok("DELETE", "/v1/users/me")
    assert api.call("GET", "/v1/users/me")[0] == 401, "the deleted account's token ends with it"
    assert admin.call("GET", f"/v1/{user}")[0] == 404
    eventually(lambda: not admin.ok("GET", f"/v1/{user}/sessions").get("sessions"), "sessions erased")
    eventually(lambda: not admin.ok("GET", f"/v1/{user}/routines").get("routines"), "routines erased")
    eventually(
        lambda: admin.call("GET", f"/v1/{user}/notifications")[0] == 404
        or not admin.ok("GET", f"/v1/{user}/notifications").get("notifications"),
        "inbox erased",
    )
    eventually(
        lambda: admin.call("GET", f"/v1/{user}/stats")[0] == 404
        or not admin.ok("GET", f"/v1/{user}/stats").get("total_sessions"),
        "stats erased",
    )
    status, _ = api.call("POST", "/v1/auth:refresh", {"refresh_token": registered["tokens"]["refresh_token"]})
    assert status == 401

