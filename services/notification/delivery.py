"""Delivery of a stored notification on push, email and SMS: policy, attempts, retries.

Every attempt re-reads the recipient from the user service, so consent and quiet hours are those
in force at send time. For each channel still PENDING it decides, in this order: the channel is
off or has no address, number or device (SKIPPED_DISABLED); the user's local time is in quiet
hours (SKIPPED_QUIET_HOURS, the notification stays in the inbox); the per-user send limit is
used up (FAILED, counted once per notification); otherwise the provider is called. A retryable
failure keeps the channel PENDING with ``delivery_due_at`` set after an exponential backoff with
jitter (or the provider's Retry-After, if longer); after the last attempt, or a refusal, it is FAILED.

Attempts are leased: whoever attempts a notification first moves ``delivery_due_at`` past the
attempt's longest possible duration, so the retry worker of another replica does not send it
twice. The first attempt runs right after creation; ``DeliveryWorker`` runs the retries and
picks up attempts a crashed process never finished.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fittracker.user.v1 import user_pb2

from services.notification.codec import notification_name
from services.notification.config import NotificationConfig
from services.notification.directory import Directory, Recipient
from services.notification.hub import was_cancelled
from services.notification.providers import SendResult
from services.notification.providers.apns import ApnsProvider
from services.notification.providers.email import Email, EmailProvider
from services.notification.providers.fcm import FcmProvider
from services.notification.providers.sms import SmsProvider
from services.notification.repository import DeviceRepository, NotificationRepository
from services.runtime.counters import Counters
from services.runtime.errors import NotFound, Unavailable
from services.runtime.storage import Document, StoreError

log = logging.getLogger("fittracker.notification.delivery")

PENDING = "DELIVERY_STATUS_PENDING"
SENT = "DELIVERY_STATUS_SENT"
FAILED = "DELIVERY_STATUS_FAILED"
SKIPPED_QUIET = "DELIVERY_STATUS_SKIPPED_QUIET_HOURS"
SKIPPED_DISABLED = "DELIVERY_STATUS_SKIPPED_DISABLED"
IN_APP, PUSH, EMAIL, SMS = "CHANNEL_IN_APP", "CHANNEL_PUSH", "CHANNEL_EMAIL", "CHANNEL_SMS"
EXTERNAL_CHANNELS = (PUSH, EMAIL, SMS)
#: Longer than any one attempt can take (two user-service calls, a token exchange, a send).
LEASE = timedelta(seconds=120)
#: Notifications the retry worker takes per sweep, and attempts it runs at once.
SWEEP_BATCH = 50
SWEEP_CONCURRENCY = 8


def in_quiet_hours(settings: user_pb2.NotificationSettings, time_zone: str, at: datetime) -> bool:
    """Whether ``at`` falls in the user's quiet hours, in their time zone (UTC when unknown)."""
    start, end = settings.quiet_hours_start_minute, settings.quiet_hours_end_minute
    if start == end:
        return False
    try:
        zone: ZoneInfo | Any = ZoneInfo(time_zone) if time_zone else UTC
    except (ZoneInfoNotFoundError, ValueError):
        zone = UTC
    local = at.astimezone(zone)
    minute = local.hour * 60 + local.minute
    # A window like 22:00-07:00 wraps past midnight.
    return start <= minute < end if start < end else minute >= start or minute < end


@dataclass
class Providers:
    """The configured provider adapters; None where the operator configured none."""

    email: EmailProvider | None = None
    fcm: FcmProvider | None = None
    apns: ApnsProvider | None = None
    sms: SmsProvider | None = None

    async def close(self) -> None:
        """Close long-lived connections (APNs)."""
        if self.apns is not None:
            await self.apns.close()


@dataclass
class _Outcome:
    status: str
    error: str = ""
    attempted: bool = False
    retry_after: float | None = None


