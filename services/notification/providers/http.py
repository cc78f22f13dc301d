"""HTTP/1.1 requests with the standard library, run off the event loop.

FCM and SMS gateways speak JSON over HTTPS; ``http.client`` in a worker thread does that with
certificate checks on by default and needs no extra dependency. One request opens one connection:
sends are not frequent enough per process for pooling to matter, and it keeps failure handling
simple (a broken connection can never be reused).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HttpResponse:
    """A response: status, lower-cased headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float, context: ssl.SSLContext) -> HttpResponse:
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=context)
    else:  # plain http is allowed for loopback peers only (config.check_endpoint)
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers={**headers, "content-length": str(len(body))})
        response = connection.getresponse()
        return HttpResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    except http.client.HTTPException as error:
        # A malformed or cut response is a network failure to the caller, like a reset.
        raise OSError(f"bad HTTP response from {parts.hostname}: {error!r}") from error
    finally:
        connection.close()


class HttpClient:
    """POSTs JSON or forms to a URL with a timeout; network failures raise OSError."""

    def __init__(self, timeout: float) -> None:
        """Give every request ``timeout`` seconds for connecting and for each read."""
        self._timeout = timeout
        self._context = ssl.create_default_context()

    async def post_json(self, url: str, payload: Any, headers: dict[str, str] | None = None) -> HttpResponse:
        """POST ``payload`` as JSON."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        all_headers = {"content-type": "application/json; charset=utf-8", "accept": "application/json",
                       **(headers or {})}
        return await asyncio.to_thread(_post, url, body, all_headers, self._timeout, self._context)

    async def post_form(self, url: str, fields: dict[str, str]) -> HttpResponse:
        """POST ``fields`` as application/x-www-form-urlencoded."""
        body = urllib.parse.urlencode(fields).encode()
        headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
        return await asyncio.to_thread(_post, url, body, headers, self._timeout, self._context)
