"""Windowed counters (login lock-out, rate limits) on Redis and on each document store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from services.runtime.counters import Counters, RedisCounters, StoreCounters
from services.runtime.storage import DocumentStore, EmbeddedStore, MongoStore


@pytest_asyncio.fixture(params=["redis", "embedded", "mongo"])
async def counters(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Counters]:
    if request.param == "redis":
        client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
        yield RedisCounters(client)
        await client.aclose()
        return
    if request.param == "embedded":
        store: DocumentStore = EmbeddedStore(tmp_path / "counters.sqlite3")
    else:
        store = MongoStore(request.getfixturevalue("mongo_url"), f"counters_{uuid.uuid4().hex[:8]}")
    found = StoreCounters(store)
    await found.ensure()
    yield found
    await store.close()


async def test_concurrent_first_increments_count_every_one(counters: Counters) -> None:
    key = f"login:account:{uuid.uuid4().hex}"
    results = await asyncio.gather(*(counters.incr(key, 60) for _ in range(20)))
    assert await counters.get(key) == 20
    assert max(results) == 20


async def test_reset_forgets_and_other_keys_are_separate(counters: Counters) -> None:
    first, second = f"a:{uuid.uuid4().hex}", f"b:{uuid.uuid4().hex}"
    for _ in range(3):
        await counters.incr(first, 60)
    await counters.incr(second, 60)
    await counters.reset(first)
    assert (await counters.get(first), await counters.get(second)) == (0, 1)
