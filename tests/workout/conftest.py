"""The workout service started by its production factory on a free port, over each storage backend.

Access tokens come from the user service's own machinery (its signing key in the shared keys
directory and its TokenService), so the workout service verifies real ES256 tokens through its
real interceptors. Events are read back from the same bus the service publishes on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from fittracker.events.v1 import events_pb2
from fittracker.workout.v1 import workout_service_pb2_grpc

from services.runtime.auth import load_or_create_signing_key
from services.runtime.events import BusTuning, EmbeddedBus, EventBus, RedisStreamsBus, stream_of
from services.runtime.revocation import Revocations, StoreRevocationLog
from services.runtime.server import RunningService, start_service
from services.runtime.settings import Settings
from services.runtime.storage import EmbeddedStore
from services.user.tokens import TokenService
from services.workout import build
from tests.support import backend_settings, bearer

if TYPE_CHECKING:
    from fittracker.workout.v1.workout_service_pb2_grpc import WorkoutServiceAsyncStub

#: How long a test waits for an event before failing; events normally arrive in milliseconds.
EVENT_TIMEOUT_SECONDS = 15.0
#: Short consumer timings, so the test's reader sees entries promptly.
FAST = BusTuning(claim_idle_seconds=2.0, claim_interval_seconds=0.2, retry_base_seconds=0.05,
                 retry_max_seconds=0.2, block_seconds=0.2)


@dataclass
class Caller:
    """A signed-in user: their id and call metadata."""

    user_id: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return bearer(self.token)

    @property
    def parent(self) -> str:
        return f"users/{self.user_id}"


@dataclass
class EventLog:
    """Every envelope read from the workout stream by a private consumer group, in arrival order."""

    envelopes: list[events_pb2.EventEnvelope] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, envelope: events_pb2.EventEnvelope) -> None:
        async with self.changed:
            self.envelopes.append(envelope)
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[events_pb2.EventEnvelope], bool], count: int = 1
                       ) -> list[events_pb2.EventEnvelope]:
        """The envelopes matching ``predicate`` once there are at least ``count`` of them."""

        def enough() -> bool:
            return sum(1 for e in self.envelopes if predicate(e)) >= count

        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(enough), EVENT_TIMEOUT_SECONDS)
        return [e for e in self.envelopes if predicate(e)]

    def matching(self, predicate: Callable[[events_pb2.EventEnvelope], bool]) -> list[events_pb2.EventEnvelope]:
        return [e for e in self.envelopes if predicate(e)]


@dataclass
class WorkoutApi:
    """A client of the running service, a way to sign users in, and the events it published."""

    stub: WorkoutServiceAsyncStub
    channel: grpc.aio.Channel
    settings: Settings
    running: RunningService
    tokens: TokenService
    bus: EventBus
    events: EventLog

    async def sign_in(self, role: str = "member") -> Caller:
        """A fresh user with a real access token (what Register or Login would hand out)."""
        user_id = uuid.uuid4().hex
        issued = await self.tokens.open_session(user_id, role)
        return Caller(user_id, issued.access_token)


@pytest_asyncio.fixture(scope="module")
async def workout_api(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[WorkoutApi]:
    """Start the real server (all interceptors and background jobs on) and connect to it."""
    mongo_url = request.getfixturevalue("mongo_url") if backend == "mongo" else ""
    redis_url = request.getfixturevalue("redis_url") if backend == "mongo" else ""
    data_dir = tmp_path_factory.mktemp(f"workout-{backend}")
    settings = settings_for(backend, data_dir, mongo_url, redis_url)
    signing_key = load_or_create_signing_key(settings.keys_dir, allow_create=True)
    token_store = EmbeddedStore(data_dir / "tokens.sqlite3")
    revocations = Revocations(StoreRevocationLog(token_store), token_ttl_seconds=900, poll_seconds=1)
    tokens = TokenService(token_store, revocations, signing_key, issuer=settings.jwt_issuer,
                          audience=settings.jwt_audience, access_ttl=timedelta(minutes=15),
                          refresh_ttl=timedelta(days=1))
    await tokens.ensure()
    running = await start_service(settings, build)
    redis = aioredis.Redis.from_url(redis_url) if redis_url else None
    bus: EventBus = (
        RedisStreamsBus(redis, tuning=FAST) if redis else EmbeddedBus(data_dir / "events.sqlite3", tuning=FAST)
    )
    events = EventLog()
    reader = asyncio.create_task(
        bus.consumer(f"test-{uuid.uuid4().hex[:8]}", [stream_of("workout")], events.add, token_store)()
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield WorkoutApi(workout_service_pb2_grpc.WorkoutServiceStub(channel), channel, settings, running, tokens,
                     bus, events)
    await channel.close()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await running.stop(grace=1)
    await bus.close()
    if redis is not None:
        await redis.aclose()
    await token_store.close()


def settings_for(backend: str, data_dir: Path, mongo_url: str, redis_url: str) -> Settings:
    """Settings of the workout service on one backend."""
    return backend_settings("workout", backend, data_dir, mongo_url, redis_url)
