"""The user service started by its production factory on a free port, over each storage backend."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import pytest_asyncio
from fittracker.user.v1 import user_service_pb2, user_service_pb2_grpc

from services.runtime.server import start_service
from services.runtime.settings import Settings
from services.user import build
from tests.support import backend_settings

if TYPE_CHECKING:
    from fittracker.user.v1.user_service_pb2_grpc import UserServiceAsyncStub

ADMIN_EMAIL = "admin@fittracker.test"


@dataclass
class UserApi:
    """A client of the running service, and where its data lives."""

    stub: UserServiceAsyncStub
    channel: grpc.aio.Channel
    settings: Settings

    async def register(self, email: str | None = None, password: str = "correct horse battery",
                       display_name: str = "Ada") -> user_service_pb2.RegisterResponse:
        """Register a fresh account (a random email unless given)."""
        email = email or f"{uuid.uuid4().hex[:12]}@example.com"
        return await self.stub.Register(
            user_service_pb2.RegisterRequest(email=email, password=password, display_name=display_name)
        )


@pytest_asyncio.fixture(scope="module")
async def user_api(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[UserApi]:
    """Start the real server (all interceptors on) and connect a channel to it."""
    mongo_url = request.getfixturevalue("mongo_url") if backend == "mongo" else ""
    redis_url = request.getfixturevalue("redis_url") if backend == "mongo" else ""
    settings = settings_for(backend, tmp_path_factory.mktemp(f"user-{backend}"), mongo_url, redis_url)
    running = await start_service(settings, build)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield UserApi(user_service_pb2_grpc.UserServiceStub(channel), channel, settings)
    await channel.close()
    await running.stop(grace=1)


def settings_for(backend: str, data_dir: Path, mongo_url: str, redis_url: str) -> Settings:
    """Settings of the user service on one backend."""
    return backend_settings(
        "user", backend, data_dir, mongo_url, redis_url, admin_emails=ADMIN_EMAIL, login_max_failures=3
    )
