"""The ai service with the real user and workout services, each started by its production factory.

All three share a data directory (the user service's signing key and the published JWKS, and the
embedded event log) and, on the "mongo" backend, the FerretDB server (a database each) and Redis.
Users are registered through the user service and their workouts logged through the workout
service, so every recommendation and adaptation is computed from data that crossed the real APIs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from fittracker.ai.v1 import ai_service_pb2_grpc
from fittracker.common.v1 import fitness_pb2 as fit
from fittracker.events.v1 import events_pb2
from fittracker.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from fittracker.workout.v1 import workout_pb2, workout_service_pb2, workout_service_pb2_grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

import services.ai
import services.user
import services.workout
from services.runtime.events import BusTuning, EmbeddedBus, EventBus, RedisStreamsBus, stream_of
from services.runtime.server import RunningService, start_service
from services.runtime.settings import ServiceName, Settings
from services.runtime.storage import EmbeddedStore
from tests.support import backend_settings, bearer

if TYPE_CHECKING:
    from fittracker.ai.v1.ai_service_pb2_grpc import AiServiceAsyncStub
    from fittracker.user.v1.user_service_pb2_grpc import UserServiceAsyncStub
    from fittracker.workout.v1.workout_service_pb2_grpc import WorkoutServiceAsyncStub

EVENT_TIMEOUT_SECONDS = 15.0
FAST = BusTuning(claim_idle_seconds=2.0, claim_interval_seconds=0.2, retry_base_seconds=0.05,
                 retry_max_seconds=0.2, block_seconds=0.2)
#: A barbell gym: what most tests' users train with.
BARBELL_GYM = (fit.EQUIPMENT_BARBELL, fit.EQUIPMENT_BENCH, fit.EQUIPMENT_PULL_UP_BAR)
#: (exercise slug, reps, kg, RPE or None) of one logged set; 0 reps logs a 45-second timed set.
SetSpec = tuple[str, int, float, float | None]


@dataclass
class Caller:
    """A registered user: id and access token."""

    user_id: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return bearer(self.token)

    @property
    def name(self) -> str:
        return f"users/{self.user_id}"


@dataclass
class EventLog:
    """Envelopes read from a stream by a private consumer group."""

    envelopes: list[events_pb2.EventEnvelope] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, envelope: events_pb2.EventEnvelope) -> None:
        async with self.changed:
            self.envelopes.append(envelope)
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[events_pb2.EventEnvelope], bool]) -> events_pb2.EventEnvelope:
        """The first envelope matching ``predicate``, waiting for it (bounded)."""

        def found() -> bool:
            return any(predicate(e) for e in self.envelopes)

        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(found), EVENT_TIMEOUT_SECONDS)
        return next(e for e in self.envelopes if predicate(e))


@dataclass
class Stack:
    """The three running services and clients of each."""

    ai: AiServiceAsyncStub
    users: UserServiceAsyncStub
    workouts: WorkoutServiceAsyncStub
    settings: dict[str, Settings]
    running: dict[str, RunningService]
    channels: list[grpc.aio.Channel]
    bus: EventBus
    ai_events: EventLog
    redis: aioredis.Redis | None = None
    stopped: set[str] = field(default_factory=set)

    async def stop(self, service: str) -> None:
        """Stop one service now (its clients then see it down)."""
        self.stopped.add(service)
        await self.running[service].stop(grace=0)

    async def register(self, goal: int = fit.FITNESS_GOAL_UNSPECIFIED,
                       equipment: Sequence[int] = (), level: int = user_pb2.FITNESS_LEVEL_UNSPECIFIED) -> Caller:
        """A new account with the given goal, equipment and level."""
        registered = await self.users.Register(user_service_pb2.RegisterRequest(
            email=f"{uuid.uuid4().hex[:12]}@example.com", password="correct horse battery", display_name="Test",
        ))
        caller = Caller(registered.user.name.removeprefix("users/"), registered.tokens.access_token)
        if goal or equipment:
            await self.users.UpdatePreferences(
                user_service_pb2.UpdatePreferencesRequest(
                    preferences=user_pb2.Preferences(
                        name=f"{caller.name}/preferences",
                        goals=user_pb2.Goals(primary_goal=goal, available_equipment=equipment),  # type: ignore[arg-type]
                    ),
                    update_mask=FieldMask(paths=["goals"]),
                ),
                metadata=caller.metadata,
            )
        if level:
            await self.users.UpdateUser(
                user_service_pb2.UpdateUserRequest(
                    user=user_pb2.User(name=caller.name, fitness_level=level),  # type: ignore[arg-type]
                    update_mask=FieldMask(paths=["fitness_level"]),
                ),
                metadata=caller.metadata,
            )
        return caller

    async def log_session(self, caller: Caller, started: datetime, sets: Sequence[SetSpec],
                          minutes: int = 60) -> workout_pb2.Session:
        """Log a completed session that started at ``started`` through the workout API."""
        session = await self.workouts.StartSession(
            workout_service_pb2.StartSessionRequest(parent=caller.name, start_time=_stamp(started),
                                                    time_zone="UTC"),
            metadata=caller.metadata,
        )
        for slug, reps, kg, rpe in sets:
            logged = workout_pb2.WorkoutSet(exercise=f"exercises/{slug}", reps=reps, weight_kg=kg,
                                            duration_seconds=0 if reps else 45, set_type=workout_pb2.SET_TYPE_WORKING)
            if rpe is not None:
                logged.rpe = rpe
            await self.workouts.LogSet(workout_service_pb2.LogSetRequest(parent=session.name, set=logged),
                                       metadata=caller.metadata)
        done = await self.workouts.CompleteSession(
            workout_service_pb2.CompleteSessionRequest(name=session.name,
                                                       end_time=_stamp(started + timedelta(minutes=minutes))),
            metadata=caller.metadata,
        )
        return done.session


    async def catalog_equipment(self, caller: Caller) -> dict[str, set[int]]:
        """The equipment of every catalog exercise (body weight always included), from the workout service."""
        found: dict[str, set[int]] = {}
        request = workout_service_pb2.ListExercisesRequest(page_size=100)
        for _ in range(10):
            page = await self.workouts.ListExercises(request, metadata=caller.metadata)
            found.update({e.name: set(e.equipment) | {fit.EQUIPMENT_BODYWEIGHT} for e in page.exercises})
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        return found


def _stamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


def days_ago(days: float, hour: int = 10) -> datetime:
    """A moment ``days`` calendar days before today (UTC) at ``hour`` o'clock, never in the future."""
    moment = datetime.now(UTC).replace(hour=hour, minute=0, second=0, microsecond=0) - timedelta(days=days)
    return min(moment, datetime.now(UTC) - timedelta(hours=2))


