"""Push to Android and web through the FCM HTTP v1 API.

``POST <endpoint>/v1/projects/<project>/messages:send`` with ``{"message": {"token",
"notification": {"title", "body"}, "data"}}`` and an OAuth 2.0 bearer token. The token comes
from a Google service-account key with the JWT bearer grant (RFC 7523): an RS256 assertion
signed with the key, exchanged at the key's ``token_uri`` and cached until shortly before it
expires. That is what Google's client libraries do; doing it here keeps the dependency list short.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from services.notification.providers import SendResult, classify_http
from services.notification.providers.http import HttpClient

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: FCM error codes saying the registration token is dead: the device is forgotten.
DEAD_TOKEN_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
#: A cached access token is replaced this long before it expires.
TOKEN_MARGIN_SECONDS = 120


@dataclass(frozen=True)
class ServiceAccount:
    """The fields of a Google service-account JSON key that the token exchange needs."""

    client_email: str
    private_key: str
    private_key_id: str
    token_uri: str
    project_id: str

    @classmethod
    def load(cls, path: Path) -> ServiceAccount:
        """Read a key file; ValueError names what is missing."""
        document: dict[str, Any] = json.loads(path.read_text())
        missing = [k for k in ("client_email", "private_key", "token_uri") if not document.get(k)]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}: not a service-account key")
        return cls(
            client_email=document["client_email"],
            private_key=document["private_key"],
            private_key_id=document.get("private_key_id", ""),
            token_uri=document["token_uri"],
            project_id=document.get("project_id", ""),
        )


class FcmProvider:
    """Sends push messages through FCM."""

    def __init__(self, endpoint: str, account: ServiceAccount, project_id: str, http: HttpClient) -> None:
        """Send to ``endpoint`` for ``project_id`` (the key's own project when empty)."""
        project = project_id or account.project_id
        if not project:
            raise ValueError("FCM needs a project id: set FITTRACKER_FCM_PROJECT_ID or use a key that names one")
        self._url = f"{endpoint.rstrip('/')}/v1/projects/{project}/messages:send"
        self._account = account
        self._http = http
        self._token = ""
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()

    async def _access_token(self) -> str:
        async with self._token_lock:
            now = time.time()
            if self._token and now < self._token_expires - TOKEN_MARGIN_SECONDS:
                return self._token
            headers = {"kid": self._account.private_key_id} if self._account.private_key_id else None
            assertion = jwt.encode(
                {"iss": self._account.client_email, "scope": SCOPE, "aud": self._account.token_uri,
                 "iat": int(now), "exp": int(now) + 3600},
                self._account.private_key, algorithm="RS256", headers=headers,
            )
            response = await self._http.post_form(
                self._account.token_uri, {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
            )
            body = response.json()
            if response.status != 200 or not isinstance(body, dict) or "access_token" not in body:
                raise PermissionError(f"token exchange failed with HTTP {response.status}")
            self._token = str(body["access_token"])
            self._token_expires = now + float(body.get("expires_in", 3600))
            return self._token

    async def send(self, token: str, title: str, body: str, data: dict[str, str]) -> SendResult:
        """Send one message to one registration token."""
        message = {"message": {"token": token, "notification": {"title": title, "body": body}, "data": data}}
        try:
            access = await self._access_token()
            response = await self._http.post_json(self._url, message, {"authorization": f"Bearer {access}"})
        except PermissionError as error:
            return SendResult.retry(str(error))
        except OSError as error:
            return SendResult.retry(f"FCM unreachable: {error}")
        if response.status == 401:
            # The token was revoked or expired early: fetch a new one on the retry.
            self._token = ""
            return SendResult.retry("FCM refused the access token")
        if 200 <= response.status < 300:
            return SendResult.accepted()
        code, message_text = _fcm_error(response.json())
        if code in DEAD_TOKEN_CODES:
            return SendResult.refused(f"FCM {code}: {message_text}", drop_device=True)
        return classify_http(response.status, f"{code} {message_text}".strip(), response.headers.get("retry-after"))


def _fcm_error(body: Any) -> tuple[str, str]:
    """(FcmError errorCode or status, message) from an FCM error body."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return "", ""
    error = body["error"]
    code = str(error.get("status", ""))
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            code = str(detail["errorCode"])
    return code, str(error.get("message", ""))
