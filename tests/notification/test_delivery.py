"""Delivery through provider adapters to local peers that speak SMTP, FCM HTTP v1, APNs (HTTP/2)
and a JSON SMS API; channel consent, quiet hours, retries, dead tokens and the send limit."""

from __future__ import annotations

import asyncio
import urllib.parse
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import jwt
import pytest
from fittracker.notification.v1 import notification_pb2, notification_service_pb2

from tests.notification.conftest import (
    APNS_KEY_ID,
    APNS_TEAM_ID,
    APNS_TOPIC,
    FCM_PROJECT,
    SEND_LIMIT,
    SMS_API_KEY,
    Account,
    NotificationEnv,
)
from tests.notification.peers import Reply

Chan = notification_pb2
#: Bound on waiting for a retry the worker makes in the background (it polls every 0.1 s here).
SETTLE_SECONDS = 10.0


def statuses(notification: notification_pb2.Notification) -> dict[int, int]:
    return {d.channel: d.status for d in notification.deliveries}


def delivery(notification: notification_pb2.Notification, channel: int) -> notification_pb2.Delivery:
    return next(d for d in notification.deliveries if d.channel == channel)


async def settled(env: NotificationEnv, account: Account, name: str) -> notification_pb2.Notification:
    """The notification once no delivery is PENDING, read through the API (bounded)."""
    deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
    while True:
        current = await env.stub.GetNotification(
            notification_service_pb2.GetNotificationRequest(name=name), metadata=account.auth)
        if all(d.status != Chan.DELIVERY_STATUS_PENDING for d in current.deliveries):
            return current
        assert asyncio.get_running_loop().time() < deadline, f"still pending: {current.deliveries}"
        # Retries run on the worker's own schedule; re-reading the state is the only signal the API gives.
        await asyncio.sleep(0.05)


async def test_email_arrives_over_smtp(env: NotificationEnv) -> None:
    ada = await env.account()
    sent = await env.send(ada, Chan.CHANNEL_EMAIL, title="Your week", body="3 workouts, 12,400 kg lifted.")
    assert statuses(sent)[Chan.CHANNEL_EMAIL] == Chan.DELIVERY_STATUS_SENT
    assert delivery(sent, Chan.CHANNEL_EMAIL).attempt_count == 1
    sender, message = await env.smtp.next(ada.email)
    assert sender == "no-reply@fittracker.test"
    assert message["Subject"] == "Your week"
    assert message["To"] == f"Ada <{ada.email}>"
    assert message["Message-ID"] == f"<{sent.name.rsplit('/', 1)[1]}@fittracker.app>"
    assert message["Auto-Submitted"] == "auto-generated"
    text = message.get_body(preferencelist=("plain",))
    assert text is not None and "3 workouts, 12,400 kg lifted." in text.get_content()


async def test_a_refused_recipient_fails_without_retry(env: NotificationEnv) -> None:
    reject = await env.account(email="reject-me@example.com")
    sent = await env.send(reject, Chan.CHANNEL_EMAIL)
    email = delivery(sent, Chan.CHANNEL_EMAIL)
    assert email.status == Chan.DELIVERY_STATUS_FAILED
    assert "550" in email.error_message and email.attempt_count == 1


async def test_android_push_goes_through_fcm_http_v1_with_an_oauth_token(env: NotificationEnv) -> None:
    ada = await env.account()
    _device, token = await env.register_device(ada, Chan.PLATFORM_ANDROID)
    sent = await env.send(ada, Chan.CHANNEL_PUSH, title="New personal record!", body="Squat: 120 kg",
                          data={"session": "users/x/sessions/s1"})
    assert statuses(sent)[Chan.CHANNEL_PUSH] == Chan.DELIVERY_STATUS_SENT
    request = await env.http.next(token)
    assert request.method == "POST"
    assert request.path == f"/v1/projects/{FCM_PROJECT}/messages:send"
    assert request.headers["content-type"].startswith("application/json")
    assert request.headers["authorization"].removeprefix("Bearer ") in env.http.issued_tokens
    message = request.json()["message"]
    assert message["token"] == token
    assert message["notification"] == {"title": "New personal record!", "body": "Squat: 120 kg"}
    assert message["data"]["session"] == "users/x/sessions/s1"
    assert message["data"]["notification"] == sent.name
    assert message["data"]["cursor"] == str(sent.cursor)


