"""The notification service's API: Subscribe, the inbox, devices and SendNotification."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
from fittracker.notification.v1 import notification_pb2, notification_service_pb2, notification_service_pb2_grpc

from services.notification.codec import to_device, to_notification
from services.notification.config import NotificationConfig
from services.notification.directory import Directory
from services.notification.hub import Hub
from services.notification.notifier import Notifier
from services.notification.repository import (
    DeviceRepository,
    NotificationRepository,
    device_id_for,
)
from services.notification.stream import Stream
from services.runtime import auth, paging
from services.runtime.errors import DomainError, InvalidArgument, NotFound
from services.runtime.interceptors import call_deadline
from services.runtime.names import USER, Pattern
from services.runtime.storage import Document
from services.runtime.timeutil import now

SERVICE = "fittracker.notification.v1.NotificationService"
#: Every method needs a token.
PUBLIC_METHODS: frozenset[str] = frozenset()
DEFAULT_PAGE_SIZE = 20
DEFAULT_HEARTBEAT_SECONDS = 30
MAX_DEVICES_PER_USER = 20
#: Share of the caller's remaining deadline SendNotification may spend waiting for the first attempt.
SEND_WAIT_SHARE = 0.8

Context = grpc.aio.ServicerContext[Any, Any]
NOTIFICATION = Pattern("users/{user}/notifications/{id}")
DEVICE = Pattern("users/{user}/devices/{id}")


class TooManyDevices(DomainError):
    """The user has the most devices allowed; one must be deleted first."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "DEVICE_LIMIT"


