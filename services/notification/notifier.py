"""Creating a notification: inbox first, then the live streams, then the outside channels.

Both SendNotification and the event consumer come through here. The inbox write is the commit
point: once it succeeds the notification exists, is streamed, and will be delivered (the first
attempt runs at once; if this process dies, the lease in ``delivery_due_at`` runs out and
another replica's ``DeliveryWorker`` makes it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from services.notification.codec import to_notification
from services.notification.delivery import EXTERNAL_CHANNELS, IN_APP, LEASE, PENDING, SENT, Dispatcher
from services.notification.directory import Directory, Recipient
from services.notification.hub import Hub
from services.notification.repository import NotificationRepository, notification_id_for
from services.runtime.storage import Document

log = logging.getLogger("fittracker.notification")


class Notifier:
    """Stores, streams and delivers new notifications."""

    def __init__(
        self,
        notifications: NotificationRepository,
        directory: Directory,
        dispatcher: Dispatcher,
        hub: Hub,
        clock: Callable[[], datetime],
    ) -> None:
        """Take every collaborator from the caller."""
        self._notifications = notifications
        self._directory = directory
        self._dispatcher = dispatcher
        self._hub = hub
        self._clock = clock
        self._attempts: set[asyncio.Task[Document]] = set()

    async def notify(
        self,
        user_id: str,
        *,
        title: str,
        body: str,
        category: str,
        data: dict[str, str],
        channels: Iterable[str] | None,
        request_id: str = "",
        recipient: Recipient | None = None,
        wait_seconds: float = 0.0,
    ) -> Document:
        """Create the notification (once per ``request_id``) and start its delivery.

        ``channels`` are the outside channels asked for (None: all of them; the inbox is implied). Waits up to
        ``wait_seconds`` for the first delivery attempt so the caller sees its outcome; the
        attempt goes on in the background if it takes longer. Raises NotFound for an unknown user.
        """
        notification_id = notification_id_for(user_id, request_id)
        existing = await self._notifications.get(user_id, notification_id) if request_id else None
        if existing is not None:
            return existing
        if recipient is None:
            recipient = await self._directory.recipient(user_id)
        asked = set(EXTERNAL_CHANNELS if channels is None else channels)
        wanted = [c for c in EXTERNAL_CHANNELS if c in asked]
        created_at = self._clock()
        deliveries = [{"channel": IN_APP, "status": SENT, "attempt_count": 1, "update_time": created_at,
                       "error_message": ""}]
        deliveries += [{"channel": c, "status": PENDING, "attempt_count": 0, "update_time": created_at,
                        "error_message": ""} for c in wanted]
        doc: Document = {
            "_id": notification_id,
            "user_id": user_id,
            "title": title,
            "body": body,
            "category": category,
            "data": data,
            "create_time": created_at,
            "read_time": None,
            "request_id": request_id,
            "deliveries": deliveries,
            # The lease of the first attempt, made below; the retry worker takes over if it never ends.
            "delivery_due_at": created_at + LEASE if wanted else None,
            "push_done": [],
            "rate_checked": False,
        }
        stored, created = await self._notifications.create(doc)
        if not created:
            return stored
        await self._hub.publish(to_notification(stored))
        if not wanted:
            return stored
        attempt = asyncio.create_task(self._dispatcher.attempt(stored, recipient), name=f"deliver-{notification_id}")
        self._attempts.add(attempt)
        attempt.add_done_callback(self._finished)
        # asyncio.wait neither cancels the attempt on timeout nor when the caller goes away.
        done, _ = await asyncio.wait({attempt}, timeout=max(wait_seconds, 0.0))
        if attempt in done and not attempt.cancelled() and attempt.exception() is None:
            return attempt.result()
        return stored

    def _finished(self, attempt: asyncio.Task[Document]) -> None:
        self._attempts.discard(attempt)
        if not attempt.cancelled() and (error := attempt.exception()) is not None:
            # The lease is still set: the retry worker makes the attempt again later.
            log.error("first delivery attempt failed", exc_info=error)

    async def close(self) -> None:
        """Stop attempts still running; their leases hand them to another replica's worker."""
        for attempt in list(self._attempts):
            attempt.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)
