"""Local stand-ins for the providers, speaking their real protocols on loopback ports.

- ``SmtpPeer``: aiosmtpd's SMTP server on the test's event loop; it refuses recipients whose
  address starts with "reject" (550) and records every accepted message.
- ``HttpPeer``: an HTTP/1.1 server for the JSON APIs: Google's OAuth token endpoint (``/token``),
  FCM HTTP v1 (``/v1/projects/<p>/messages:send``) and the SMS gateway (``/sms``).
- ``ApnsPeer``: an HTTP/2 server (cleartext, prior knowledge) answering ``/3/device/<token>``.

Each records requests in a queue per key (push token, phone number, email address), so tests
await exactly the request they caused. Responses can be scripted per key, e.g. a 503 then a 200.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import itertools
import json
from collections import defaultdict, deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import h2.config
import h2.connection
import h2.events
from aiosmtpd.smtp import SMTP, Envelope, Session

#: How long a test waits for a request it caused to reach a peer.
ARRIVAL_TIMEOUT = 10.0


@dataclass
class Recorded:
    """One request a peer received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """A scripted answer."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class _Mailboxes:
    def __init__(self) -> None:
        self._queues: defaultdict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
        self._scripts: defaultdict[str, deque[Reply]] = defaultdict(deque)

    def record(self, key: str, item: Any) -> None:
        self._queues[key].put_nowait(item)

    def script(self, key: str, *replies: Reply) -> None:
        """Answer the next requests for ``key`` with ``replies``, then normally."""
        self._scripts[key].extend(replies)

    def scripted(self, key: str) -> Reply | None:
        queue = self._scripts.get(key)
        return queue.popleft() if queue else None

    async def next(self, key: str) -> Any:
        """The next request recorded under ``key`` (waits for it)."""
        return await asyncio.wait_for(self._queues[key].get(), ARRIVAL_TIMEOUT)

    def pending(self, key: str) -> int:
        """How many recorded requests under ``key`` nobody took yet."""
        return self._queues[key].qsize()


class SmtpPeer(_Mailboxes):
    """An SMTP server recording messages by recipient address."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.startswith("reject"):
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        for rcpt in envelope.rcpt_tos:
            self.record(rcpt, (envelope.mail_from, message))
        return "250 Message accepted for delivery"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: SMTP(self, hostname="smtp.test"), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


class HttpPeer(_Mailboxes):
    """An HTTP/1.1 server for the OAuth token endpoint, FCM HTTP v1 and the SMS gateway."""

    def __init__(self, project: str) -> None:
        super().__init__()
        self.project = project
        self.port = 0
        self.issued_tokens: list[str] = []
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode().strip()
            method, target, _version = request_line.split(" ", 2)
            headers: dict[str, str] = {}
            while (line := (await reader.readline()).decode().strip()) != "":
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            reply = self._respond(Recorded(method, target, headers, body))
            payload = json.dumps(reply.body).encode()
            head = [f"HTTP/1.1 {reply.status} X", "content-type: application/json",
                    f"content-length: {len(payload)}", "connection: close",
                    *(f"{k}: {v}" for k, v in reply.headers.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            await writer.drain()
        finally:
            writer.close()

    def _respond(self, request: Recorded) -> Reply:
        if request.path == "/token":
            self.record("token", request)
            token = f"fcm-access-{next(self._ids)}"
            self.issued_tokens.append(token)
            return Reply(200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"})
        if request.path == f"/v1/projects/{self.project}/messages:send":
            key = request.json()["message"]["token"]
            self.record(key, request)
            return self.scripted(key) or Reply(200, {"name": f"projects/{self.project}/messages/{next(self._ids)}"})
        if request.path == "/sms":
            key = request.json()["to"]
            self.record(key, request)
            return self.scripted(key) or Reply(200, {"id": f"sms-{next(self._ids)}", "status": "queued"})
        return Reply(404, {"error": "no such endpoint"})


class ApnsPeer(_Mailboxes):
    """An HTTP/2 server answering APNs requests, keyed by device token."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        streams[event.stream_id] = ({str(k): str(v) for k, v in event.headers or []}, bytearray())
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id][1].extend(event.data or b"")
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        headers, body = streams.pop(event.stream_id)
                        self._answer(conn, event.stream_id, headers, bytes(body))
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                writer.write(conn.data_to_send())
                await writer.drain()
        finally:
            writer.close()

    def _answer(self, conn: h2.connection.H2Connection, stream_id: int, headers: dict[str, str], body: bytes) -> None:
        path = headers.get(":path", "")
        token = path.removeprefix("/3/device/")
        self.record(token, Recorded(headers.get(":method", ""), path, headers, body))
        reply = self.scripted(token) or Reply(200, headers={"apns-id": f"apns-{stream_id}"})
        payload = json.dumps(reply.body).encode() if reply.body else b""
        response = [(":status", str(reply.status)), *reply.headers.items()]
        if payload:
            response.append(("content-type", "application/json"))
        conn.send_headers(stream_id, response, end_stream=not payload)
        if payload:
            conn.send_data(stream_id, payload, end_stream=True)