async def start_stack(backend: str, data_dir: Path, mongo_url: str, redis_url: str) -> Stack:
    """Start user, workout and ai (in that order: the user service creates the signing key)."""
    settings: dict[str, Settings] = {}
    running: dict[str, RunningService] = {}
    builders = {"user": services.user.build, "workout": services.workout.build}
    peers: tuple[ServiceName, ...] = ("user", "workout")
    for service in peers:
        settings[service] = settings_for(service, backend, data_dir, mongo_url, redis_url)
        running[service] = await start_service(settings[service], builders[service])
    settings["ai"] = replace(
        settings_for("ai", backend, data_dir, mongo_url, redis_url),
        user_addr=f"127.0.0.1:{running['user'].port}", workout_addr=f"127.0.0.1:{running['workout'].port}",
    )
    running["ai"] = await start_service(settings["ai"], services.ai.build)
    redis = aioredis.Redis.from_url(redis_url) if backend == "mongo" else None
    bus: EventBus = RedisStreamsBus(redis, tuning=FAST) if redis else EmbeddedBus(data_dir / "events.sqlite3",
                                                                                     tuning=FAST)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{running[s].port}") for s in ("ai", "user", "workout")]
    return Stack(
        ai=ai_service_pb2_grpc.AiServiceStub(channels[0]),
        users=user_service_pb2_grpc.UserServiceStub(channels[1]),
        workouts=workout_service_pb2_grpc.WorkoutServiceStub(channels[2]),
        settings=settings, running=running, channels=channels, bus=bus, ai_events=EventLog(), redis=redis,
    )


async def stop_stack(stack: Stack) -> None:
    """Close the clients and drain every server still running."""
    for channel in stack.channels:
        await channel.close()
    for service in ("ai", "workout", "user"):
        if service not in stack.stopped:
            await stack.running[service].stop(grace=1)
    await stack.bus.close()
    if stack.redis is not None:
        await stack.redis.aclose()


@pytest_asyncio.fixture(scope="module")
async def stack(backend: str, tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """The three services, and a private reader of the ai service's event stream."""
    mongo_url = request.getfixturevalue("mongo_url") if backend == "mongo" else ""
    redis_url = request.getfixturevalue("redis_url") if backend == "mongo" else ""
    data_dir = tmp_path_factory.mktemp(f"ai-{backend}")
    running = await start_stack(backend, data_dir, mongo_url, redis_url)
    reader_store = EmbeddedStore(data_dir / "reader.sqlite3")
    reader = asyncio.create_task(
        running.bus.consumer(f"test-{uuid.uuid4().hex[:8]}", [stream_of("ai")], running.ai_events.add,
                             reader_store)()
    )
    yield running
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await stop_stack(running)
    await reader_store.close()


def settings_for(service: ServiceName, backend: str, data_dir: Path, mongo_url: str, redis_url: str) -> Settings:
    """Settings of one service on one backend."""
    return backend_settings(service, backend, data_dir, mongo_url, redis_url)