class NotificationService(notification_service_pb2_grpc.NotificationServiceServicer):
    """Implements fittracker.notification.v1.NotificationService."""

    def __init__(
        self,
        config: NotificationConfig,
        notifications: NotificationRepository,
        devices: DeviceRepository,
        directory: Directory,
        notifier: Notifier,
        hub: Hub,
        pages: paging.PageTokens,
    ) -> None:
        """Take every dependency from the caller (built once at start)."""
        self._pages = pages
        self._config = config
        self._notifications = notifications
        self._devices = devices
        self._directory = directory
        self._notifier = notifier
        self._hub = hub

    # --- real time ----------------------------------------------------------------------------

    async def Subscribe(  # noqa: N802 - gRPC method names are the contract's
        self, request: notification_service_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[notification_service_pb2.SubscribeResponse]:
        """Replay after resume_cursor, then stream live, with heartbeats."""
        user_id = await self._owner(request.parent)
        interval = (
            request.heartbeat_interval_seconds if request.HasField("heartbeat_interval_seconds")
            else DEFAULT_HEARTBEAT_SECONDS
        )
        async with self._hub.listen(user_id) as listener:
            stream = Stream(self._notifications, listener, interval, self._config.max_replay)
            async for message in stream.run(request.resume_cursor):
                yield message

    # --- inbox --------------------------------------------------------------------------------

    async def ListNotifications(  # noqa: N802 - gRPC method names are the contract's
        self, request: notification_service_pb2.ListNotificationsRequest, context: Context
    ) -> notification_service_pb2.ListNotificationsResponse:
        """A page of the inbox, newest first."""
        user_id = await self._owner(request.parent)
        size = request.page_size or DEFAULT_PAGE_SIZE
        category = notification_pb2.Category.Name(request.category) if request.category else None
        query = paging.fingerprint("notifications", user_id, request.unread_only, category)
        position = self._pages.decode(request.page_token, query)
        before = int(position[0]) if position else None
        docs = await self._notifications.page(
            user_id, limit=size + 1, before_cursor=before, unread_only=request.unread_only, category=category
        )
        page = docs[:size]
        next_token = self._pages.encode(query, [int(page[-1]["cursor"])]) if len(docs) > size else ""
        return notification_service_pb2.ListNotificationsResponse(
            notifications=[to_notification(d) for d in page], next_page_token=next_token
        )

    async def GetNotification(  # noqa: N802
        self, request: notification_service_pb2.GetNotificationRequest, context: Context
    ) -> notification_pb2.Notification:
        """One notification of the caller."""
        user_id, notification_id = self._child(NOTIFICATION, request.name)
        doc = await self._notifications.get(user_id, notification_id)
        if doc is None:
            raise NotFound(f"{request.name} not found")
        return to_notification(doc)

    async def MarkNotificationRead(  # noqa: N802
        self, request: notification_service_pb2.MarkNotificationReadRequest, context: Context
    ) -> notification_pb2.Notification:
        """Set the read time once."""
        user_id, notification_id = self._child(NOTIFICATION, request.name)
        doc = await self._notifications.mark_read(user_id, notification_id, now())
        if doc is None:
            raise NotFound(f"{request.name} not found")
        return to_notification(doc)

    async def MarkAllRead(  # noqa: N802
        self, request: notification_service_pb2.MarkAllReadRequest, context: Context
    ) -> notification_service_pb2.MarkAllReadResponse:
        """Mark unread notifications up to max_cursor read."""
        user_id = await self._owner(request.parent)
        marked = await self._notifications.mark_all_read(user_id, request.max_cursor, now())
        return notification_service_pb2.MarkAllReadResponse(marked_count=marked)

    async def GetUnreadCount(  # noqa: N802
        self, request: notification_service_pb2.GetUnreadCountRequest, context: Context
    ) -> notification_service_pb2.GetUnreadCountResponse:
        """The unread count and the latest cursor."""
        user_id = await self._owner(request.parent)
        return notification_service_pb2.GetUnreadCountResponse(
            unread_count=await self._notifications.unread_count(user_id),
            latest_cursor=await self._notifications.latest_cursor(user_id),
        )

    # --- devices ------------------------------------------------------------------------------

    async def RegisterDevice(  # noqa: N802
        self, request: notification_service_pb2.RegisterDeviceRequest, context: Context
    ) -> notification_pb2.Device:
        """Add a device, or refresh the one holding this push token (moving it to the caller)."""
        user_id = await self._owner(request.parent)
        device = request.device
        device_id = device_id_for(device.push_token)
        moment = now()
        fields: Document = {
            "user_id": user_id,
            "platform": notification_pb2.Platform.Name(device.platform),
            "push_token": device.push_token,
            "app_version": device.app_version,
            "display_name": device.display_name.strip(),
            "update_time": moment,
        }
        existing = await self._devices.get(device_id)
        if existing is None or existing["user_id"] != user_id:
            if await self._devices.count(user_id) >= MAX_DEVICES_PER_USER:
                raise TooManyDevices(f"users/{user_id} already has {MAX_DEVICES_PER_USER} devices; delete one first")
        if existing is None and await self._devices.insert({"_id": device_id, **fields, "create_time": moment}):
            stored = await self._devices.get(device_id)
        else:
            if existing is not None and existing["user_id"] != user_id:
                fields["create_time"] = moment  # a new registration for its new owner
            stored = await self._devices.update(device_id, fields)
        if stored is None:
            raise NotFound(f"users/{user_id}/devices/{device_id} was deleted while being registered")
        return to_device(stored)

    async def ListDevices(  # noqa: N802
        self, request: notification_service_pb2.ListDevicesRequest, context: Context
    ) -> notification_service_pb2.ListDevicesResponse:
        """A page of devices, most recently registered first; tokens are never returned."""
        user_id = await self._owner(request.parent)
        size = request.page_size or DEFAULT_PAGE_SIZE
        query = paging.fingerprint("devices", user_id)
        position = self._pages.decode(request.page_token, query)
        after = (datetime.fromisoformat(position[0]), str(position[1])) if position else None
        docs = await self._devices.page(user_id, limit=size + 1, after=after)
        page = docs[:size]
        next_token = ""
        if len(docs) > size:
            next_token = self._pages.encode(query, [page[-1]["update_time"].isoformat(), page[-1]["_id"]])
        return notification_service_pb2.ListDevicesResponse(
            devices=[to_device(d) for d in page], next_page_token=next_token
        )

    async def DeleteDevice(  # noqa: N802
        self, request: notification_service_pb2.DeleteDeviceRequest, context: Context
    ) -> notification_service_pb2.DeleteDeviceResponse:
        """Forget a device."""
        user_id, device_id = self._child(DEVICE, request.name)
        if not await self._devices.delete(user_id, device_id):
            raise NotFound(f"{request.name} not found")
        return notification_service_pb2.DeleteDeviceResponse()

    # --- sending ------------------------------------------------------------------------------

    async def SendNotification(  # noqa: N802
        self, request: notification_service_pb2.SendNotificationRequest, context: Context
    ) -> notification_pb2.Notification:
        """Store, stream and deliver a notification; for admins and services only."""
        auth.require_admin()
        for field in ("title", "body"):
            if not getattr(request, field).strip():
                raise InvalidArgument.field(field, "must not be blank")
        user_id = auth.resolve_user_id(USER.parse(request.parent, "parent")["user"])
        channels = [notification_pb2.Channel.Name(c) for c in request.channels] if request.channels else None
        remaining = call_deadline.get()
        wait = self._config.provider_timeout_seconds
        if remaining is not None:
            wait = min(wait, remaining * SEND_WAIT_SHARE)
        doc = await self._notifier.notify(
            user_id,
            title=request.title.strip(),
            body=request.body.strip(),
            category=notification_pb2.Category.Name(request.category),
            data=dict(request.data),
            channels=channels,
            request_id=request.request_id,
            wait_seconds=wait,
        )
        return to_notification(doc)

    # --- helpers ------------------------------------------------------------------------------

    async def _owner(self, parent: str) -> str:
        """The user id of "users/{user}" if the caller may use it; NOT_FOUND otherwise.

        A member's own id needs no check (their token proves the account); an admin or service
        naming someone else learns NOT_FOUND for an account that does not exist.
        """
        user_id = auth.resolve_user_id(USER.parse(parent, "parent")["user"])
        principal = auth.require_owner(user_id)
        if principal.user_id != user_id:
            await self._directory.require_user(user_id)
        return user_id

    def _child(self, pattern: Pattern, name: str) -> tuple[str, str]:
        """(user id, child id) of "users/{user}/<collection>/{id}", if the caller may use it."""
        user_id, ids = pattern.owned(name)
        return user_id, ids["id"]
