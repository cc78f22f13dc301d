"""The events the user service emits (UserRegistered, UserDeleted) and the deletion saga's answers.

An observer opens the bus and the store the running service uses (another connection, as another
process would) and consumes ``events.user`` in a group of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest_asyncio
import redis.asyncio as aioredis
from fittracker.events.v1 import events_pb2
from fittracker.user.v1 import user_service_pb2

from services.runtime.events import OUTBOX, EmbeddedBus, Outbox, RedisStreamsBus, fact_id, make_envelope, stream_of
from services.runtime.storage import DocumentStore, EmbeddedStore, open_store
from services.user.deletion import DELETIONS, ERASING_SERVICES, DeletionSaga
from services.user.repository import UserRepository
from tests.events.conftest import FAST
from tests.events.support import Recorder, drained, eventually, running
from tests.support import bearer
from tests.user.conftest import UserApi

USER_STREAM = stream_of("user")


@dataclass
class Observer:
    """The service's bus and store, seen from outside, and what arrived on ``events.user``."""

    bus: RedisStreamsBus | EmbeddedBus
    store: DocumentStore
    group: str
    seen: Recorder

    def about(self, user_name: str, payload: str) -> list[events_pb2.EventEnvelope]:
        return [e for e in self.seen.seen if e.user == user_name and e.WhichOneof("payload") == payload]

    async def settled(self) -> bool:
        """Whether the service's outbox is empty and this observer has read everything."""
        unsent = await self.store.collection(OUTBOX).count({"sent": False})
        return unsent == 0 and await drained(self.bus, self.group, [USER_STREAM])


@pytest_asyncio.fixture(scope="module")
async def observer(user_api: UserApi) -> AsyncIterator[Observer]:
    settings = user_api.settings
    redis = aioredis.Redis.from_url(settings.redis_url) if settings.redis_url else None
    bus = (
        RedisStreamsBus(redis, tuning=FAST) if redis is not None
        else EmbeddedBus(settings.data_dir / "events.sqlite3", tuning=FAST)
    )
    store = open_store(settings.mongo_url, settings.mongo_database, settings.data_dir, "user")
    dedupe = EmbeddedStore(settings.data_dir / f"observer-{uuid.uuid4().hex[:6]}.sqlite3")
    watched = Observer(bus, store, f"observer-{uuid.uuid4().hex[:8]}", Recorder())
    async with running(bus.consumer(watched.group, [USER_STREAM], watched.seen, dedupe)):
        yield watched
    await bus.close()
    if redis is not None:
        await redis.aclose()
    await store.close()
    await dedupe.close()


async def test_register_announces_the_account_once(user_api: UserApi, observer: Observer) -> None:
    request = user_service_pb2.RegisterRequest(
        email=f"{uuid.uuid4().hex[:8]}@example.com", password="pass phrase 1234", display_name="Grace",
        request_id=str(uuid.uuid4()),
    )
    account = await user_api.stub.Register(request)
    await eventually(lambda: observer.about(account.user.name, "user_registered"), what="UserRegistered")
    await user_api.stub.Register(request)  # a replayed request adds the same fact again: a no-op
    await eventually(observer.settled, what="the outbox and the observer to settle")
    [event] = observer.about(account.user.name, "user_registered")
    user_id = account.user.name.removeprefix("users/")
    created_ms = account.user.create_time.ToMilliseconds()
    assert event.event_id == fact_id("user.registered", user_id, str(created_ms))
    assert (event.producer, event.user_registered.display_name) == ("user", "Grace")
    assert event.occur_time.ToMilliseconds() == created_ms


async def test_deleting_an_account_starts_a_saga_that_every_service_answers(
    user_api: UserApi, observer: Observer
) -> None:
    account = await user_api.register()
    await user_api.stub.DeleteUser(
        user_service_pb2.DeleteUserRequest(name="users/me"), metadata=bearer(account.tokens.access_token)
    )
    await eventually(lambda: observer.about(account.user.name, "user_deleted"), what="UserDeleted")
    [event] = observer.about(account.user.name, "user_deleted")
    request_id = event.user_deleted.deletion_request_id
    user_id = account.user.name.removeprefix("users/")
    assert list(event.user_deleted.expected_services) == list(ERASING_SERVICES)
    assert event.event_id == fact_id("user.deleted", user_id, request_id)
    sagas = observer.store.collection(DELETIONS)

    async def erasing() -> bool:
        # The relay may publish UserDeleted a moment before the saga records the announcement.
        current = await sagas.get(request_id)
        return current is not None and current["status"] == "erasing"

    await eventually(erasing, what="the saga to record its announcement")
    saga = await sagas.get(request_id)
    assert saga is not None
    assert (saga["user_id"], saga["status"], saga["answers"]) == (user_id, "erasing", {})

    async def answer(service: str, deletion_request_id: str = request_id) -> None:
        erased = events_pb2.DataErased(service=service, deletion_request_id=deletion_request_id)
        erased.erase_time.FromDatetime(datetime.now(UTC))
        await observer.bus.publish(make_envelope(service, user_id, erased))

    await answer("workout", deletion_request_id="no-such-deletion")  # ignored, not an error
    for service in ERASING_SERVICES[:-1]:
        await answer(service)
    await answer("workout")  # a service answering twice (at-least-once) changes nothing

    async def answered(count: int) -> bool:
        current = await sagas.get(request_id)
        return current is not None and len(current["answers"]) == count

    await eventually(lambda: answered(len(ERASING_SERVICES) - 1), what="three answers")
    waiting = await sagas.get(request_id)
    assert waiting is not None and waiting["status"] == "erasing"
    await answer(ERASING_SERVICES[-1])

    async def complete() -> bool:
        current = await sagas.get(request_id)
        return current is not None and current["status"] == "complete"

    await eventually(complete, what="the saga to complete")
    done = await sagas.get(request_id)
    assert done is not None
    assert sorted(done["answers"]) == sorted(ERASING_SERVICES)
    assert done["complete_time"] >= done["request_time"]


async def test_recovery_announces_a_deletion_a_crash_left_unannounced(
    user_api: UserApi, observer: Observer
) -> None:
    users = UserRepository(observer.store)
    saga = DeletionSaga(observer.store, users, Outbox(observer.store, observer.bus), recover_after_seconds=0)
    crashed, changed_mind = await user_api.register(), await user_api.register()
    crashed_id = crashed.user.name.removeprefix("users/")
    # DeleteUser died after deleting the account, before UserDeleted reached the outbox...
    interrupted = await saga.begin(crashed_id)
    await users.delete(crashed_id)
    # ...and another died before deleting anything, and its user never retried.
    abandoned = await saga.begin(changed_mind.user.name.removeprefix("users/"))
    assert await saga.recover_once() == 1
    await eventually(lambda: observer.about(crashed.user.name, "user_deleted"), what="the recovered UserDeleted")
    [event] = observer.about(crashed.user.name, "user_deleted")
    assert event.user_deleted.deletion_request_id == interrupted["_id"]
    assert (await saga.get(interrupted["_id"]) or {})["status"] == "erasing"
    assert (await saga.get(abandoned["_id"]) or {})["status"] == "abandoned"
    assert await saga.recover_once() == 0
