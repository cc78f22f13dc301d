"""The Subscribe stream's ordering rules against the real embedded store: a notification that
overtakes an earlier cursor waits for it, and a hole whose writer died is stepped over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from fittracker.notification.v1 import notification_service_pb2

from services.notification.codec import to_notification
from services.notification.hub import Listener
from services.notification.repository import NOTIFICATIONS, NotificationRepository
from services.notification.stream import GAP_GRACE, Stream
from services.runtime.storage import Document, EmbeddedStore
from services.runtime.timeutil import now

USER = "u1"
READ_TIMEOUT = 10.0


class FakeClock:
    """Monotonic time the test moves by hand, so grace periods pass without waiting."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EmbeddedStore]:
    embedded = EmbeddedStore(tmp_path / "n.sqlite3")
    yield embedded
    await embedded.close()


@pytest.fixture
async def repo(store: EmbeddedStore) -> NotificationRepository:
    repository = NotificationRepository(store, timedelta(days=1))
    await repository.ensure()
    return repository


def doc(cursor: int, age_seconds: float = 0.0) -> Document:
    created = now() - timedelta(seconds=age_seconds)
    return {"_id": f"n{cursor}", "user_id": USER, "cursor": cursor, "title": f"t{cursor}", "body": "b",
            "category": "CATEGORY_SYSTEM", "data": {}, "create_time": created, "read_time": None,
            "deliveries": [], "expire_at": created + timedelta(days=1)}


async def insert(store: EmbeddedStore, document: Document) -> None:
    """Write a notification with a chosen cursor, as a writer that allocated it would."""
    await store.collection(NOTIFICATIONS).insert(document)


async def start(
    repo: NotificationRepository, resume: int, clock: FakeClock, max_replay: int = 100, truncated: bool = False
) -> tuple[Listener, asyncio.Queue[notification_service_pb2.SubscribeResponse], asyncio.Task[None]]:
    listener = Listener(USER)
    out: asyncio.Queue[notification_service_pb2.SubscribeResponse] = asyncio.Queue()

    async def pump() -> None:
        async for message in Stream(repo, listener, 30, max_replay, clock=clock).run(resume):
            out.put_nowait(message)

    task = asyncio.create_task(pump())
    first = await asyncio.wait_for(out.get(), READ_TIMEOUT)
    assert first.HasField("heartbeat")
    assert first.heartbeat.replay_truncated is truncated
    return listener, out, task


async def next_cursor(out: asyncio.Queue[notification_service_pb2.SubscribeResponse]) -> int:
    while True:
        message = await asyncio.wait_for(out.get(), READ_TIMEOUT)
        if message.HasField("notification"):
            return message.notification.cursor


async def test_an_overtaking_notification_waits_for_the_earlier_cursor(
    repo: NotificationRepository, store: EmbeddedStore
) -> None:
    listener, out, task = await start(repo, 0, FakeClock())
    try:
        second = doc(2)
        await insert(store, second)
        listener.offer(to_notification(second))
        first = doc(1)
        await insert(store, first)
        listener.offer(to_notification(first))
        assert [await next_cursor(out), await next_cursor(out)] == [1, 2]
    finally:
        task.cancel()


async def test_an_old_hole_in_the_replay_is_stepped_over_at_once(
    repo: NotificationRepository, store: EmbeddedStore
) -> None:
    for cursor in (1, 2, 4, 5):
        await insert(store, doc(cursor, age_seconds=60))
    _listener, out, task = await start(repo, 1, FakeClock())
    try:
        assert [await next_cursor(out) for _ in range(3)] == [2, 4, 5]
    finally:
        task.cancel()


async def test_a_fresh_hole_is_waited_for_then_stepped_over(
    repo: NotificationRepository, store: EmbeddedStore
) -> None:
    clock = FakeClock()
    listener, out, task = await start(repo, 0, clock)
    try:
        third = doc(3)
        await insert(store, third)
        listener.offer(hint=2)
        listener.offer(to_notification(third))
        late = doc(1)
        await insert(store, late)
        listener.offer(to_notification(late))
        assert await next_cursor(out) == 1
        # Cursor 2 never comes: its writer died after allocating it.
        clock.value += GAP_GRACE
        listener.offer(hint=3)
        assert await next_cursor(out) == 3
    finally:
        task.cancel()


@pytest.mark.parametrize(("kept", "max_replay", "replayed"), [
    ((1, 2, 3, 4, 5), 2, [4, 5]),  # more than the replay limit: the newest ones, and reload the inbox
    ((4, 5), 100, [4, 5]),  # cursors 2 and 3 expired
])
async def test_an_incomplete_replay_says_so_on_the_first_heartbeat(
    repo: NotificationRepository, store: EmbeddedStore, kept: tuple[int, ...], max_replay: int, replayed: list[int]
) -> None:
    for cursor in kept:
        await insert(store, doc(cursor))
    _listener, out, task = await start(repo, 1, FakeClock(), max_replay=max_replay, truncated=True)
    try:
        assert [await next_cursor(out) for _ in replayed] == replayed
    finally:
        task.cancel()
