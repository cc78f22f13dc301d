"""End-to-end through the real Envoy: JSON, gRPC-Web and native gRPC in front of two replicas each.

Also the contract at the edge (errors, auth, limits, CORS, access log), and what a drained or a
killed replica costs: nothing.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fittracker.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from google.protobuf import field_mask_pb2

from tests.edge.conftest import GRPC_WEB, ORIGIN, PASSWORD, SERVICE_ENV, Account, Edge, LogLines, sign_token
from tests.support import bearer
from tools import envoy_config
from tools.devstack import Stack

pytestmark = pytest.mark.edge

UNAUTHENTICATED = 16
DRAIN_NOTICE_SECONDS = float(SERVICE_ENV["FITTRACKER_DRAIN_NOTICE_SECONDS"])


def sign(stack: Stack, claims: dict[str, Any], *, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    """A token signed with the stack's real key (or ``key``) under the real key id."""
    return sign_token(stack.keys_dir, claims, key=key)


# --- the happy paths, one per protocol ------------------------------------------------------


def test_register_login_and_read_own_profile_over_json(edge: Edge, account: Account) -> None:
    login = edge.json("POST", "/v1/auth:login", {"email": account.email, "password": PASSWORD})
    assert login.status == 200, login.body
    token = login.json()["tokens"]["access_token"]

    me = edge.json("GET", "/v1/users/me", token=token)

    assert me.status == 200, me.body
    assert me.headers["content-type"] == "application/json"
    profile = me.json()
    assert profile["name"] == account.name
    assert profile["email"] == account.email
    # print_options: proto field names, and defaults printed rather than left out.
    assert profile["display_name"] == "Ada"
    assert profile["height_cm"] == 0


def test_read_own_profile_over_grpc_web(edge: Edge, account: Account) -> None:
    reply = edge.grpc_web("/fittracker.user.v1.UserService/GetUser",
                          user_service_pb2.GetUserRequest(name="users/me"), token=account.access_token)

    assert reply.http_status == 200
    assert reply.headers["content-type"].startswith("application/grpc-web")
    assert reply.grpc_status == 0, reply.trailers
    assert len(reply.messages) == 1
    user = user_pb2.User.FromString(reply.messages[0])
    assert user.name == account.name
    assert user.email == account.email


def test_grpc_web_without_token_is_unauthenticated(edge: Edge) -> None:
    reply = edge.grpc_web("/fittracker.user.v1.UserService/GetUser", user_service_pb2.GetUserRequest(name="users/me"))

    assert reply.grpc_status == UNAUTHENTICATED
    assert reply.messages == []


def test_read_own_profile_over_native_grpc(channel: grpc.Channel, account: Account) -> None:
    stub = user_service_pb2_grpc.UserServiceStub(channel)

    user = stub.GetUser(user_service_pb2.GetUserRequest(name="users/me"), metadata=bearer(account.access_token),
                        timeout=5)

    assert user.name == account.name


def test_native_grpc_public_method_needs_no_token(channel: grpc.Channel) -> None:
    stub = user_service_pb2_grpc.UserServiceStub(channel)

    jwks = stub.GetJwks(user_service_pb2.GetJwksRequest(), timeout=5)

    assert [key.kid for key in jwks.keys]


