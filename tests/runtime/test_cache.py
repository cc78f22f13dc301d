"""The L1 + Redis cache against a real Redis: hits and misses, invalidation across replicas, TTLs, bounds."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from fittracker.user.v1 import user_pb2

from services.runtime.cache import Cache, CacheMetrics, DocumentCodec, LruTtl, ProtoCodec
from tests.servers import start_redis

pytestmark = pytest.mark.redis

Doc = dict[str, Any]
#: Upper bound on any wait for something asynchronous (a TTL, a resubscription) to happen.
BOUND_SECONDS = 5.0


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """The "database" behind the cache: a dict, counting reads so tests can see cache misses."""

    def __init__(self) -> None:
        self.rows: dict[str, Doc] = {}
        self.reads = 0

    def loader(self, key: str) -> Callable[[], Awaitable[Doc | None]]:
        async def load() -> Doc | None:
            self.reads += 1
            row = self.rows.get(key)
            return dict(row) if row is not None else None

        return load


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def replicas(redis_url: str) -> AsyncIterator[Callable[..., Awaitable[Cache[Doc]]]]:
    """Builds caches that share one name, each with its own Redis client: replicas of a service."""
    name = f"t{uuid.uuid4().hex[:8]}"
    made: list[tuple[Cache[Doc], aioredis.Redis]] = []

    async def make(**options: Any) -> Cache[Doc]:
        client = aioredis.Redis.from_url(redis_url)
        cache: Cache[Doc] = Cache(name, DocumentCodec(), redis=client, metrics=CacheMetrics(), **options)
        await cache.start()
        made.append((cache, client))
        return cache

    yield make
    for cache, client in made:
        await cache.close()
        await client.aclose()


def lookups(cache: Cache[Any], layer: str, result: str) -> float:
    registry = cache._metrics.registry
    value = registry.get_sample_value(
        "cache_lookups_total", {"cache": cache.name, "layer": layer, "result": result}
    )
    return value or 0.0


async def test_a_miss_loads_once_then_l1_serves(replicas: Callable[..., Awaitable[Cache[Doc]]]) -> None:
    store = Store()
    store.rows["u1"] = {"name": "Ada"}
    cache = await replicas()
    assert await cache.get_or_load("u1", store.loader("u1")) == {"name": "Ada"}
    assert await cache.get_or_load("u1", store.loader("u1")) == {"name": "Ada"}
    assert store.reads == 1
    assert lookups(cache, "l1", "hit") == 1
    assert lookups(cache, "l1", "miss") == 1
    assert lookups(cache, "l2", "miss") == 1


async def test_another_replica_reads_the_value_from_redis(replicas: Callable[..., Awaitable[Cache[Doc]]]) -> None:
    store = Store()
    store.rows["u1"] = {"name": "Ada"}
    first, second = await replicas(), await replicas()
    await first.get_or_load("u1", store.loader("u1"))
    assert await second.get_or_load("u1", store.loader("u1")) == {"name": "Ada"}
    assert store.reads == 1
    assert lookups(second, "l2", "hit") == 1


async def test_absent_rows_are_not_cached(replicas: Callable[..., Awaitable[Cache[Doc]]]) -> None:
    store = Store()
    cache = await replicas()
    assert await cache.get_or_load("nobody", store.loader("nobody")) is None
    store.rows["nobody"] = {"name": "Late"}
    assert await cache.get_or_load("nobody", store.loader("nobody")) == {"name": "Late"}


async def test_a_write_on_one_replica_is_read_at_once_on_every_replica(
    replicas: Callable[..., Awaitable[Cache[Doc]]],
) -> None:
    store = Store()
    store.rows["u1"] = {"name": "Ada"}
    writer, reader = await replicas(), await replicas()
    for cache in (writer, reader):
        assert await cache.get_or_load("u1", store.loader("u1")) == {"name": "Ada"}
    assert reader.l1.get("u1") == {"name": "Ada"}  # the reader serves from L1 now

    store.rows["u1"] = {"name": "Ada L."}
    await writer.invalidate("u1")  # returns once every replica dropped its L1 copy

    assert await reader.get_or_load("u1", store.loader("u1")) == {"name": "Ada L."}
    assert await writer.get_or_load("u1", store.loader("u1")) == {"name": "Ada L."}
    assert writer._metrics.registry.get_sample_value(
        "cache_invalidation_ack_timeouts_total", {"cache": writer.name}
    ) == 0


async def test_a_load_that_raced_a_write_is_not_cached(replicas: Callable[..., Awaitable[Cache[Doc]]]) -> None:
    """Reader loads the old row, the writer writes and invalidates, then the reader's load returns."""
    store = Store()
    store.rows["u1"] = {"name": "old"}
    reader, writer = await replicas(), await replicas()
    loaded_old, release = asyncio.Event(), asyncio.Event()

    async def slow_old_read() -> Doc | None:
        row = dict(store.rows["u1"])
        loaded_old.set()
        await release.wait()
        return row

    reading = asyncio.create_task(reader.get_or_load("u1", slow_old_read))
    await loaded_old.wait()
    store.rows["u1"] = {"name": "new"}
    await writer.invalidate("u1")
    release.set()
    assert await reading == {"name": "old"}  # that caller read before the write: fine for it

    # ... but nobody is served the old row afterwards, from either layer.
    assert await reader.get_or_load("u1", store.loader("u1")) == {"name": "new"}
    assert await writer.get_or_load("u1", store.loader("u1")) == {"name": "new"}


