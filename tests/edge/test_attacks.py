"""What an attacker tried through the real edge, on the protocol each finding was made on.

Identities are never handed on (a deleted account's id stays dead), access tokens end with their
session (logout, deletion) on JSON, gRPC-Web and native gRPC alike, the client address is the one
the edge saw rather than the one a client wrote into X-Forwarded-For, and credentials never travel
in (or get logged from) a query string.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from fittracker.user.v1 import user_service_pb2
from fittracker.workout.v1 import workout_service_pb2, workout_service_pb2_grpc

from tests.edge.conftest import PASSWORD, Account, Edge, LogLines
from tools.devstack import Stack
from tools.envoy_config import CLIENT_ADDRESS_HEADER

pytestmark = pytest.mark.edge

#: Longer than the stack's revocation poll (0.2 s) plus a slow machine's scheduling.
REVOCATION_WAIT_SECONDS = 5.0
GET_ROUTINES = "/fittracker.workout.v1.WorkoutService/ListRoutines"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]


def until_refused(attempt: Callable[[], bool], what: str) -> None:
    """Retry ``attempt`` until it reports a refusal, for at most the revocation bound (and slack)."""
    deadline = time.monotonic() + REVOCATION_WAIT_SECONDS
    while not attempt():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still accepted {REVOCATION_WAIT_SECONDS}s after the session ended")
        time.sleep(0.05)


def register(edge: Edge, email: str, request_id: str = "", display_name: str = "Ada") -> tuple[int, dict[str, Any]]:
    body = {"email": email, "password": PASSWORD, "display_name": display_name}
    if request_id:
        body["request_id"] = request_id
    reply = edge.json("POST", "/v1/users:register", body)
    return reply.status, reply.json()


def assert_token_dead_everywhere(edge: Edge, stack: Stack, token: str) -> None:
    """Within the revocation bound, the token lists, creates and starts nothing on any protocol.

    Each check retries until refused: replicas learn at their next poll, and calls spread over them.
    """
    until_refused(lambda: edge.json("GET", "/v1/users/me/routines", token=token).status == 401, "JSON list")
    until_refused(
        lambda: edge.json("POST", "/v1/users/me/routines", {"display_name": "Leg"}, token=token).status == 401,
        "JSON create",
    )
    until_refused(lambda: edge.json("POST", "/v1/users/me/sessions:start", {}, token=token).status == 401,
                  "JSON start")

    def grpc_web_list() -> bool:
        request = workout_service_pb2.ListRoutinesRequest(parent="users/me")
        return edge.grpc_web(GET_ROUTINES, request, token=token).grpc_status == UNAUTHENTICATED

    until_refused(grpc_web_list, "gRPC-Web list")
    with grpc.insecure_channel(stack.edge_target) as channel:
        stub = workout_service_pb2_grpc.WorkoutServiceStub(channel)

        def native_start() -> bool:
            try:
                stub.StartSession(workout_service_pb2.StartSessionRequest(parent="users/me"),
                                  metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            except grpc.RpcError as err:
                return bool(err.code() == grpc.StatusCode.UNAUTHENTICATED)
            return False

        until_refused(native_start, "native gRPC start")
    # Once every replica knows, nothing gets through any more: a burst over all of them.
    for _ in range(6):
        assert edge.json("POST", "/v1/users/me/routines", {"display_name": "Leg"}, token=token).status == 401
        assert grpc_web_list()


def test_a_deleted_accounts_id_is_never_handed_to_the_next_person(edge: Edge) -> None:
    request_id = str(uuid.uuid4())
    status, d = register(edge, f"d-{uuid.uuid4().hex[:8]}@example.com", request_id)
    assert status == 200
    d_token = d["tokens"]["access_token"]
    assert edge.json("DELETE", "/v1/users/me", token=d_token).status == 200

    # E reuses D's request id with another email: refused, never D's users/<id>.
    status, e_reply = register(edge, f"e-{uuid.uuid4().hex[:8]}@example.com", request_id, display_name="Eve")
    assert status == 400, e_reply
    assert "request_id" in str(e_reply)
    # D's own replay cannot resurrect the account either.
    status, replay = register(edge, d["user"]["email"], request_id)
    assert status == 400 and "deleted" in str(replay), replay
    # A fresh registration of E gets a new id, and D's old token reads nothing of it.
    status, e = register(edge, f"e-{uuid.uuid4().hex[:8]}@example.com", display_name="Eve")
    assert status == 200 and e["user"]["name"] != d["user"]["name"]
    peek = edge.json("GET", f"/v1/{e['user']['name']}", token=d_token)
    assert peek.status in (401, 404) and e["user"]["email"] not in peek.body.decode(), peek.body
    until_refused(lambda: edge.json("GET", "/v1/users/me", token=d_token).status == 401, "D's token")


def test_deleting_the_account_ends_its_access_tokens_on_every_protocol(edge: Edge, stack: Stack) -> None:
    account = edge.register()
    assert edge.json("GET", "/v1/users/me/routines", token=account.access_token).status == 200
    assert edge.json("DELETE", "/v1/users/me", token=account.access_token).status == 200
    assert_token_dead_everywhere(edge, stack, account.access_token)


def test_logout_ends_the_access_token_on_every_protocol(edge: Edge, stack: Stack, account: Account) -> None:
    other_session = edge.json("POST", "/v1/auth:login", {"email": account.email, "password": PASSWORD}).json()
    reply = edge.json("POST", "/v1/auth:logout", {"refresh_token": account.refresh_token},
                      token=account.access_token)
    assert reply.status == 200
    assert_token_dead_everywhere(edge, stack, account.access_token)
    # Only the session logged out of ends: the same user's other login still works.
    other = other_session["tokens"]["access_token"]
    assert edge.json("GET", "/v1/users/me/routines", token=other).status == 200


def test_refresh_token_reuse_ends_the_sessions_access_tokens(edge: Edge, stack: Stack, account: Account) -> None:
    rotated = edge.json("POST", "/v1/auth:refresh", {"refresh_token": account.refresh_token}).json()
    assert edge.json("POST", "/v1/auth:refresh", {"refresh_token": account.refresh_token}).status == 401
    assert_token_dead_everywhere(edge, stack, rotated["tokens"]["access_token"])


def test_login_lockout_counts_the_address_the_edge_saw_not_x_forwarded_for(edge: Edge) -> None:
    """Rotating XFF does not dodge the per-address limit, and a victim's address in XFF locks nobody out."""
    attacker = edge.from_address("127.0.9.1")
    victim = edge.from_address("127.0.9.2")
    victim_account = victim.register()
    # More failures than the per-address allowance (4 x 5), each against another account so the
    # per-account limit never bites first; the edge's own address header cannot be forged either.
    refused = 0
    for attempt in range(44):
        # Half rotate a forged first hop; half name the victim's address as the client.
        forged = f"10.1.{attempt}.7" if attempt < 22 else "127.0.9.2"
        reply = attacker.json(
            "POST", "/v1/auth:login",
            {"email": f"nobody-{attempt}-{uuid.uuid4().hex[:6]}@example.com", "password": "wrong password"},
            headers={"x-forwarded-for": forged, CLIENT_ADDRESS_HEADER: forged},
        )
        assert reply.status in (401, 429), reply.body
        refused += reply.status == 429
    assert refused > 0, "forged X-Forwarded-For values dodged the per-address lock-out"
    # The victim's address appeared in every forged header; the victim still signs in.
    ok = victim.json("POST", "/v1/auth:login", {"email": victim_account.email, "password": PASSWORD})
    assert ok.status == 200, ok.body


