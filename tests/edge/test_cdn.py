"""The CDN tier: Debian's Varnish, running tools/cdn_vcl.py's rules, in front of the real edge.

Under a catalog-heavy mix of reads from several members at once, the catalog and JWKS come from
the cache, per-user reads never do (and never reach another member), the members-only catalog
wants a token even when cached, copies vary with the Origin, and an expired copy is revalidated
with the edge's ETag.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.edge.conftest import ORIGIN, Account, Edge, Reply
from tests.servers import RunningServer, start_varnish
from tools import cdn_vcl, envoy_config
from tools.devstack import present_services

pytestmark = [
    pytest.mark.edge,
    pytest.mark.skipif("workout" not in present_services(), reason="the catalog is the workout service's"),
]

#: Share of catalog and JWKS reads the CDN must answer from its cache under the mix below.
REQUIRED_HIT_RATIO = 0.90
#: How long the revalidation test waits for Varnish to revalidate an expired copy.
REVALIDATION_DEADLINE_SECONDS = 20.0


@pytest.fixture(scope="module")
def cdn(tmp_path_factory: pytest.TempPathFactory, edge: Edge) -> Iterator[Callable[[int], Edge]]:
    """Start a Varnish in front of the edge with a TTL cap; returns a client of it."""
    started: list[RunningServer] = []

    def start(max_ttl_seconds: int) -> Edge:
        vcl = cdn_vcl.render(edge.stack.host, edge.edge_port, max_ttl_seconds=max_ttl_seconds)
        server = start_varnish(Path(tmp_path_factory.mktemp("varnish")), vcl)
        started.append(server)
        return edge.via(server.port)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def members(edge: Edge) -> list[Account]:
    """Three members reading at once."""
    return [edge.register() for _ in range(3)]


def cache_status(reply: Reply) -> str:
    """HIT or MISS, as the CDN says."""
    return reply.headers[cdn_vcl.CACHE_STATUS_HEADER]


def test_catalog_heavy_mix_is_served_from_the_cache_and_per_user_reads_never(
    cdn: Callable[[int], Edge], edge: Edge, members: list[Account]
) -> None:
    via_cdn = cdn(300)
    names = [e["name"] for e in edge.json("GET", "/v1/exercises?page_size=10",
                                          token=members[0].access_token).json()["exercises"]]
    shared = ["/v1/exercises?page_size=20", "/v1/exercises?page_size=50", "/v1/auth/jwks",
              *(f"/v1/{name}" for name in names[:5])]
    rng = random.Random(13)  # noqa: S311 (a repeatable request mix, nothing secret)
    # 85% catalog and JWKS, 15% per-user reads, from three members on eight connections at once.
    mix = [(rng.choice(members), rng.choice(shared) if rng.random() < 0.85 else "/v1/users/me")
           for _ in range(400)]

    def read(call: tuple[Account, str]) -> tuple[Account, str, Reply]:
        member, path = call
        return member, path, via_cdn.json("GET", path, token=member.access_token)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(read, mix))

    shared_replies = [r for _, path, r in replies if path != "/v1/users/me"]
    own_replies = [(m, r) for m, path, r in replies if path == "/v1/users/me"]
    assert all(r.status == 200 for r in shared_replies), {r.status for r in shared_replies}
    hits = sum(cache_status(r) == "HIT" for r in shared_replies)
    assert hits / len(shared_replies) >= REQUIRED_HIT_RATIO, (hits, len(shared_replies))
    assert own_replies, "the mix had no per-user reads"
    for member, reply in own_replies:
        assert reply.status == 200, reply.body
        assert reply.json()["name"] == member.name  # nobody ever gets another member's profile
        assert cache_status(reply) == "MISS"
        assert reply.headers["cache-control"] == envoy_config.PER_USER_POLICY


def test_the_cached_catalog_still_wants_a_token(cdn: Callable[[int], Edge], members: list[Account]) -> None:
    via_cdn = cdn(300)
    warm = via_cdn.json("GET", "/v1/exercises?page_size=7", token=members[0].access_token)
    again = via_cdn.json("GET", "/v1/exercises?page_size=7", token=members[1].access_token)

    anonymous = via_cdn.json("GET", "/v1/exercises?page_size=7")

    assert (warm.status, again.status) == (200, 200)
    assert cache_status(again) == "HIT"
    assert anonymous.status == 401, anonymous.body
    assert cache_status(anonymous) == "MISS"


def test_copies_vary_with_the_origin(cdn: Callable[[int], Edge]) -> None:
    # The CORS filter answers each browser origin for itself: a copy made for one is not another's.
    via_cdn = cdn(300)
    from_app = via_cdn.json("GET", "/v1/auth/jwks?vary-check", headers={"origin": ORIGIN})
    from_app_again = via_cdn.json("GET", "/v1/auth/jwks?vary-check", headers={"origin": ORIGIN})

    from_elsewhere = via_cdn.json("GET", "/v1/auth/jwks?vary-check", headers={"origin": "https://other.test"})
    without_origin = via_cdn.json("GET", "/v1/auth/jwks?vary-check")

    assert from_app.headers["vary"] == envoy_config.CACHE_VARY
    assert [cache_status(r) for r in (from_app, from_app_again, from_elsewhere, without_origin)] == [
        "MISS", "HIT", "MISS", "MISS"]


def test_an_expired_copy_is_revalidated_with_the_edges_etag(
    cdn: Callable[[int], Edge], members: list[Account]
) -> None:
    via_cdn = cdn(1)  # copies expire after a second, then are revalidated
    token = members[0].access_token
    first = via_cdn.json("GET", "/v1/exercises?page_size=3", token=token)
    assert first.status == 200, first.body

    revalidated = next(poll_until(
        lambda: via_cdn.json("GET", "/v1/exercises?page_size=3", token=token),
        lambda reply: cdn_vcl.REVALIDATED_HEADER in reply.headers,
    ))

    assert revalidated.status == 200
    assert revalidated.headers["etag"] == first.headers["etag"]
    assert revalidated.body == first.body


def poll_until(call: Callable[[], Reply], done: Callable[[Reply], bool]) -> Iterator[Reply]:
    """Repeat ``call`` until ``done`` says its reply is the one, within the revalidation deadline."""
    deadline = time.monotonic() + REVALIDATION_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        reply = call()
        if done(reply):
            yield reply
            return
        time.sleep(0.1)  # the pace of the polling, not a wait for the outcome
    raise AssertionError(f"no revalidation within {REVALIDATION_DEADLINE_SECONDS:.0f}s")