async def test_concurrent_misses_share_one_load(replicas: Callable[..., Awaitable[Cache[Doc]]]) -> None:
    store = Store()
    store.rows["u1"] = {"name": "Ada"}
    cache = await replicas()
    gate = asyncio.Event()
    calls = 0

    async def gated() -> Doc | None:
        nonlocal calls
        calls += 1
        await gate.wait()
        return dict(store.rows["u1"])

    readers = [asyncio.create_task(cache.get_or_load("u1", gated)) for _ in range(10)]
    await asyncio.sleep(0)  # let every reader reach the cache before the load finishes
    gate.set()
    assert [await r for r in readers] == [{"name": "Ada"}] * 10
    assert calls == 1


async def test_a_failed_load_reaches_every_waiter_and_is_not_cached(
    replicas: Callable[..., Awaitable[Cache[Doc]]],
) -> None:
    cache = await replicas()

    async def broken() -> Doc | None:
        raise ConnectionError("store down")

    with pytest.raises(ConnectionError):
        await cache.get_or_load("u1", broken)
    store = Store()
    store.rows["u1"] = {"name": "back"}
    assert await cache.get_or_load("u1", store.loader("u1")) == {"name": "back"}


async def test_l1_entries_expire_after_their_ttl() -> None:
    clock = FakeClock()
    cache: Cache[Doc] = Cache("ttl", DocumentCodec(), redis=None, metrics=CacheMetrics(), l1_ttl=2.0, clock=clock)
    store = Store()
    store.rows["u1"] = {"name": "Ada"}
    await cache.get_or_load("u1", store.loader("u1"))
    clock.now += 1.9
    await cache.get_or_load("u1", store.loader("u1"))
    assert store.reads == 1
    clock.now += 0.2
    await cache.get_or_load("u1", store.loader("u1"))
    assert store.reads == 2


async def test_redis_entries_expire_after_their_ttl(replicas: Callable[..., Awaitable[Cache[Doc]]]) -> None:
    cache = await replicas(l1_max_entries=0, l2_ttl=0.2)  # L1 off: every read asks Redis
    store = Store()
    store.rows["u1"] = {"name": "Ada"}
    await cache.get_or_load("u1", store.loader("u1"))
    assert await cache.get("u1") == {"name": "Ada"}
    deadline = time.monotonic() + BOUND_SECONDS
    while await cache.get("u1") is not None:
        assert time.monotonic() < deadline, "the Redis entry outlived its TTL by seconds"
        await asyncio.sleep(0.05)


