"""The analytics service started by its production factory on a free port, over each storage backend.

The service runs with a fixed clock (``NOW``) so that "today", "this week" and the sealing of
platform days do not depend on when the tests run; events carry their own times.
"""

from __future__ import annotations

import base64
import functools
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import jwt
import pytest
import pytest_asyncio
from fittracker.analytics.v1 import analytics_service_pb2_grpc
from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2

from services.analytics import assemble
from services.analytics.projector import Projector
from services.analytics.repository import AnalyticsRepository
from services.runtime.auth import ADMIN_ROLE, SERVICE_ROLE, key_id, load_or_create_signing_key
from services.runtime.events import OUTBOX, Outbox, fact_id, make_envelope
from services.runtime.server import RunningService, start_service
from services.runtime.settings import Settings
from tests.support import backend_settings, bearer

if TYPE_CHECKING:
    from fittracker.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceAsyncStub

#: "Now" for the service: Wednesday 12 March 2025, 20:00 UTC (13:00 in Los Angeles, after the
#: switch to daylight saving time on 9 March; 05:00 on Thursday 13 March in Tokyo).
NOW = datetime(2025, 3, 12, 20, 0, tzinfo=UTC)

Muscles = Sequence["fitness_pb2.MuscleGroup.ValueType"]


@dataclass(frozen=True)
class Lift:
    """One exercise of a session, summarised as the workout service sends it."""

    exercise: str
    muscles: Muscles
    sets: int
    reps: int
    volume: float
    best_weight: float = 0.0
    best_reps: int = 0
    e1rm: float = 0.0

    def summary(self) -> events_pb2.ExerciseSummary:
        """The ExerciseSummary of the event."""
        return events_pb2.ExerciseSummary(
            exercise=f"exercises/{self.exercise}", primary_muscle_groups=list(self.muscles),
            set_count=self.sets, total_reps=self.reps, total_volume_kg=self.volume,
            best_set_weight_kg=self.best_weight, best_set_reps=self.best_reps,
            estimated_one_rep_max_kg=self.e1rm,
        )


def session_completed(
    user_id: str, session_id: str, end: datetime, tz: str, lifts: Sequence[Lift],
    *, minutes: int = 60, event_id: str | None = None,
) -> events_pb2.EventEnvelope:
    """A SessionCompleted envelope as the workout service publishes it (deterministic event id)."""
    name = f"users/{user_id}/sessions/{session_id}"
    payload = events_pb2.SessionCompleted(
        session=name, time_zone=tz, exercises=[lift.summary() for lift in lifts],
        total_volume_kg=sum(lift.volume for lift in lifts), total_sets=sum(lift.sets for lift in lifts),
    )
    payload.start_time.FromDatetime(end - timedelta(minutes=minutes))
    payload.end_time.FromDatetime(end)
    return make_envelope(
        "workout", user_id, payload,
        event_id=event_id or fact_id("workout.session_completed", name), occur_time=end,
    )


def record_achieved(
    user_id: str, record_id: str, session_id: str, exercise: str, value: float, at: datetime,
    *, previous: float | None = None, weight: float = 0.0, reps: int = 0,
    kind: fitness_pb2.PersonalRecordKind.ValueType = fitness_pb2.PERSONAL_RECORD_KIND_BEST_ESTIMATED_ONE_REP_MAX,
) -> events_pb2.EventEnvelope:
    """A PersonalRecordAchieved envelope."""
    payload = events_pb2.PersonalRecordAchieved(
        personal_record=f"users/{user_id}/personalRecords/{record_id}", exercise=f"exercises/{exercise}",
        kind=kind, value=value, weight_kg=weight, reps=reps, session=f"users/{user_id}/sessions/{session_id}",
    )
    if previous is not None:
        payload.previous_value = previous
    return make_envelope(
        "workout", user_id, payload, event_id=fact_id("workout.pr", record_id, session_id), occur_time=at
    )


