"""Inbox, devices, ownership and SendNotification through a real channel."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable

import grpc
import pytest
from fittracker.notification.v1 import notification_pb2, notification_service_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.notification.conftest import NotificationEnv

Chan = notification_pb2


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_send_creates_an_inbox_entry_the_owner_reads(env: NotificationEnv) -> None:
    ada = await env.account()
    sent = await env.send(ada, title="Welcome", body="Glad you are here.", data={"screen": "home"})
    assert sent.name.startswith(f"{ada.name}/notifications/")
    assert sent.cursor == 1
    assert (sent.deliveries[0].channel, sent.deliveries[0].status) == (
        Chan.CHANNEL_IN_APP, Chan.DELIVERY_STATUS_SENT)
    got = await env.stub.GetNotification(
        notification_service_pb2.GetNotificationRequest(name=sent.name), metadata=ada.auth
    )
    assert (got.title, got.body, dict(got.data), got.HasField("read_time")) == (
        "Welcome", "Glad you are here.", {"screen": "home"}, False)
    me = sent.name.replace(ada.name, "users/me")
    assert (await env.stub.GetNotification(
        notification_service_pb2.GetNotificationRequest(name=me), metadata=ada.auth)).name == sent.name


async def test_inbox_pages_newest_first_with_filters(env: NotificationEnv) -> None:
    ada = await env.account()
    for i in range(5):
        category = Chan.CATEGORY_REMINDER if i % 2 else Chan.CATEGORY_SYSTEM
        await env.send(ada, Chan.CHANNEL_IN_APP, title=f"n{i}", category=category)
    seen, token = [], ""
    for _ in range(5):
        page = await env.stub.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(parent="users/me", page_size=2, page_token=token),
            metadata=ada.auth,
        )
        seen.append([n.title for n in page.notifications])
        token = page.next_page_token
        if not token:
            break
    assert seen == [["n4", "n3"], ["n2", "n1"], ["n0"]]
    reminders = await env.stub.ListNotifications(
        notification_service_pb2.ListNotificationsRequest(parent=ada.name, category=Chan.CATEGORY_REMINDER),
        metadata=ada.auth,
    )
    assert [n.title for n in reminders.notifications] == ["n3", "n1"]
    first = await env.stub.ListNotifications(
        notification_service_pb2.ListNotificationsRequest(parent=ada.name, page_size=1), metadata=ada.auth
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(
                parent=ada.name, page_size=1, unread_only=True, page_token=first.next_page_token),
            metadata=ada.auth,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == ["page_token"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(parent=ada.name, page_token="%%garbage"),
            metadata=ada.auth,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_read_state_unread_count_and_mark_all_up_to_a_cursor(env: NotificationEnv) -> None:
    ada = await env.account()
    sent = [await env.send(ada, Chan.CHANNEL_IN_APP, title=f"n{i}") for i in range(4)]
    count = await env.stub.GetUnreadCount(
        notification_service_pb2.GetUnreadCountRequest(parent="users/me"), metadata=ada.auth
    )
    assert (count.unread_count, count.latest_cursor) == (4, 4)
    read = await env.stub.MarkNotificationRead(
        notification_service_pb2.MarkNotificationReadRequest(name=sent[0].name), metadata=ada.auth
    )
    assert read.HasField("read_time")
    again = await env.stub.MarkNotificationRead(
        notification_service_pb2.MarkNotificationReadRequest(name=sent[0].name), metadata=ada.auth
    )
    assert again.read_time == read.read_time, "marking again keeps the first read time"
    marked = await env.stub.MarkAllRead(
        notification_service_pb2.MarkAllReadRequest(parent=ada.name, max_cursor=3), metadata=ada.auth
    )
    assert marked.marked_count == 2
    unread = await env.stub.ListNotifications(
        notification_service_pb2.ListNotificationsRequest(parent=ada.name, unread_only=True), metadata=ada.auth
    )
    assert [n.cursor for n in unread.notifications] == [4]
    rest = await env.stub.MarkAllRead(notification_service_pb2.MarkAllReadRequest(parent=ada.name), metadata=ada.auth)
    assert rest.marked_count == 1
    count = await env.stub.GetUnreadCount(
        notification_service_pb2.GetUnreadCountRequest(parent=ada.name), metadata=ada.auth
    )
    assert count.unread_count == 0


async def test_another_user_gets_not_found_everywhere(env: NotificationEnv) -> None:
    ada, eve = await env.account(), await env.account()
    sent = await env.send(ada, Chan.CHANNEL_IN_APP)
    device, _ = await env.register_device(ada, Chan.PLATFORM_ANDROID)
    calls: list[Awaitable[object]] = [
        env.stub.GetNotification(notification_service_pb2.GetNotificationRequest(name=sent.name), metadata=eve.auth),
        env.stub.MarkNotificationRead(
            notification_service_pb2.MarkNotificationReadRequest(name=sent.name), metadata=eve.auth),
        env.stub.ListNotifications(notification_service_pb2.ListNotificationsRequest(parent=ada.name),
                                   metadata=eve.auth),
        env.stub.MarkAllRead(notification_service_pb2.MarkAllReadRequest(parent=ada.name), metadata=eve.auth),
        env.stub.GetUnreadCount(notification_service_pb2.GetUnreadCountRequest(parent=ada.name), metadata=eve.auth),
        env.stub.ListDevices(notification_service_pb2.ListDevicesRequest(parent=ada.name), metadata=eve.auth),
        env.stub.DeleteDevice(notification_service_pb2.DeleteDeviceRequest(name=device.name), metadata=eve.auth),
        env.stub.GetNotification(
            notification_service_pb2.GetNotificationRequest(name=sent.name.replace(ada.name, eve.name)),
            metadata=eve.auth),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Nothing changed for the owner.
    mine = await env.stub.GetNotification(
        notification_service_pb2.GetNotificationRequest(name=sent.name), metadata=ada.auth)
    assert not mine.HasField("read_time")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.ListNotifications(notification_service_pb2.ListNotificationsRequest(parent=ada.name))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_reads_any_inbox_but_an_unknown_user_is_not_found(env: NotificationEnv) -> None:
    ada = await env.account()
    await env.send(ada, Chan.CHANNEL_IN_APP)
    listed = await env.stub.ListNotifications(
        notification_service_pb2.ListNotificationsRequest(parent=ada.name), metadata=env.admin.auth)
    assert len(listed.notifications) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(parent="users/nobody"), metadata=env.admin.auth)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_send_is_for_admins_idempotent_and_validated(env: NotificationEnv) -> None:
    ada = await env.account()
    request = notification_service_pb2.SendNotificationRequest(
        parent=ada.name, title="Hi", body="There", category=Chan.CATEGORY_SYSTEM, channels=[Chan.CHANNEL_EMAIL],
        request_id=str(uuid.uuid4()),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.SendNotification(request, metadata=ada.auth)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    first = await env.stub.SendNotification(request, metadata=env.admin.auth)
    again = await env.stubs[1].SendNotification(request, metadata=env.admin.auth)
    assert again.name == first.name and again.cursor == first.cursor
    _sender, _message = await env.smtp.next(ada.email)
    assert env.smtp.pending(ada.email) == 0, "a retried send must not email again"
    listed = await env.stub.ListNotifications(
        notification_service_pb2.ListNotificationsRequest(parent=ada.name), metadata=ada.auth)
    assert len(listed.notifications) == 1
    for change, field in (({"title": ""}, "title"), ({"category": Chan.CATEGORY_UNSPECIFIED}, "category"),
                          ({"channels": [Chan.CHANNEL_EMAIL, Chan.CHANNEL_EMAIL]}, "channels"),
                          ({"request_id": "not a uuid!"}, "request_id"), ({"body": "   "}, "body")):
        bad = notification_service_pb2.SendNotificationRequest(
            parent=ada.name, title="Hi", body="There", category=Chan.CATEGORY_SYSTEM)
        for key, value in change.items():
            if isinstance(value, list):
                getattr(bad, key).extend(value)
            else:
                setattr(bad, key, value)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.stub.SendNotification(bad, metadata=env.admin.auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.send(ada.__class__("ghost", "g@example.com", ""), Chan.CHANNEL_IN_APP)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_devices_register_idempotently_move_list_and_delete(env: NotificationEnv) -> None:
    ada, bob = await env.account(), await env.account()
    device, token = await env.register_device(ada, Chan.PLATFORM_ANDROID)
    assert device.name.startswith(f"{ada.name}/devices/")
    assert device.push_token == "", "push tokens are input-only"
    again, _ = await env.register_device(ada, Chan.PLATFORM_ANDROID, token=token)
    assert again.name == device.name
    assert again.create_time == device.create_time
    assert again.update_time.ToDatetime() >= device.update_time.ToDatetime()
    second, _ = await env.register_device(ada, Chan.PLATFORM_IOS)
    listed = await env.stub.ListDevices(
        notification_service_pb2.ListDevicesRequest(parent="users/me", page_size=1), metadata=ada.auth)
    assert [d.name for d in listed.devices] == [second.name]
    assert all(d.push_token == "" for d in listed.devices)
    rest = await env.stub.ListDevices(
        notification_service_pb2.ListDevicesRequest(parent=ada.name, page_size=1, page_token=listed.next_page_token),
        metadata=ada.auth)
    assert [d.name for d in rest.devices] == [device.name] and rest.next_page_token == ""
    moved, _ = await env.register_device(bob, Chan.PLATFORM_ANDROID, token=token)
    assert moved.name == device.name.replace(ada.name, bob.name)
    ada_devices = await env.stub.ListDevices(
        notification_service_pb2.ListDevicesRequest(parent=ada.name), metadata=ada.auth)
    assert [d.name for d in ada_devices.devices] == [second.name]
    await env.stub.DeleteDevice(notification_service_pb2.DeleteDeviceRequest(name=second.name), metadata=ada.auth)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.DeleteDevice(notification_service_pb2.DeleteDeviceRequest(name=second.name), metadata=ada.auth)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.RegisterDevice(
            notification_service_pb2.RegisterDeviceRequest(
                parent=ada.name, device=notification_pb2.Device(platform=Chan.PLATFORM_UNSPECIFIED,
                                                                push_token="x" * 20)),
            metadata=ada.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == ["device.platform"]


async def test_a_user_has_at_most_twenty_devices(env: NotificationEnv) -> None:
    ada = await env.account()
    for _ in range(20):
        await env.register_device(ada, Chan.PLATFORM_WEB)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.register_device(ada, Chan.PLATFORM_WEB)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
