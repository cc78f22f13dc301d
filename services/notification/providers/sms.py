"""SMS through a JSON HTTP gateway.

The request is the shape most gateways share: ``POST <endpoint>`` with a bearer API key and
``{"from", "to", "body", "reference"}``. ``Idempotency-Key`` carries the notification id, so a
gateway that honours it sends a retried request once.
"""

from __future__ import annotations

from services.notification.providers import SendResult, classify_http
from services.notification.providers.http import HttpClient

#: The longest text sent; gateways split it into segments (10 x 160 GSM-7 characters at most).
MAX_SMS_CHARS = 1600


class SmsProvider:
    """Sends text messages through the configured gateway."""

    def __init__(self, endpoint: str, api_key: str, sender: str, http: HttpClient) -> None:
        """Send to ``endpoint`` as ``sender`` with ``api_key``."""
        self._endpoint = endpoint
        self._api_key = api_key
        self._sender = sender
        self._http = http

    async def send(self, to: str, text: str, reference: str) -> SendResult:
        """Send ``text`` to the E.164 number ``to``; ``reference`` makes retries idempotent."""
        payload = {"from": self._sender, "to": to, "body": text[:MAX_SMS_CHARS], "reference": reference}
        headers = {"authorization": f"Bearer {self._api_key}", "idempotency-key": reference}
        try:
            response = await self._http.post_json(self._endpoint, payload, headers)
        except OSError as error:
            return SendResult.retry(f"SMS gateway unreachable: {error}")
        body = response.json()
        reason = (body.get("error") or body.get("message") or "") if isinstance(body, dict) else ""
        return classify_http(response.status, str(reason) or "refused", response.headers.get("retry-after"))
