"""Push to iOS through the Apple Push Notification service (APNs), HTTP/2 with token auth.

``POST /3/device/<device token>`` with ``authorization: bearer <JWT>``, ``apns-topic`` (the app's
bundle id), ``apns-push-type: alert``, ``apns-priority``, ``apns-expiration`` and
``apns-collapse-id``, and a JSON body ``{"aps": {"alert": {"title", "body"}, ...}, ...data}``.
The JWT is ES256, signed with the team's ``.p8`` key (``kid`` = key id, ``iss`` = team id); Apple
wants it refreshed at most every 20 minutes and at least every 60, so it is reused for 40.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt

from services.notification.providers import SendResult, classify_http
from services.notification.providers.h2client import H2Client

TOKEN_LIFETIME_SECONDS = 40 * 60
#: APNs refuses payloads above 4 KiB; a long body is cut to fit.
MAX_PAYLOAD_BYTES = 4096
#: How long APNs keeps trying to reach an offline device.
EXPIRATION_SECONDS = 24 * 3600
#: Reasons saying the device token is dead: the device is forgotten.
DEAD_TOKEN_REASONS = frozenset({"BadDeviceToken", "Unregistered", "DeviceTokenNotForTopic"})


class ApnsProvider:
    """Sends alerts to iOS devices."""

    def __init__(self, client: H2Client, key_file: Path, key_id: str, team_id: str, topic: str) -> None:
        """Send through ``client`` as ``topic``, authenticating with the ``.p8`` key in ``key_file``."""
        self._client = client
        self._key = key_file.read_text()
        self._key_id = key_id
        self._team_id = team_id
        self._topic = topic
        self._token = ""
        self._token_time = 0.0

    def _provider_token(self) -> str:
        now = time.time()
        if not self._token or now - self._token_time > TOKEN_LIFETIME_SECONDS:
            self._token = jwt.encode(
                {"iss": self._team_id, "iat": int(now)}, self._key, algorithm="ES256", headers={"kid": self._key_id}
            )
            self._token_time = now
        return self._token

    async def send(self, token: str, title: str, body: str, data: dict[str, str], collapse_id: str) -> SendResult:
        """Send one alert to one device token."""
        payload = _payload(title, body, data)
        headers = [
            ("authorization", f"bearer {self._provider_token()}"),
            ("apns-topic", self._topic),
            ("apns-push-type", "alert"),
            ("apns-priority", "10"),
            ("apns-expiration", str(int(time.time()) + EXPIRATION_SECONDS)),
            ("apns-collapse-id", collapse_id[:64]),
            ("content-type", "application/json"),
        ]
        try:
            response = await self._client.request("POST", f"/3/device/{token}", headers, payload)
        except OSError as error:
            return SendResult.retry(f"APNs unreachable: {error}")
        if response.status == 200:
            return SendResult.accepted()
        answer = response.json()
        reason = str(answer.get("reason", "")) if isinstance(answer, dict) else ""
        if reason in DEAD_TOKEN_REASONS or response.status == 410:
            return SendResult.refused(f"APNs {reason or 'Unregistered'}", drop_device=True)
        if reason in ("ExpiredProviderToken", "InvalidProviderToken") and response.status == 403:
            self._token = ""  # sign a fresh one for the retry
            return SendResult.retry(f"APNs {reason}")
        return classify_http(response.status, f"APNs {reason}", response.headers.get("retry-after"))

    async def close(self) -> None:
        """Close the HTTP/2 connection."""
        await self._client.close()


def _payload(title: str, body: str, data: dict[str, str]) -> bytes:
    """The JSON payload, with the body shortened until it fits APNs' size limit."""
    for limit in (len(body), 2000, 1000, 400, 100):
        document: dict[str, Any] = {
            **data,
            "aps": {"alert": {"title": title, "body": body[:limit]}, "sound": "default"},
        }
        encoded = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        if len(encoded) <= MAX_PAYLOAD_BYTES:
            return encoded
    return json.dumps({"aps": {"alert": {"title": title[:100], "body": body[:100]}}}).encode()
