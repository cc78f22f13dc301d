"""Fixtures for the event bus contract: each test runs on Redis Streams and on the embedded bus."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from services.runtime.events import BusTuning, EmbeddedBus, RedisStreamsBus
from services.runtime.storage import EmbeddedStore

#: Short timings so retries and reclaims happen within a test's patience.
FAST = BusTuning(
    claim_idle_seconds=0.5,
    claim_interval_seconds=0.1,
    retry_base_seconds=0.02,
    retry_max_seconds=0.1,
    batch_size=8,
    block_seconds=0.2,
)

Bus = RedisStreamsBus | EmbeddedBus


@dataclass
class BusKit:
    """Buses of one kind over one shared backing (Redis, or one SQLite file), and a dedupe store."""

    kind: str
    root: Path
    store: EmbeddedStore
    producer: str
    _make: Callable[[BusTuning], Awaitable[Bus]]
    buses: list[Bus] = field(default_factory=list)

    @property
    def stream(self) -> str:
        return f"events.{self.producer}"

    async def bus(self, tuning: BusTuning = FAST) -> Bus:
        """Another bus on the same backing: what a second process would open."""
        made = await self._make(tuning)
        self.buses.append(made)
        return made


@pytest.fixture(params=["redis", "embedded"])
def bus_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def kit(bus_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[BusKit]:
    clients: list[aioredis.Redis] = []
    # Started here, before any test timing begins, and only for the Redis runs.
    redis_url = str(request.getfixturevalue("redis_url")) if bus_kind == "redis" else ""

    async def make(tuning: BusTuning) -> Bus:
        if bus_kind == "redis":
            client = aioredis.Redis.from_url(redis_url)
            clients.append(client)
            return RedisStreamsBus(client, tuning=tuning)
        return EmbeddedBus(tmp_path / "events.sqlite3", tuning=tuning)

    store = EmbeddedStore(tmp_path / "store.sqlite3")
    # A producer (so a stream) per test: tests on the session's Redis never see each other's events.
    built = BusKit(bus_kind, tmp_path, store, f"t{uuid.uuid4().hex[:12]}", make)
    yield built
    for bus in built.buses:
        await bus.close()
    for client in clients:
        await client.aclose()
    await store.close()
