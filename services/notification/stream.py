"""One Subscribe stream: replay after the client's cursor, then live, in cursor order, once each.

The stream keeps ``delivered``, the cursor the client has, and only ever sends ``delivered + 1``
next, so nothing is sent twice and nothing is skipped silently. Notifications reach it from the
store (replay, catch-up) and from its mailbox (live); either may bring one "too early": two
writers can allocate cursors 5 and 6 and insert 6 first. Then 6 waits while the stream re-reads
the store for 5. A cursor that stays missing for ``GAP_GRACE`` was allocated by a writer that
failed before inserting (or expired): the stream steps over it, since waiting longer would stall
the user's stream for nothing.

Registration comes first, replay second: the mailbox is live before the store is read, so a
notification created in between is in one or the other (or both, and sent once).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC

from fittracker.notification.v1 import notification_pb2, notification_service_pb2

from services.notification.codec import to_notification
from services.notification.hub import Listener
from services.notification.repository import NotificationRepository
from services.runtime.errors import NotFound, Unavailable
from services.runtime.timeutil import now, to_timestamp

#: How long a missing cursor may stay missing before the stream steps over it.
GAP_GRACE = 5.0
#: Notifications read from the store per query while catching up.
FETCH_BATCH = 100
#: First and longest pause between store reads while waiting for a missing cursor.
GAP_RETRY_MIN = 0.05
GAP_RETRY_MAX = 1.0


class Stream:
    """Produces the SubscribeResponse messages of one subscription."""

    def __init__(
        self,
        notifications: NotificationRepository,
        listener: Listener,
        heartbeat_seconds: float,
        max_replay: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Stream ``listener.user_id``'s notifications, with a heartbeat after ``heartbeat_seconds`` of silence."""
        self._notifications = notifications
        self._listener = listener
        self._user_id = listener.user_id
        self._heartbeat_seconds = heartbeat_seconds
        self._max_replay = max_replay
        self._clock = clock
        self._delivered = 0
        self._target = 0
        self._pending: dict[int, notification_pb2.Notification] = {}
        self._behind_since: float | None = None

    async def run(self, resume_cursor: int) -> AsyncIterator[notification_service_pb2.SubscribeResponse]:
        """The stream: a heartbeat, the replay, then live notifications and heartbeats until cancelled."""
        latest, truncated = await self._position(resume_cursor)
        yield _heartbeat(latest, truncated)
        last_sent = self._clock()
        gap_wait = GAP_RETRY_MIN
        while True:
            arrived, check_store = self._listener.take()
            if self._listener.ended:
                raise NotFound(f"users/{self._user_id} not found")
            if self._listener.draining:
                raise Unavailable("this server is shutting down; subscribe again with your last cursor")
            for notification in arrived:
                self._offer(notification)
            self._target = max(self._target, self._listener.hint)
            if check_store or self._is_behind():
                await self._fetch()
            progressed = False
            for notification in self._ready():
                yield notification_service_pb2.SubscribeResponse(notification=notification)
                last_sent, progressed = self._clock(), True
            if progressed and self._is_behind():
                gap_wait = GAP_RETRY_MIN
                continue  # more to replay: read the next batch at once
            idle = self._heartbeat_seconds - (self._clock() - last_sent)
            timeout = idle
            if self._is_behind():
                # Re-read the store soon, then less and less often, until the hole fills or is stepped over.
                timeout, gap_wait = min(idle, gap_wait), min(gap_wait * 2, GAP_RETRY_MAX)
            else:
                gap_wait = GAP_RETRY_MIN
            if timeout > 0 and await self._listener.wait(timeout):
                continue
            if self._clock() - last_sent >= self._heartbeat_seconds:
                for message in await self._heartbeat_with_catch_up():
                    yield message
                last_sent = self._clock()

    async def _position(self, resume_cursor: int) -> tuple[int, bool]:
        """Set where the replay starts; return the latest cursor and whether the replay is incomplete."""
        latest = await self._notifications.latest_cursor(self._user_id)
        self._target = latest
        if resume_cursor == 0 or resume_cursor >= latest:
            # Nothing to replay; a cursor from the future (another account, a wiped store) restarts at now.
            self._delivered = latest
            return latest, False
        self._delivered, truncated = await self._notifications.replay_start(
            self._user_id, resume_cursor, self._max_replay
        )
        return latest, truncated

    async def _heartbeat_with_catch_up(self) -> list[notification_service_pb2.SubscribeResponse]:
        """A heartbeat, preceded by anything the store has that the mailbox never brought.

        This is the safety net for a lost pub/sub message: the store says what exists.
        """
        stored = await self._notifications.latest_cursor(self._user_id)
        self._target = max(self._target, stored)
        out = []
        if self._is_behind():
            await self._fetch()
            out = [notification_service_pb2.SubscribeResponse(notification=n) for n in self._ready()]
        out.append(_heartbeat(max(stored, self._delivered), False))
        return out

    def _offer(self, notification: notification_pb2.Notification) -> None:
        cursor = notification.cursor
        self._target = max(self._target, cursor)
        if cursor > self._delivered:
            self._pending[cursor] = notification

    def _is_behind(self) -> bool:
        return self._delivered < self._target

    async def _fetch(self) -> None:
        needed = self._delivered + 1
        if needed in self._pending:
            return
        for doc in await self._notifications.after(self._user_id, self._delivered, FETCH_BATCH):
            self._offer(to_notification(doc))

    def _ready(self) -> list[notification_pb2.Notification]:
        """The notifications that continue ``delivered`` without a hole, stepping over stale holes."""
        out: list[notification_pb2.Notification] = []
        while True:
            following = self._pending.pop(self._delivered + 1, None)
            if following is not None:
                out.append(following)
                self._delivered += 1
                self._behind_since = None
                continue
            if not self._is_behind():
                self._behind_since = None
                break
            moment = self._clock()
            if self._behind_since is None:
                self._behind_since = moment
            if moment - self._behind_since < GAP_GRACE and not self._hole_is_old():
                break
            # The hole outlived the grace period: its writer failed. Step over it.
            self._delivered = (min(self._pending) - 1) if self._pending else self._target
            self._behind_since = None
        return out


    def _hole_is_old(self) -> bool:
        """Whether the notification after the hole is older than the grace period (an old, permanent hole)."""
        if not self._pending:
            return False
        after_hole = self._pending[min(self._pending)]
        age = (now() - after_hole.create_time.ToDatetime(tzinfo=UTC)).total_seconds()
        return age >= GAP_GRACE


def _heartbeat(latest_cursor: int, truncated: bool) -> notification_service_pb2.SubscribeResponse:
    return notification_service_pb2.SubscribeResponse(
        heartbeat=notification_service_pb2.Heartbeat(
            send_time=to_timestamp(now()), latest_cursor=latest_cursor, replay_truncated=truncated
        )
    )