async def test_the_fcm_access_token_comes_from_a_signed_jwt_bearer_grant(env: NotificationEnv) -> None:
    ada = await env.account()
    await env.register_device(ada, Chan.PLATFORM_WEB)
    # A fresh replica exchanges its key at least once; any exchange recorded so far shows the format.
    await env.send(ada, Chan.CHANNEL_PUSH, replica=1)
    exchange = await env.http.next("token")
    form = dict(urllib.parse.parse_qsl(exchange.body.decode()))
    assert exchange.headers["content-type"] == "application/x-www-form-urlencoded"
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    claims = jwt.decode(form["assertion"], env.keys.fcm_public_key, algorithms=["RS256"],
                        audience=f"{env.http.url}/token")
    assert claims["iss"] == env.keys.fcm_client_email
    assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
    assert jwt.get_unverified_header(form["assertion"])["kid"] == "fcm-key-1"


async def test_ios_push_goes_through_apns_over_http2(env: NotificationEnv) -> None:
    ada = await env.account()
    _device, token = await env.register_device(ada, Chan.PLATFORM_IOS)
    sent = await env.send(ada, Chan.CHANNEL_PUSH, title="7-day streak!", body="Keep going.")
    assert statuses(sent)[Chan.CHANNEL_PUSH] == Chan.DELIVERY_STATUS_SENT
    request = await env.apns.next(token)
    headers = request.headers
    assert (headers[":method"], headers[":path"]) == ("POST", f"/3/device/{token}")
    assert headers["apns-topic"] == APNS_TOPIC
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    assert headers["apns-collapse-id"] == sent.name.rsplit("/", 1)[1]
    assert int(headers["apns-expiration"]) > datetime.now(UTC).timestamp()
    provider_token = headers["authorization"].removeprefix("bearer ")
    assert jwt.get_unverified_header(provider_token)["kid"] == APNS_KEY_ID
    claims = jwt.decode(provider_token, env.keys.apns_public_key, algorithms=["ES256"])
    assert claims["iss"] == APNS_TEAM_ID
    payload = request.json()
    assert payload["aps"]["alert"] == {"title": "7-day streak!", "body": "Keep going."}
    assert payload["notification"] == sent.name


async def test_sms_goes_to_the_json_gateway(env: NotificationEnv) -> None:
    ada = await env.account()
    phone = "+33612345678"
    await env.set_notifications(ada, sms_enabled=True, phone_number=phone)
    sent = await env.send(ada, Chan.CHANNEL_SMS, title="Reminder", body="Leg day today.")
    assert statuses(sent)[Chan.CHANNEL_SMS] == Chan.DELIVERY_STATUS_SENT
    request = await env.http.next(phone)
    assert request.path == "/sms"
    assert request.headers["authorization"] == f"Bearer {SMS_API_KEY}"
    assert request.headers["idempotency-key"] == f"{sent.name.rsplit('/', 1)[1]}-sms"
    body = request.json()
    assert (body["to"], body["from"], body["body"]) == (phone, "FitTracker", "Reminder: Leg day today.")


async def test_all_channels_by_default_and_disabled_ones_are_skipped(env: NotificationEnv) -> None:
    ada = await env.account()
    await env.set_notifications(ada, push_enabled=True, email_enabled=False, sms_enabled=True)
    sent = await env.send(ada)
    assert statuses(sent) == {
        Chan.CHANNEL_IN_APP: Chan.DELIVERY_STATUS_SENT,
        Chan.CHANNEL_PUSH: Chan.DELIVERY_STATUS_SKIPPED_DISABLED,  # no device
        Chan.CHANNEL_EMAIL: Chan.DELIVERY_STATUS_SKIPPED_DISABLED,  # turned off
        Chan.CHANNEL_SMS: Chan.DELIVERY_STATUS_SKIPPED_DISABLED,  # no number
    }
    assert all(d.error_message == "" for d in sent.deliveries)
    assert env.smtp.pending(ada.email) == 0


async def test_quiet_hours_skip_outside_channels_but_keep_the_inbox(env: NotificationEnv) -> None:
    ada = await env.account()
    await env.register_device(ada, Chan.PLATFORM_ANDROID)
    local = datetime.now(UTC).astimezone(ZoneInfo("Asia/Tokyo"))
    minute = local.hour * 60 + local.minute
    await env.set_notifications(
        ada, time_zone="Asia/Tokyo", push_enabled=True, email_enabled=True,
        quiet_hours_start_minute=(minute - 60) % 1440, quiet_hours_end_minute=(minute + 60) % 1440,
    )
    sent = await env.send(ada, Chan.CHANNEL_PUSH, Chan.CHANNEL_EMAIL)
    assert statuses(sent)[Chan.CHANNEL_PUSH] == Chan.DELIVERY_STATUS_SKIPPED_QUIET_HOURS
    assert statuses(sent)[Chan.CHANNEL_EMAIL] == Chan.DELIVERY_STATUS_SKIPPED_QUIET_HOURS
    inbox = await env.stub.ListNotifications(
        notification_service_pb2.ListNotificationsRequest(parent=ada.name), metadata=ada.auth)
    assert [n.name for n in inbox.notifications] == [sent.name]