def test_native_grpc_without_token_is_unauthenticated(channel: grpc.Channel) -> None:
    stub = user_service_pb2_grpc.UserServiceStub(channel)

    with pytest.raises(grpc.RpcError) as caught:
        stub.GetUser(user_service_pb2.GetUserRequest(name="users/me"), timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_native_grpc_unknown_method_is_unimplemented(channel: grpc.Channel, account: Account) -> None:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/fittracker.user.v1.UserService/NoSuchMethod")

    with pytest.raises(grpc.RpcError) as caught:
        call(b"", metadata=bearer(account.access_token), timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- the JSON API's contract ----------------------------------------------------------------


def test_update_profile_with_field_mask_over_json(edge: Edge, account: Account) -> None:
    reply = edge.json("PATCH", "/v1/users/me?update_mask=display_name",
                      {"display_name": "Ada Lovelace", "height_cm": 170}, token=account.access_token)

    assert reply.status == 200, reply.body
    assert reply.json()["display_name"] == "Ada Lovelace"
    # Outside the mask: not changed even though the body carried it.
    assert reply.json()["height_cm"] == 0
    assert edge.json("GET", "/v1/users/me", token=account.access_token).json()["display_name"] == "Ada Lovelace"


def test_update_over_native_grpc_matches_json(channel: grpc.Channel, edge: Edge, account: Account) -> None:
    stub = user_service_pb2_grpc.UserServiceStub(channel)

    stub.UpdateUser(
        user_service_pb2.UpdateUserRequest(user=user_pb2.User(name="users/me", weight_kg=61.5),
                                           update_mask=field_mask_pb2.FieldMask(paths=["weight_kg"])),
        metadata=bearer(account.access_token), timeout=5,
    )

    assert edge.json("GET", "/v1/users/me", token=account.access_token).json()["weight_kg"] == 61.5


def test_another_users_profile_is_not_found(edge: Edge, account: Account) -> None:
    other = edge.register()

    reply = edge.json("GET", f"/v1/{other.name}", token=account.access_token)

    assert reply.status == 404, reply.body
    assert reply.json()["code"] == 5
    assert other.email not in reply.body.decode()


def test_malformed_json_is_400(edge: Edge) -> None:
    reply = edge.http("POST", "/v1/users:register", b'{"email": "a@example.com",',
                      {"content-type": "application/json"})

    assert reply.status == 400
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["code"] == 3


def test_invalid_field_is_400_naming_the_field(edge: Edge) -> None:
    reply = edge.json("POST", "/v1/users:register",
                      {"email": "not-an-email", "password": PASSWORD, "display_name": "Ada"})

    assert reply.status == 400, reply.body
    body = reply.json()
    assert body["code"] == 3
    assert "email" in body["message"]
    violations = [v for d in body.get("details", []) if d["@type"].endswith("google.rpc.BadRequest")
                  for v in d["field_violations"]]
    assert [v["field"] for v in violations] == ["email"]


def test_unknown_query_parameter_is_400(edge: Edge, account: Account) -> None:
    reply = edge.json("PATCH", "/v1/users/me?update_mask=display_name&dispaly_name=x",
                      {"display_name": "Ada"}, token=account.access_token)

    assert reply.status == 400
    assert "dispaly_name" in reply.json()["message"]


def test_missing_token_is_401(edge: Edge) -> None:
    reply = edge.json("GET", "/v1/users/me")

    assert reply.status == 401
    assert reply.json()["code"] == UNAUTHENTICATED


@pytest.mark.parametrize("forgery", ["flipped-signature", "other-key", "expired", "garbage", "no-subject"])
def test_bad_token_is_401(edge: Edge, stack: Stack, account: Account, forgery: str) -> None:
    if forgery == "flipped-signature":
        head, payload, signature = account.access_token.split(".")
        middle = len(signature) // 2
        swapped = "A" if signature[middle] != "A" else "B"
        token = f"{head}.{payload}.{signature[:middle]}{swapped}{signature[middle + 1:]}"
    elif forgery == "other-key":
        token = sign(stack, {"sub": account.user_id}, key=ec.generate_private_key(ec.SECP256R1()))
    elif forgery == "expired":
        token = sign(stack, {"sub": account.user_id, "iat": int(time.time()) - 600, "exp": int(time.time()) - 300})
    elif forgery == "no-subject":
        # Passes the edge (it checks signature, issuer, audience, expiry); the service refuses it.
        token = sign(stack, {})
    else:
        token = "not.a.jwt"

    reply = edge.json("GET", "/v1/users/me", token=token)

    assert reply.status == 401, reply.body


def test_token_for_another_audience_is_403(edge: Edge, stack: Stack, account: Account) -> None:
    # Envoy's jwt_authn answers a well-signed token meant for another API with 403, not 401.
    reply = edge.json("GET", "/v1/users/me", token=sign(stack, {"sub": account.user_id, "aud": "someone-else"}))

    assert reply.status == 403, reply.body
    assert reply.json()["code"] == 7


def test_bad_token_on_a_public_method_is_401(edge: Edge) -> None:
    # Optional there, but a token that is sent must still be valid.
    assert edge.json("GET", "/v1/auth/jwks", token="not.a.jwt").status == 401
    assert edge.json("GET", "/v1/auth/jwks").status == 200


def test_unknown_route_is_404(edge: Edge, account: Account) -> None:
    for path in ("/v1/no-such-thing", "/v1/users/me/no-such-thing", "/index.html"):
        reply = edge.json("GET", path, token=account.access_token)
        assert reply.status == 404, path


def test_too_large_body_is_413_or_resource_exhausted(edge: Edge, account: Account) -> None:
    big = "x" * (envoy_config.MIB + 1)

    as_json = edge.json("PATCH", "/v1/users/me?update_mask=display_name", {"display_name": big},
                        token=account.access_token)
    as_grpc_web = edge.grpc_web(
        "/fittracker.user.v1.UserService/UpdateUser",
        user_service_pb2.UpdateUserRequest(user=user_pb2.User(name="users/me", display_name=big)),
        token=account.access_token,
    )

    assert as_json.status == 413
    assert as_json.json()["code"] == 8
    # gRPC-Web gets a gRPC reply with the status a replica gives an oversized message.
    assert as_grpc_web.http_status == 200
    assert as_grpc_web.grpc_status == 8
    assert as_grpc_web.headers["grpc-message"] == "request message larger than the edge accepts"


# --- browsers -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/users/me", "/fittracker.user.v1.UserService/GetUser"])
def test_cors_preflight_for_configured_origin(edge: Edge, path: str) -> None:
    reply = edge.http("OPTIONS", path, headers={
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-grpc-web",
    })

    assert reply.status == 200
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in reply.headers["access-control-allow-headers"]
    assert "x-grpc-web" in reply.headers["access-control-allow-headers"]


def test_cors_preflight_for_other_origin_is_not_allowed(edge: Edge) -> None:
    reply = edge.http("OPTIONS", "/v1/users/me", headers={
        "origin": "https://evil.example", "access-control-request-method": "GET",
    })

    assert "access-control-allow-origin" not in reply.headers


def test_cors_response_exposes_grpc_status_headers(edge: Edge, account: Account) -> None:
    reply = edge.grpc_web("/fittracker.user.v1.UserService/GetUser", user_service_pb2.GetUserRequest(name="users/me"),
                          token=account.access_token, headers={"origin": ORIGIN})

    assert reply.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip() for h in reply.headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed
    assert reply.headers["content-type"] == GRPC_WEB


# --- edge behaviour: identity headers, access log, balancing, draining ----------------------


def test_access_log_line_describes_the_call(edge: Edge, stack: Stack, account: Account) -> None:
    reply = edge.json("GET", "/v1/users/me", token=account.access_token)

    entry = edge.logs.access_log(reply.headers["x-request-id"])

    assert entry["status"] == 200
    assert entry["grpc_status"] == 0
    assert entry["path"] == "/v1/users/me"
    assert entry["grpc_method"] == "/fittracker.user.v1.UserService/GetUser"
    assert entry["upstream_cluster"] == "user"
    assert entry["upstream_host"] in {str(a) for a in stack.topology["user"]}
    assert entry["user_id"] == account.user_id
    assert isinstance(entry["duration_ms"], int)


def test_client_cannot_forge_identity_headers(edge: Edge) -> None:
    reply = edge.json("GET", "/v1/auth/jwks", headers={"x-user-id": "admin", "x-jwt-payload": "e30"})

    assert reply.status == 200
    assert edge.logs.access_log(reply.headers["x-request-id"])["user_id"] is None


def test_calls_are_balanced_over_both_replicas(edge: Edge, stack: Stack, account: Account) -> None:
    hosts: Counter[str] = Counter()
    for _ in range(24):
        reply = edge.json("GET", "/v1/users/me", token=account.access_token)
        assert reply.status == 200
        hosts[edge.logs.access_log(reply.headers["x-request-id"])["upstream_host"]] += 1

    assert set(hosts) == {str(a) for a in stack.topology["user"]}


def test_draining_replica_leaves_rotation_before_its_port_closes(edge: Edge, stack: Stack,
                                                                 account: Account) -> None:
    """SIGTERM: NOT_SERVING first, so Envoy's health check takes the replica out while it still listens.

    Out of rotation means that new calls stop landing on it (access log): the admin's flags
    change a moment before the workers' load balancers act on them.
    """
    replica, other = stack.replica("user", 1), stack.replica("user", 0)
    draining = str(replica.address)
    statuses: Counter[int] = Counter()
    stack.wait_hosts_healthy("user", 2)  # another test may have restarted one

    def batch(size: int = 5) -> list[str]:
        """Upstream hosts of ``size`` calls, sent back to back, then looked up in the access log."""
        replies = [edge.json("GET", "/v1/users/me", token=account.access_token) for _ in range(size)]
        statuses.update(r.status for r in replies)
        return [edge.logs.access_log(r.headers["x-request-id"])["upstream_host"] for r in replies]

    # Both in rotation to begin with: calls land on both (the admin may say healthy a moment earlier).
    seen: set[str] = set()
    for _ in range(20):
        seen.update(batch())
        if draining in seen and str(other.address) in seen:
            break
    assert seen == {draining, str(other.address)}, seen
    out_after: float | None = None
    try:
        replica.child.signal(signal.SIGTERM)
        signalled = time.monotonic()
        clean_since: float | None = None
        for _ in range(100):  # bounded by count and by the drain notice
            started = time.monotonic()
            if draining in batch():
                clean_since = None
            elif clean_since is None:
                clean_since = started
            elif started - signalled < DRAIN_NOTICE_SECONDS:  # two clean batches in a row
                out_after = clean_since - signalled
                break
            if started - signalled > DRAIN_NOTICE_SECONDS:
                break
        still_listening = replica.child.running
        flags = stack.host_flags("user").get(draining, set())
        after = Counter(batch(10))
        exit_code = replica.child.wait(15)
    finally:
        stack.stop_replica(replica)
        stack.restart_replica(replica)
        stack.wait_hosts_healthy("user", 2)

    print(f"\ndrain: no new calls on the replica from {out_after}s after SIGTERM (flags {sorted(flags)}, "
          f"port still open: {still_listening}); calls {dict(statuses)}; then {dict(after)}")
    # Two failed checks, 1 s apart, while the drain notice still keeps the port open.
    assert out_after is not None and out_after < DRAIN_NOTICE_SECONDS, out_after
    assert still_listening
    assert "failed_active_health_check" in flags
    assert set(after) == {str(other.address)}
    assert set(statuses) == {200}, statuses
    assert exit_code == 0


def test_killing_a_replica_under_load_loses_no_read(stack: Stack, account: Account) -> None:
    """SIGKILL one replica while two clients (gRPC and JSON) read steadily: every read still succeeds.

    Reads are retried on a reset (they have no side effects), and new calls that pick the dead
    replica fail to connect and are retried on the other one until health checks remove it.
    """
    victim = stack.replica("user", 1)
    load = ReadLoad(stack, account, seconds=3.0, most_per_client=1500)
    stack.wait_hosts_healthy("user", 2)
    try:
        load.start()
        # Kill once both clients are in full swing (each has 20 answers), not at a guessed moment.
        assert load.warmed_up.wait(timeout=10), "the load did not get going"
        victim.child.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        load.finish()
        flags = stack.host_flags("user").get(str(victim.address), set())
    finally:
        load.finish()
        victim.child.wait(5)
        stack.restart_replica(victim)
        stack.wait_hosts_healthy("user", 2)

    totals = load.totals()
    print(f"\nkill-replica: {totals}, load ran {load.ended - killed_at:.1f}s after the SIGKILL; "
          f"victim flags then: {sorted(flags)}")
    assert totals["sent"] == totals["ok"] + totals["failed"]
    assert totals["failed"] == 0, load.failures
    assert totals["sent"] > 100
    assert load.ended - killed_at > 1.0  # the load did run on past the kill
    assert flags, "Envoy still counted the dead replica as healthy"


class ReadLoad:
    """Two client threads reading the caller's profile, one over gRPC, one over JSON; bounded."""

    def __init__(self, stack: Stack, account: Account, *, seconds: float, most_per_client: int) -> None:
        self.stack, self.account = stack, account
        self.seconds, self.most = seconds, most_per_client
        self.stop = threading.Event()
        self.warmed_up = threading.Event()
        self.counts = {name: Counter[str]() for name in ("grpc", "json")}
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(name,), daemon=True) for name in self.counts]
        self.ended = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def finish(self) -> None:
        """Let the load run its time (it ends sooner only at its count bound), then join it."""
        self.stop.wait(max(0.0, self._started + self.seconds - time.monotonic()))
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self.ended = self.ended or time.monotonic()

    def totals(self) -> dict[str, int]:
        sent = sum(c["sent"] for c in self.counts.values())
        ok = sum(c["ok"] for c in self.counts.values())
        return {"sent": sent, "ok": ok, "failed": sent - ok,
                **{f"{name}_sent": c["sent"] for name, c in self.counts.items()}}

    def _run(self, name: str) -> None:
        count = self.counts[name]
        client = Edge(self.stack, LogLines())  # its own connections, and no one reads its logs
        with grpc.insecure_channel(self.stack.edge_target) as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            for _ in range(self.most):
                if self.stop.is_set():
                    break
                count["sent"] += 1
                try:
                    if name == "grpc":
                        stub.GetUser(user_service_pb2.GetUserRequest(name="users/me"),
                                     metadata=bearer(self.account.access_token), timeout=5)
                    else:
                        reply = client.json("GET", "/v1/users/me", token=self.account.access_token)
                        if reply.status != 200:
                            raise RuntimeError(f"HTTP {reply.status}: {reply.body[:200]!r}")
                except (grpc.RpcError, RuntimeError, OSError) as error:
                    self.failures.append(f"{name}: {error}")
                else:
                    count["ok"] += 1
                if min(c["ok"] for c in self.counts.values()) >= 20:
                    self.warmed_up.set()


def test_edge_health_endpoint(edge: Edge) -> None:
    reply = edge.http("GET", "/healthz")

    assert reply.status == 200