def user_registered(user_id: str, at: datetime) -> events_pb2.EventEnvelope:
    """A UserRegistered envelope."""
    return make_envelope(
        "user", user_id, events_pb2.UserRegistered(display_name="Ada"),
        event_id=fact_id("user.registered", user_id), occur_time=at,
    )


def user_deleted(user_id: str, request_id: str) -> events_pb2.EventEnvelope:
    """A UserDeleted envelope."""
    return make_envelope(
        "user", user_id,
        events_pb2.UserDeleted(deletion_request_id=request_id, expected_services=["analytics", "workout"]),
        event_id=fact_id("user.deleted", request_id),
    )


@dataclass
class AnalyticsApi:
    """A client of the running service, the projector over its store, and token minting."""

    stub: AnalyticsServiceAsyncStub
    channel: grpc.aio.Channel
    settings: Settings
    running: RunningService
    projector: Projector
    repo: AnalyticsRepository

    def token(self, user_id: str, role: str = "member") -> tuple[tuple[str, str]]:
        """Metadata with an access token for ``user_id``, signed like the user service signs them."""
        key = load_or_create_signing_key(self.settings.keys_dir, allow_create=True)
        now = int(time.time())
        token = jwt.encode(
            {
                "iss": self.settings.jwt_issuer, "aud": self.settings.jwt_audience, "sub": user_id,
                "role": role, "sid": "test", "jti": uuid.uuid4().hex, "iat": now, "exp": now + 600,
            },
            key, algorithm="ES256", headers={"kid": key_id(key.public_key())},
        )
        return bearer(token)

    def admin(self) -> tuple[tuple[str, str]]:
        """Metadata of an administrator."""
        return self.token("admin-" + uuid.uuid4().hex[:8], ADMIN_ROLE)

    def service(self) -> tuple[tuple[str, str]]:
        """Metadata of another service calling on its own behalf."""
        return self.token("service-workout", SERVICE_ROLE)

    async def feed(self, *envelopes: events_pb2.EventEnvelope) -> None:
        """Hand envelopes to the consumer's handler, as the bus would."""
        for envelope in envelopes:
            await self.projector.handle(envelope)

    async def published(self, event_type: str, user_id: str) -> list[events_pb2.EventEnvelope]:
        """The envelopes of a type about a user that the service put in its outbox."""
        docs = await self.running.resources.store.collection(OUTBOX).find(
            # Sent or not: every entry, through the index on ``sent`` (the store refuses scans in tests).
            {"sent": {"$in": [True, False]}, "event_type": f"fittracker.events.v1.{event_type}"}
        )
        envelopes = [events_pb2.EventEnvelope.FromString(base64.b64decode(d["envelope"])) for d in docs]
        return [e for e in envelopes if e.user == f"users/{user_id}"]


def new_user() -> str:
    """A fresh user id."""
    return uuid.uuid4().hex


@pytest_asyncio.fixture(scope="module")
async def api(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[AnalyticsApi]:
    """Start the real server (all interceptors, the consumer and the outbox relay) on a free port."""
    mongo_url = request.getfixturevalue("mongo_url") if backend == "mongo" else ""
    redis_url = request.getfixturevalue("redis_url") if backend == "mongo" else ""
    settings = settings_for(backend, tmp_path_factory.mktemp(f"analytics-{backend}"), mongo_url, redis_url)
    load_or_create_signing_key(settings.keys_dir, allow_create=True)
    running = await start_service(settings, functools.partial(assemble, clock=lambda: NOW))
    store = running.resources.store
    repo = AnalyticsRepository(store)
    projector = Projector(repo, Outbox(store, running.resources.events), clock=lambda: NOW)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield AnalyticsApi(
        analytics_service_pb2_grpc.AnalyticsServiceStub(channel), channel, settings, running, projector, repo
    )
    await channel.close()
    await running.stop(grace=1)


def settings_for(backend: str, data_dir: Path, mongo_url: str, redis_url: str) -> Settings:
    """Settings of the analytics service on one backend."""
    return backend_settings("analytics", backend, data_dir, mongo_url, redis_url)
