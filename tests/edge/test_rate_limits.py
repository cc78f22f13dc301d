"""Client quotas at the edge: per client address and per user, locally and through the global service.

A stack of its own with small quotas (the session stack's are too generous to ever bite). Each test
sends from a loopback address of its own, so that the per-address buckets of different tests never
mix. Loops are bounded in count; waits for a refill poll with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc
import pytest
from fittracker.user.v1 import user_service_pb2, user_service_pb2_grpc

from tests.edge.conftest import SERVICE_ENV, Edge, LogLines, Reply
from tools import envoy_config
from tools.devstack import EnvoyEdge, Stack
from tools.envoy_config import Limit

pytestmark = pytest.mark.edge

#: Per address: 10 at once, then 2 a second (a token every 0.5 s).
IP_LIMIT = Limit(2, "second", burst=10)
#: Per user: 4 at once, then 1 a second; the lower fill rate, so its bucket is the one reported.
USER_LIMIT = Limit(1, "second", burst=4)
RESOURCE_EXHAUSTED = 8


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """One user replica behind an Envoy with small quotas counted in Envoy."""
    logs = LogLines()
    stack = Stack(tmp_path_factory.mktemp("limited-stack"), services=["user"], replicas=1, use_free_ports=True,
                  service_env=SERVICE_ENV, ip_limit=IP_LIMIT, user_limit=USER_LIMIT, sink=logs.append)
    stack.start(timeout=45)
    try:
        yield Edge(stack, logs)
    finally:
        stack.stop()


def until_limited(call: Callable[[], Reply], *, most: int) -> tuple[list[Reply], Reply | None]:
    """Call ``call()`` until a 429, at most ``most`` times: (the 200s, the 429 or None)."""
    passed: list[Reply] = []
    for _ in range(most):
        reply: Reply = call()
        if reply.status == 429:
            return passed, reply
        assert reply.status == 200, reply.body
        passed.append(reply)
    return passed, None


def test_burst_over_the_address_quota_gets_429_then_recovers(limited: Edge) -> None:
    client = limited.from_address("127.0.0.11")
    started = time.monotonic()

    passed, refused = until_limited(lambda: client.json("GET", "/v1/auth/jwks"), most=40)

    elapsed = time.monotonic() - started
    assert refused is not None, f"{len(passed)} calls and no 429"
    # The bucket's 10, plus whatever refilled while the burst ran (2 a second).
    assert IP_LIMIT.bucket <= len(passed) <= IP_LIMIT.bucket + IP_LIMIT.requests * elapsed + 1
    first = passed[0].headers
    assert (first["x-ratelimit-limit"], first["x-ratelimit-remaining"]) == (str(IP_LIMIT.bucket), "9")
    assert refused.json()["code"] == RESOURCE_EXHAUSTED
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert int(refused.headers["retry-after"]) >= 1
    # Another address has a bucket of its own.
    assert limited.from_address("127.0.0.12").json("GET", "/v1/auth/jwks").status == 200

    # A token comes back (after 1/rate seconds): poll, bounded by a deadline, until the address passes.
    refused_at = time.monotonic()
    deadline = refused_at + 5.0
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(client.json("GET", "/v1/auth/jwks").status)
        if statuses[-1] == 200:
            break
        time.sleep(0.1)  # poll interval; each refused probe costs no token
    assert statuses[-1] == 200, statuses
    assert set(statuses[:-1]) <= {429}


def test_user_quota_applies_per_user(limited: Edge) -> None:
    ada = limited.from_address("127.0.0.21").register()
    bob = limited.from_address("127.0.0.22").register()
    shared = limited.from_address("127.0.0.13")

    passed, refused = until_limited(lambda: shared.json("GET", "/v1/users/me", token=ada.access_token), most=20)

    assert refused is not None
    assert USER_LIMIT.bucket <= len(passed) <= USER_LIMIT.bucket + 2
    # The user's bucket is reported: it refills slowest of those the call drew on.
    assert passed[0].headers["x-ratelimit-limit"] == str(USER_LIMIT.bucket)
    assert refused.json()["code"] == RESOURCE_EXHAUSTED
    # Same address, other user: the address bucket still has tokens, Bob's is full.
    other = shared.json("GET", "/v1/users/me", token=bob.access_token)
    assert other.status == 200, other.body
    assert other.json()["name"] == bob.name


def test_over_quota_grpc_and_grpc_web_get_resource_exhausted(limited: Edge) -> None:
    cleo = limited.from_address("127.0.0.23").register()
    metadata = (("authorization", f"Bearer {cleo.access_token}"),)
    codes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(limited.grpc_target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        for _ in range(20):
            try:
                stub.GetUser(user_service_pb2.GetUserRequest(name="users/me"), metadata=metadata, timeout=5)
            except grpc.RpcError as error:
                codes.append(error.code())
                break
            codes.append(grpc.StatusCode.OK)

    web = limited.grpc_web("/fittracker.user.v1.UserService/GetUser",
                           user_service_pb2.GetUserRequest(name="users/me"), token=cleo.access_token)

    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
    assert USER_LIMIT.bucket <= codes.count(grpc.StatusCode.OK) <= USER_LIMIT.bucket + 2
    # A well-formed trailers-only gRPC-Web reply, as a browser client expects, with the quota headers.
    assert (web.http_status, web.grpc_status, web.messages) == (200, RESOURCE_EXHAUSTED, [])
    assert web.headers["content-type"].startswith("application/grpc-web")
    assert web.headers["x-ratelimit-remaining"] == "0"


# --- the global quota: one count in Redis for every edge ----------------------------------------


@pytest.fixture(scope="module")
def two_edges(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[Edge, Edge]]:
    """A user replica behind two Envoys whose quotas live in one rate-limit service over Redis."""
    logs = LogLines()
    work = tmp_path_factory.mktemp("global-stack")
    stack = Stack(work, services=["user"], replicas=1, use_free_ports=True, service_env=SERVICE_ENV,
                  ip_limit=Limit(100_000, "minute"), user_limit=Limit(5, "minute"),
                  global_rate_limit_redis=redis_url, sink=logs.append)
    stack.start(timeout=45)
    second: EnvoyEdge | None = None
    try:
        # The second edge: same upstreams and quota service, ports of its own.
        config = work / "envoy-b.yaml"
        services = envoy_config.read_services(envoy_config.ROOT / envoy_config.DESCRIPTOR)
        config.write_text(envoy_config.render(services, stack.topology,
                                              replace(stack.options, listen_port=0, admin_port=0)))
        second = EnvoyEdge("envoy-b", config, work, logs.append)
        second.start()
        second.wait_ready(time.monotonic() + 30)
        first = Edge(stack, logs)
        yield first, first.via(second.edge_port)
    finally:
        if second is not None:
            second.stop()
        stack.stop()


def test_global_user_quota_is_shared_by_both_edges(two_edges: tuple[Edge, Edge]) -> None:
    first, second = two_edges
    limit = 5
    for _attempt in range(2):
        # A fresh user per attempt: a fixed one-minute window may roll over mid-sequence (rarely).
        user = first.register()
        seen: list[tuple[int, int, int]] = []  # (edge, status, remaining)
        for call in range(limit + 3):
            edge = (first, second)[call % 2]
            reply = edge.json("GET", "/v1/users/me", token=user.access_token)
            assert reply.status in {200, 429}, reply.body
            seen.append((call % 2, reply.status, int(reply.headers["x-ratelimit-remaining"])))
        remaining = [r for _, status, r in seen if status == 200]
        if remaining == sorted(remaining, reverse=True):
            break
    statuses = [status for _, status, _ in seen]
    # One count across both edges: 5 passes in all, then 429 on either edge, remaining 4, 3, ... 0.
    assert statuses == [200] * limit + [429] * 3, seen
    assert [r for _, _, r in seen[:limit]] == list(range(limit - 1, -1, -1)), seen
    assert {edge for edge, status, _ in seen if status == 429} == {0, 1}
    # Per user: another account still passes on both edges.
    other = second.register()
    assert first.json("GET", "/v1/users/me", token=other.access_token).status == 200
    assert second.json("GET", "/v1/users/me", token=other.access_token).status == 200
