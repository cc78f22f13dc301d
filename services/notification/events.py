"""Domain events this service consumes: facts become notifications, UserDeleted erases data.

Workout and analytics facts (records, completed sessions, streaks) become notifications, and so
does a sign-up attempt with an existing account's email (its owner is told by email);
UserDeleted erases the user's notifications and devices. The bus delivers at least once.
Notifications are created with the event id as request id, so a redelivered event finds the
notification it already made; erasure is naturally idempotent, and its DataErased answer has a
deterministic event id, so a repeated answer is recognised downstream.
"""

from __future__ import annotations

import logging

from fittracker.events.v1 import events_pb2
from fittracker.notification.v1 import notification_pb2

from services.notification import content
from services.notification.directory import Directory
from services.notification.hub import Hub
from services.notification.notifier import Notifier
from services.notification.repository import DeviceRepository, NotificationRepository
from services.runtime.errors import NotFound
from services.runtime.events import Outbox, data_erased, stream_of

log = logging.getLogger("fittracker.notification.events")

SERVICE_NAME = "notification"
CONSUMER_GROUP = "notification"
#: Who publishes what this service listens to.
STREAMS = (stream_of("workout"), stream_of("analytics"), stream_of("user"))


class EventHandler:
    """Routes each envelope to what it means for notifications."""

    def __init__(
        self,
        notifier: Notifier,
        directory: Directory,
        notifications: NotificationRepository,
        devices: DeviceRepository,
        hub: Hub,
        outbox: Outbox,
    ) -> None:
        """Take every collaborator from the caller."""
        self._notifier = notifier
        self._directory = directory
        self._notifications = notifications
        self._devices = devices
        self._hub = hub
        self._outbox = outbox

    async def __call__(self, envelope: events_pb2.EventEnvelope) -> None:
        """Handle one event; other payloads are none of this service's business."""
        kind = envelope.WhichOneof("payload")
        user_id = envelope.user.removeprefix("users/")
        if not user_id:
            return
        if kind == "user_deleted":
            await self._erase(user_id, envelope.user_deleted)
        elif kind in ("personal_record_achieved", "session_completed", "streak_milestone_reached",
                      "registration_attempted"):
            await self._notify(user_id, envelope)

    async def _notify(self, user_id: str, envelope: events_pb2.EventEnvelope) -> None:
        try:
            recipient = await self._directory.recipient(user_id)
        except NotFound:
            # The account is gone (its deletion may have overtaken this event): nobody to tell.
            log.info("event for a deleted user skipped", extra={"fields": {"event_id": envelope.event_id}})
            return
        units = content.Units(recipient.preferences.unit_system)
        kind = envelope.WhichOneof("payload")
        if kind == "personal_record_achieved":
            record = envelope.personal_record_achieved
            name = await self._directory.exercise_name(record.exercise) if record.exercise else "your exercise"
            made = content.personal_record(record, name, units)
        elif kind == "session_completed":
            made = content.session_completed(envelope.session_completed, units)
        elif kind == "registration_attempted":
            made = content.registration_attempted()
        else:
            made = content.streak_milestone(envelope.streak_milestone_reached)
        await self._notifier.notify(
            user_id,
            title=made.title,
            body=made.body,
            category=notification_pb2.Category.Name(made.category),
            data=made.data,
            channels=[notification_pb2.Channel.Name(c) for c in made.channels],
            request_id=envelope.event_id,
            recipient=recipient,
        )

    async def _erase(self, user_id: str, deleted: events_pb2.UserDeleted) -> None:
        notifications = await self._notifications.erase_user(user_id)
        devices = await self._devices.erase_user(user_id)
        await self._outbox.add(data_erased(SERVICE_NAME, user_id, deleted.deletion_request_id))
        # Last, so a client whose stream ends finds the erasure complete.
        self._hub.end_user(user_id)
        log.info("user data erased", extra={"fields": {"user": user_id, "notifications": notifications,
                                                        "devices": devices}})