def test_l1_keeps_only_the_most_recently_used_entries() -> None:
    l1 = LruTtl(max_entries=3, ttl=60.0, clock=FakeClock())
    for key in "abc":
        l1.put(key, key.upper(), version=0)
    assert l1.get("a") == "A"  # "a" is now the most recently used; "b" the least
    l1.put("d", "D", version=0)
    l1.put("e", "E", version=0)
    assert len(l1) == 3
    assert {k for k in "abcde" if isinstance(l1.get(k), str)} == {"a", "d", "e"}


def test_an_older_load_cannot_overwrite_a_newer_invalidation() -> None:
    l1 = LruTtl(max_entries=10, ttl=60.0, clock=FakeClock())
    l1.tombstone("u1", version=5)
    assert not l1.put("u1", "loaded under 4", version=4)
    assert l1.put("u1", "loaded under 5", version=5)
    assert l1.get("u1") == "loaded under 5"


async def test_without_redis_invalidation_is_local_and_others_catch_up_within_the_ttl() -> None:
    clock = FakeClock()
    store = Store()
    store.rows["u1"] = {"name": "Ada"}
    metrics = CacheMetrics()
    here: Cache[Doc] = Cache("solo", DocumentCodec(), redis=None, metrics=metrics, clock=clock)
    there: Cache[Doc] = Cache("solo", DocumentCodec(), redis=None, metrics=CacheMetrics(), clock=clock)
    await here.get_or_load("u1", store.loader("u1"))
    await there.get_or_load("u1", store.loader("u1"))
    store.rows["u1"] = {"name": "Ada L."}
    await here.invalidate("u1")
    assert await here.get_or_load("u1", store.loader("u1")) == {"name": "Ada L."}
    # The documented limit: another process keeps its copy until the (short) L1 TTL ends.
    assert await there.get_or_load("u1", store.loader("u1")) == {"name": "Ada"}
    clock.now += here.l1.ttl + 0.01
    assert await there.get_or_load("u1", store.loader("u1")) == {"name": "Ada L."}


async def test_a_replica_that_never_acknowledges_delays_the_write_only_up_to_the_timeout(
    replicas: Callable[..., Awaitable[Cache[Doc]]], redis_client: aioredis.Redis,
) -> None:
    writer = await replicas(ack_timeout=0.2)
    silent = redis_client.pubsub()
    await silent.subscribe(f"cache-invalidate:{writer.name}")  # subscribed, never answers
    try:
        # A deadline on the call, not a stopwatch: a write that waited for the ack forever fails here.
        await asyncio.wait_for(writer.invalidate("u1"), timeout=5.0)
    finally:
        await silent.aclose()
    # It did wait, and gave up by its timeout rather than by an answer.
    assert writer._metrics.registry.get_sample_value(
        "cache_invalidation_ack_timeouts_total", {"cache": writer.name}
    ) == 1


async def test_a_replica_resubscribes_and_forgets_l1_after_its_subscription_drops(
    replicas: Callable[..., Awaitable[Cache[Doc]]], redis_client: aioredis.Redis,
) -> None:
    store = Store()
    store.rows["u1"] = {"name": "Ada"}
    writer, reader = await replicas(), await replicas()
    await reader.get_or_load("u1", store.loader("u1"))
    assert len(reader.l1) == 1
    await redis_client.client_kill_filter(_type="pubsub")  # drops every replica's subscription
    deadline = time.monotonic() + BOUND_SECONDS
    while len(reader.l1) != 0:  # cleared on reconnect, since messages may have been missed
        assert time.monotonic() < deadline, "the reader did not notice its subscription dropped"
        await asyncio.sleep(0.02)
    while (await redis_client.pubsub_numsub(f"cache-invalidate:{writer.name}"))[0][1] < 2:
        assert time.monotonic() < deadline, "the replicas did not resubscribe"
        await asyncio.sleep(0.02)
    await reader.get_or_load("u1", store.loader("u1"))
    store.rows["u1"] = {"name": "Ada L."}
    await writer.invalidate("u1")
    assert await reader.get_or_load("u1", store.loader("u1")) == {"name": "Ada L."}