async def test_a_provider_outage_is_retried_with_backoff(env: NotificationEnv) -> None:
    ada = await env.account()
    _device, token = await env.register_device(ada, Chan.PLATFORM_ANDROID)
    env.http.script(token, Reply(503, {"error": {"status": "UNAVAILABLE", "message": "try later"}},
                                 {"retry-after": "0"}))
    sent = await env.send(ada, Chan.CHANNEL_PUSH)
    push = delivery(sent, Chan.CHANNEL_PUSH)
    assert (push.status, push.attempt_count) == (Chan.DELIVERY_STATUS_PENDING, 1)
    await env.http.next(token)
    await env.http.next(token)  # the retry
    final = await settled(env, ada, sent.name)
    push = delivery(final, Chan.CHANNEL_PUSH)
    assert (push.status, push.attempt_count, push.error_message) == (Chan.DELIVERY_STATUS_SENT, 2, "")


async def test_retries_stop_after_the_last_attempt(env: NotificationEnv) -> None:
    ada = await env.account()
    phone = "+14155550123"
    await env.set_notifications(ada, sms_enabled=True, phone_number=phone)
    env.http.script(phone, *[Reply(500, {"error": "gateway down"})] * 5)
    sent = await env.send(ada, Chan.CHANNEL_SMS)
    final = await settled(env, ada, sent.name)
    sms = delivery(final, Chan.CHANNEL_SMS)
    assert (sms.status, sms.attempt_count) == (Chan.DELIVERY_STATUS_FAILED, 5)
    assert "gave up after 5 attempts" in sms.error_message and "gateway down" in sms.error_message


@pytest.mark.parametrize("platform", [Chan.PLATFORM_ANDROID, Chan.PLATFORM_IOS])
async def test_a_dead_push_token_fails_and_forgets_the_device(env: NotificationEnv, platform: int) -> None:
    ada = await env.account()
    device, token = await env.register_device(ada, platform)  # type: ignore[arg-type]
    if platform == Chan.PLATFORM_IOS:
        env.apns.script(token, Reply(410, {"reason": "Unregistered", "timestamp": 1700000000000}))
    else:
        env.http.script(token, Reply(404, {"error": {"code": 404, "status": "NOT_FOUND", "message": "gone",
                                                     "details": [{"errorCode": "UNREGISTERED"}]}}))
    sent = await env.send(ada, Chan.CHANNEL_PUSH)
    push = delivery(sent, Chan.CHANNEL_PUSH)
    assert push.status == Chan.DELIVERY_STATUS_FAILED
    assert "unregistered" in push.error_message.lower()
    listed = await env.stub.ListDevices(
        notification_service_pb2.ListDevicesRequest(parent=ada.name), metadata=ada.auth)
    assert device.name not in [d.name for d in listed.devices]


async def test_push_reaches_every_device_once(env: NotificationEnv) -> None:
    ada = await env.account()
    _ios, ios_token = await env.register_device(ada, Chan.PLATFORM_IOS)
    _android, android_token = await env.register_device(ada, Chan.PLATFORM_ANDROID)
    env.apns.script(ios_token, Reply(503, {"reason": "ServiceUnavailable"}))
    sent = await env.send(ada, Chan.CHANNEL_PUSH)
    assert delivery(sent, Chan.CHANNEL_PUSH).status == Chan.DELIVERY_STATUS_PENDING
    final = await settled(env, ada, sent.name)
    assert delivery(final, Chan.CHANNEL_PUSH).status == Chan.DELIVERY_STATUS_SENT
    await env.apns.next(ios_token)
    await env.apns.next(ios_token)
    await env.http.next(android_token)
    assert env.http.pending(android_token) == 0, "the device that took it is not sent it again"


async def test_the_per_user_send_limit_spares_the_inbox(env: NotificationEnv) -> None:
    ada = await env.account()
    for _ in range(SEND_LIMIT):
        sent = await env.send(ada, Chan.CHANNEL_EMAIL)
        assert statuses(sent)[Chan.CHANNEL_EMAIL] == Chan.DELIVERY_STATUS_SENT
    over = await env.send(ada, Chan.CHANNEL_EMAIL)
    email = delivery(over, Chan.CHANNEL_EMAIL)
    assert email.status == Chan.DELIVERY_STATUS_FAILED and "rate limited" in email.error_message
    count = await env.stub.GetUnreadCount(
        notification_service_pb2.GetUnreadCountRequest(parent=ada.name), metadata=ada.auth)
    assert count.unread_count == SEND_LIMIT + 1
