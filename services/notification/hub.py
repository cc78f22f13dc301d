"""Live fan-out of new notifications to the Subscribe streams of every replica.

Each process keeps a mailbox (``Listener``) per open stream. A notification created in this
process goes straight to local mailboxes; other replicas learn about it in one of two ways:

- With Redis (``FITTRACKER_REDIS_URL``): the creator PUBLISHes the serialized notification on the
  user's channel, and every process holding a stream of that user SUBSCRIBEs to it, through one
  shared pub/sub connection per process (a channel is subscribed while at least one local stream
  needs it). Pub/sub is at-most-once, so a lost message is caught up from the store: on
  reconnection every mailbox is told to check the store, and every heartbeat does it anyway.
- Without Redis (the embedded store on one machine): one task per process polls the per-user
  cursor documents of all locally subscribed users in a single query every
  ``FITTRACKER_POLL_INTERVAL_SECONDS`` and wakes the streams whose cursor moved. Latency across
  processes is then up to one poll interval; within a process it is immediate.

Mailboxes only carry hints: the stream itself reads the store whenever what it was given does not
continue its cursor exactly, so a dropped or duplicated hint never loses or repeats a notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from fittracker.notification.v1 import notification_pb2
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from services.notification.repository import NotificationRepository
from services.runtime.storage import StoreError

log = logging.getLogger("fittracker.notification.hub")

CHANNEL_PREFIX = "fittracker:notifications:user:"
#: Subscribed at start so the shared pub/sub connection exists before any stream needs it.
CONTROL_CHANNEL = "fittracker:notifications:control"
#: Notifications a slow stream may have waiting; beyond that it re-reads the store instead.
MAILBOX_CAPACITY = 256
#: How long a new stream waits for Redis to confirm its SUBSCRIBE before replaying the store.
SUBSCRIBE_CONFIRM_SECONDS = 2.0
#: Reconnection backoff after Redis fails, doubling up to the maximum.
RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0


def was_cancelled() -> bool:
    """Whether the current task is being cancelled.

    redis-py may turn a cancellation that interrupts a read into a ConnectionError; a loop that
    retries on connection errors must not mistake it for an outage and keep running.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Listener:
    """The mailbox of one Subscribe stream."""

    def __init__(self, user_id: str) -> None:
        """Receive notifications of ``user_id``."""
        self.user_id = user_id
        self._items: deque[notification_pb2.Notification] = deque()
        self._event = asyncio.Event()
        #: The highest cursor this mailbox has heard of, delivered or not.
        self.hint = 0
        #: Set when something may have been missed: the stream must read the store.
        self.check_store = False
        #: Set when the user's data was erased: the stream ends.
        self.ended = False
        #: Set when this replica starts draining: the stream ends so the client resubscribes elsewhere.
        self.draining = False

    def offer(self, notification: notification_pb2.Notification | None = None, hint: int = 0) -> None:
        """Hand over a new notification, or only the news that cursors up to ``hint`` exist."""
        if notification is not None:
            hint = max(hint, notification.cursor)
            if len(self._items) < MAILBOX_CAPACITY:
                self._items.append(notification)
            else:
                self.check_store = True
        self.hint = max(self.hint, hint)
        self._event.set()

    def resync(self) -> None:
        """Tell the stream that it may have missed notifications."""
        self.check_store = True
        self._event.set()

    def end(self) -> None:
        """Close the stream (the user's data is gone)."""
        self.ended = True
        self._event.set()

    def drain(self) -> None:
        """Close the stream because this replica is shutting down."""
        self.draining = True
        self._event.set()

    def take(self) -> tuple[list[notification_pb2.Notification], bool]:
        """What arrived since the last call, and whether the store must be read."""
        items, check = list(self._items), self.check_store
        self._items.clear()
        self.check_store = False
        self._event.clear()
        return items, check

    async def wait(self, seconds: float) -> bool:
        """Wait until something arrives, at most ``seconds``; True when something arrived."""
        if self._event.is_set():
            return True
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
        except TimeoutError:
            return False
        return True