class Dispatcher:
    """Makes one delivery attempt of a notification and records the outcome."""

    def __init__(
        self,
        config: NotificationConfig,
        notifications: NotificationRepository,
        devices: DeviceRepository,
        directory: Directory,
        counters: Counters,
        providers: Providers,
        clock: Callable[[], datetime],
    ) -> None:
        """Take every collaborator from the caller."""
        self._config = config
        self._notifications = notifications
        self._devices = devices
        self._directory = directory
        self._counters = counters
        self._providers = providers
        self._clock = clock

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt ``attempt + 1``: exponential with +-20% jitter, at least Retry-After."""
        base = min(self._config.retry_max_seconds, self._config.retry_base_seconds * float(2 ** max(0, attempt - 1)))
        # Jitter spreads the retries of many notifications failing together (a provider outage).
        jittered = base * (0.8 + secrets.randbelow(401) / 1000)
        return min(self._config.retry_max_seconds, max(jittered, retry_after or 0.0))

    async def attempt(self, doc: Document, recipient: Recipient | None = None) -> Document:
        """Try every PENDING channel of ``doc`` once and store the result; return the stored notification."""
        pending = [d["channel"] for d in doc["deliveries"] if d["status"] == PENDING]
        if not pending:
            return await self._notifications.record_deliveries(doc["_id"], {"delivery_due_at": None}) or doc
        outcomes: dict[str, _Outcome]
        changes: dict[str, Any] = {}
        if recipient is None:
            try:
                recipient = await self._directory.recipient(doc["user_id"])
            except NotFound:
                outcomes = {c: _Outcome(FAILED, "the account no longer exists") for c in pending}
            except Unavailable as error:
                outcomes = {c: _Outcome(PENDING, error.message, attempted=True) for c in pending}
        if recipient is not None:
            outcomes = await self._decide_and_send(doc, recipient, pending, changes)
        return await self._record(doc, outcomes, changes)

    async def _decide_and_send(
        self, doc: Document, recipient: Recipient, pending: list[str], changes: dict[str, Any]
    ) -> dict[str, _Outcome]:
        settings = recipient.preferences.notifications
        quiet = in_quiet_hours(settings, recipient.preferences.time_zone, self._clock())
        done_devices = set(doc.get("push_done") or [])
        devices = [d for d in await self._devices.of_user(doc["user_id"]) if d["_id"] not in done_devices] \
            if PUSH in pending else []
        reachable = {
            PUSH: settings.push_enabled and bool(devices),
            EMAIL: settings.email_enabled and bool(recipient.email),
            SMS: settings.sms_enabled and bool(settings.phone_number),
        }
        outcomes: dict[str, _Outcome] = {}
        to_send: list[str] = []
        for channel in pending:
            if not reachable.get(channel, False):
                outcomes[channel] = _Outcome(SKIPPED_DISABLED)
            elif quiet:
                outcomes[channel] = _Outcome(SKIPPED_QUIET)
            else:
                to_send.append(channel)
        if to_send and not doc.get("rate_checked"):
            changes["rate_checked"] = True
            key = f"notification:send:{doc['user_id']}"
            sent = await self._counters.incr(key, self._config.send_limit_window_seconds)
            if sent > self._config.send_limit_per_user:
                limit = f"{self._config.send_limit_per_user} per {self._config.send_limit_window_seconds} s"
                for channel in to_send:
                    outcomes[channel] = _Outcome(FAILED, f"rate limited: more than {limit} to this user")
                to_send = []
        sends = {
            PUSH: lambda: self._send_push(doc, devices, changes),
            EMAIL: lambda: self._send_email(doc, recipient),
            SMS: lambda: self._send_sms(doc, settings.phone_number),
        }
        results = await asyncio.gather(*(sends[c]() for c in to_send))
        for channel, result in zip(to_send, results, strict=True):
            if result.ok:
                outcomes[channel] = _Outcome(SENT, attempted=True)
            elif result.retryable:
                outcomes[channel] = _Outcome(PENDING, result.error, attempted=True, retry_after=result.retry_after)
            else:
                outcomes[channel] = _Outcome(FAILED, result.error, attempted=True)
        return outcomes

    async def _send_email(self, doc: Document, recipient: Recipient) -> SendResult:
        provider = self._providers.email
        if provider is None:
            return SendResult.refused("email is not configured on this server (FITTRACKER_SMTP_HOST)")
        return await provider.send(Email(
            to_address=recipient.email, to_name=recipient.display_name, subject=doc["title"], text=doc["body"],
            message_id=f"{doc['_id']}@fittracker.app", reference=notification_name(doc),
        ))

    async def _send_sms(self, doc: Document, phone_number: str) -> SendResult:
        provider = self._providers.sms
        if provider is None:
            return SendResult.refused("SMS is not configured on this server (FITTRACKER_SMS_ENDPOINT)")
        return await provider.send(phone_number, f"{doc['title']}: {doc['body']}", reference=f"{doc['_id']}-sms")

    async def _send_push(self, doc: Document, devices: list[Document], changes: dict[str, Any]) -> SendResult:
        """Send to every device not reached yet; SENT once none is left to retry and one took it."""
        data = {**(doc.get("data") or {}), "notification": notification_name(doc), "cursor": str(doc["cursor"]),
                "category": doc["category"]}
        results = await asyncio.gather(*(self._send_to_device(doc, device, data) for device in devices))
        done = list(doc.get("push_done") or [])
        retry: list[SendResult] = []
        refused: list[SendResult] = []
        for device, result in zip(devices, results, strict=True):
            if result.ok:
                done.append(device["_id"])
            elif result.retryable:
                retry.append(result)
            else:
                refused.append(result)
                if result.drop_device:
                    # The provider says the token is dead: stop sending to it (and paying for it).
                    await self._devices.delete(doc["user_id"], device["_id"])
        changes["push_done"] = done
        if retry:
            delays = [r.retry_after for r in retry if r.retry_after is not None]
            return SendResult.retry(retry[0].error, max(delays) if delays else None)
        if done:
            return SendResult.accepted()
        return refused[0] if refused else SendResult.refused("no device accepted the push")

    async def _send_to_device(self, doc: Document, device: Document, data: dict[str, str]) -> SendResult:
        if device["platform"] == "PLATFORM_IOS":
            if self._providers.apns is None:
                return SendResult.refused("APNs is not configured on this server (FITTRACKER_APNS_KEY_FILE)")
            return await self._providers.apns.send(device["push_token"], doc["title"], doc["body"], data, doc["_id"])
        if self._providers.fcm is None:
            return SendResult.refused("FCM is not configured on this server (FITTRACKER_FCM_CREDENTIALS_FILE)")
        return await self._providers.fcm.send(device["push_token"], doc["title"], doc["body"], data)

    async def _record(self, doc: Document, outcomes: dict[str, _Outcome], changes: dict[str, Any]) -> Document:
        now = self._clock()
        due: list[datetime] = []
        entries = []
        for entry in doc["deliveries"]:
            outcome = outcomes.get(entry["channel"])
            if outcome is None or entry["status"] != PENDING:
                entries.append(entry)
                continue
            attempts = int(entry.get("attempt_count", 0)) + (1 if outcome.attempted else 0)
            status, error = outcome.status, outcome.error
            if status == PENDING:
                if attempts >= self._config.delivery_max_attempts:
                    status, error = FAILED, f"gave up after {attempts} attempts: {outcome.error}"
                else:
                    due.append(now + timedelta(seconds=self.backoff(attempts, outcome.retry_after)))
            entries.append({
                "channel": entry["channel"], "status": status, "attempt_count": attempts, "update_time": now,
                # The contract shows an error only on FAILED; the last one of a retry stays for operators.
                "error_message": error if status == FAILED else "",
                "last_error": error,
            })
        changes.update(deliveries=entries, delivery_due_at=min(due) if due else None)
        stored = await self._notifications.record_deliveries(doc["_id"], changes)
        return stored if stored is not None else {**doc, **changes}


class DeliveryWorker:
    """Runs due attempts: retries, and first attempts a crashed process left behind."""

    def __init__(
        self, notifications: NotificationRepository, dispatcher: Dispatcher, poll_interval: float,
        clock: Callable[[], datetime],
    ) -> None:
        """Look for due attempts every ``poll_interval`` seconds."""
        self._notifications = notifications
        self._dispatcher = dispatcher
        self._poll_interval = poll_interval
        self._clock = clock
        self._limit = asyncio.Semaphore(SWEEP_CONCURRENCY)

    async def run(self) -> None:
        """Sweep until cancelled."""
        while True:
            try:
                await self.sweep()
            except (StoreError, OSError) as error:
                if was_cancelled():
                    raise asyncio.CancelledError from error
                log.warning("delivery sweep failed", extra={"fields": {"error": repr(error)}})
            await asyncio.sleep(self._poll_interval)  # the sweep period; retries are due seconds apart

    async def sweep(self) -> int:
        """Claim and attempt the due notifications; return how many were attempted."""
        now = self._clock()
        claimed = []
        for doc in await self._notifications.due(now, SWEEP_BATCH):
            mine = await self._notifications.claim(doc, now + LEASE)
            if mine is not None:
                claimed.append(mine)
        await asyncio.gather(*(self._attempt(doc) for doc in claimed))
        return len(claimed)

    async def _attempt(self, doc: Document) -> None:
        async with self._limit:
            try:
                await self._dispatcher.attempt(doc)
            except Exception:
                # The lease runs out and another sweep tries again; one bad notification must not stop the rest.
                log.exception("delivery attempt failed", extra={"fields": {"notification": notification_name(doc)}})