async def test_get_many_reads_l1_and_then_redis_in_one_round_trip(
    replicas: Callable[..., Awaitable[Cache[Doc]]],
) -> None:
    store = Store()
    store.rows.update({f"u{i}": {"i": i} for i in range(5)})
    first, second = await replicas(), await replicas()
    for i in range(4):
        await first.get_or_load(f"u{i}", store.loader(f"u{i}"))
    await second.get_or_load("u0", store.loader("u0"))  # in second's L1 now
    found = await second.get_many([f"u{i}" for i in range(5)])
    assert found == {f"u{i}": {"i": i} for i in range(4)}
    assert lookups(second, "l2", "hit") == 1 + 3
    assert lookups(second, "l2", "miss") >= 1


async def test_put_caches_a_value_returned_by_a_write(replicas: Callable[..., Awaitable[Cache[Doc]]]) -> None:
    first, second = await replicas(), await replicas()
    await first.invalidate("u1")
    await first.put("u1", {"name": "fresh"})
    assert await second.get("u1") == {"name": "fresh"}


async def test_codecs_round_trip_messages_and_documents(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        users: Cache[user_pb2.User] = Cache(
            f"p{uuid.uuid4().hex[:8]}", ProtoCodec(user_pb2.User), redis=client, metrics=CacheMetrics(),
            l1_max_entries=0,
        )
        user = user_pb2.User(name="users/u1", display_name="Ada", height_cm=170.5)

        async def load_user() -> user_pb2.User | None:
            return user

        await users.get_or_load("u1", load_user)
        assert await users.get("u1") == user

        docs: Cache[Doc] = Cache(
            f"d{uuid.uuid4().hex[:8]}", DocumentCodec(), redis=client, metrics=CacheMetrics(), l1_max_entries=0
        )
        stamp = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
        doc: Doc = {"_id": "u1", "created": stamp, "tags": [{"at": stamp}], "n": 1.5}

        async def load_doc() -> Doc | None:
            return doc

        await docs.get_or_load("u1", load_doc)
        assert await docs.get("u1") == doc
    finally:
        await client.aclose()


def test_cache_names_cannot_break_the_key_layout() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        Cache("a:b", DocumentCodec(), redis=None, metrics=CacheMetrics())


async def test_a_redis_outage_reads_from_the_store_and_a_restart_does_not_bring_back_old_values(
    tmp_path: Path,
) -> None:
    """Redis killed: reads come from the store (uncached), writes still invalidate nothing and fail
    nothing. Redis back with its data (AOF): the value cached before the outage is not served,
    because the key written meanwhile is invalidated first."""
    server = start_redis(tmp_path, durable=True)
    client = aioredis.Redis.from_url(server.url)
    store = Store()
    store.rows["k"] = {"v": 1}
    cache: Cache[Doc] = Cache("outage", DocumentCodec(), redis=client, metrics=CacheMetrics())
    try:
        await cache.start()
        assert await cache.get_or_load("k", store.loader("k")) == {"v": 1}  # now in Redis and L1

        server.kill()
        store.rows["k"] = {"v": 2}
        await cache.invalidate("k")  # Redis is gone: must not raise
        reads = store.reads
        assert await cache.get_or_load("k", store.loader("k")) == {"v": 2}
        assert await cache.get_or_load("k", store.loader("k")) == {"v": 2}
        assert store.reads == reads + 2, "nothing may be cached while invalidations cannot arrive"

        server.restart()
        deadline = time.monotonic() + BOUND_SECONDS
        while time.monotonic() < deadline and "k" in cache._unflushed:
            await asyncio.sleep(0.2)
            assert await cache.get_or_load("k", store.loader("k")) == {"v": 2}
        assert "k" not in cache._unflushed, "the missed invalidation never reached Redis"
        assert await cache.get_or_load("k", store.loader("k")) == {"v": 2}
    finally:
        await cache.close()
        await client.aclose()
        server.stop()