class Hub:
    """The process's mailboxes and their feed: Redis pub/sub, or polling the store."""

    def __init__(
        self, notifications: NotificationRepository, redis: aioredis.Redis | None, poll_interval: float
    ) -> None:
        """Feed mailboxes from ``redis`` when given, else by polling ``notifications``."""
        self._notifications = notifications
        self._redis = redis
        self._poll_interval = poll_interval
        self._local: dict[str, set[Listener]] = {}
        self._seen: dict[str, int] = {}
        self._pubsub: Any = redis.pubsub() if redis is not None else None
        self._confirmed: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        """Open the shared pub/sub connection (before any stream can ask for a channel)."""
        if self._pubsub is not None:
            await self._pubsub.subscribe(CONTROL_CHANNEL)

    @contextlib.asynccontextmanager
    async def listen(self, user_id: str) -> AsyncIterator[Listener]:
        """A mailbox for ``user_id``'s new notifications, live once this returns."""
        listener = Listener(user_id)
        listeners = self._local.setdefault(user_id, set())
        first = not listeners
        listeners.add(listener)
        try:
            if first and self._pubsub is not None:
                await self._subscribe(user_id)
            yield listener
        finally:
            listeners.discard(listener)
            if not listeners and self._local.get(user_id) is listeners:
                del self._local[user_id]
                self._seen.pop(user_id, None)
                if self._pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await self._pubsub.unsubscribe(CHANNEL_PREFIX + user_id)

    async def _subscribe(self, user_id: str) -> None:
        channel = CHANNEL_PREFIX + user_id
        confirmed = self._confirmed[channel] = asyncio.Event()
        try:
            await self._pubsub.subscribe(channel)
            # Until Redis confirms, a PUBLISH could miss this process; the store replay that
            # follows must start after that point.
            await asyncio.wait_for(confirmed.wait(), SUBSCRIBE_CONFIRM_SECONDS)
        except (RedisError, OSError, TimeoutError) as error:
            # Streams still work: heartbeats read the store, so they only lose immediacy.
            log.warning("redis subscribe failed", extra={"fields": {"user": user_id, "error": repr(error)}})
        finally:
            self._confirmed.pop(channel, None)

    async def publish(self, notification: notification_pb2.Notification) -> None:
        """Announce a new notification to local streams and, through Redis, to other replicas."""
        user_id = notification.name.split("/")[1]
        for listener in list(self._local.get(user_id, ())):
            listener.offer(notification)
        if self._redis is not None:
            try:
                await self._redis.publish(CHANNEL_PREFIX + user_id, notification.SerializeToString())
            except (RedisError, OSError) as error:
                log.warning("redis publish failed", extra={"fields": {"user": user_id, "error": repr(error)}})

    async def drain(self) -> None:
        """End every stream of this process, because the replica is draining.

        Clients resubscribe (with their cursor) to another replica now, not when the grace period ends.
        """
        for listeners in list(self._local.values()):
            for listener in list(listeners):
                listener.drain()

    def end_user(self, user_id: str) -> None:
        """End this process's streams of ``user_id`` (their data was erased)."""
        for listener in list(self._local.get(user_id, ())):
            listener.end()

    async def run(self) -> None:
        """The feed: read Redis pub/sub, or poll the store. Runs until cancelled."""
        if self._pubsub is not None:
            await self._read_redis()
        else:
            await self._poll_store()

    async def _read_redis(self) -> None:
        backoff = RECONNECT_MIN_SECONDS
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
                backoff = RECONNECT_MIN_SECONDS
            except (RedisError, OSError) as error:
                if was_cancelled():
                    raise asyncio.CancelledError from error
                log.warning("redis pub/sub failed; reconnecting", extra={"fields": {"error": repr(error)}})
                await asyncio.sleep(backoff)  # backoff between reconnection attempts, not synchronisation
                backoff = min(backoff * 2, RECONNECT_MAX_SECONDS)
                # Messages published while the connection was down are gone: catch up from the store.
                for listeners in list(self._local.values()):
                    for listener in list(listeners):
                        listener.resync()
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        if kind == "subscribe":
            confirmed = self._confirmed.get(name)
            if confirmed is not None:
                confirmed.set()
            return
        if kind != "message" or not name.startswith(CHANNEL_PREFIX):
            return
        listeners = self._local.get(name.removeprefix(CHANNEL_PREFIX))
        if not listeners:
            return
        notification = notification_pb2.Notification()
        try:
            notification.ParseFromString(message["data"])
        except (DecodeError, TypeError):
            for listener in list(listeners):
                listener.resync()
            return
        for listener in list(listeners):
            listener.offer(notification)

    async def _poll_store(self) -> None:
        while True:
            users = list(self._local)
            if users:
                try:
                    latest = await self._notifications.sequences_of(users)
                except StoreError as error:
                    log.warning("cursor poll failed", extra={"fields": {"error": repr(error)}})
                    latest = {}
                for user_id, cursor in latest.items():
                    if cursor > self._seen.get(user_id, 0):
                        self._seen[user_id] = cursor
                        for listener in list(self._local.get(user_id, ())):
                            listener.offer(hint=cursor)
            await asyncio.sleep(self._poll_interval)  # the poll period itself: this is the fallback feed

    async def close(self) -> None:
        """Release the pub/sub connection."""
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