def test_a_token_in_the_query_string_is_refused_and_never_logged(
    edge: Edge, account: Account, stack_logs: LogLines
) -> None:
    leaked = f"access_token={account.access_token}"
    json_reply = edge.http("GET", f"/v1/users/me?{leaked}")
    assert json_reply.status in (400, 401), json_reply.body
    web = edge.grpc_web(f"/fittracker.user.v1.UserService/GetUser?{leaked}",
                        user_service_pb2.GetUserRequest(name="users/me"))
    assert web.grpc_status == grpc.StatusCode.UNAUTHENTICATED.value[0], web
    for request_id in (json_reply.headers["x-request-id"], web.headers["x-request-id"]):
        assert account.access_token not in str(edge.logs.access_log(request_id))
    assert not [line for line in stack_logs.lines if account.access_token in line], "a credential was logged"


#: Every list route of the JSON API, each with page tokens of its own.
LIST_ROUTES = (
    "/v1/exercises", "/v1/users/me/routines", "/v1/users/me/sessions", "/v1/users/me/personalRecords",
    "/v1/users/me/plans", "/v1/users/me/notifications", "/v1/users/me/devices",
    "/v1/users/me/personalRecordTimeline",
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged_page_tokens() -> list[str]:
    """What the attacker sent: bodies like ``[1]``, non-UTF-8 bytes, an empty key, and tokens
    minted with the key that used to sit in the source."""
    body = b'{"q":"x","k":[1]}'
    old_key = hashlib.blake2b(body, key=b"fittracker.workout.page-token.v1", digest_size=12).digest()
    return [_b64(b"[1]"), _b64(b"\xff\xfe\x00\x80"), _b64(b'{"":1}'), _b64(body) + "." + _b64(old_key),
            _b64(b'{"c":"x","f":""}'), _b64(b'{"u":"me","t":"9999-99-99","i":1}')]


@pytest.mark.parametrize("route", LIST_ROUTES)
def test_forged_page_tokens_are_400_naming_the_field(edge: Edge, account: Account, route: str) -> None:
    for forged in _forged_page_tokens():
        reply = edge.json("GET", f"{route}?page_token={forged}", token=account.access_token)
        assert reply.status == 400, (route, forged, reply.body)
        assert "page_token" in reply.body.decode()


def test_a_page_token_works_only_for_the_user_it_was_issued_to(edge: Edge, account: Account) -> None:
    first = edge.json("GET", "/v1/exercises?page_size=1", token=account.access_token).json()
    token = first["next_page_token"]
    assert edge.json("GET", f"/v1/exercises?page_size=1&page_token={token}", token=account.access_token).status == 200
    other = edge.register()
    reply = edge.json("GET", f"/v1/exercises?page_size=1&page_token={token}", token=other.access_token)
    assert reply.status == 400 and "page_token" in reply.body.decode()
