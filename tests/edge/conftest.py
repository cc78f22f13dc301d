"""The real stack for edge tests: user service replicas behind the real Envoy, on free ports.

One stack per session (it takes about two seconds to start); each test makes its own account, so
tests do not depend on each other's data. Helpers speak the three client protocols by hand:
JSON over HTTP/1.1, gRPC-Web frames, and native gRPC with the generated stubs.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from tools.devstack import Stack

#: The browser origin the test stack allows.
ORIGIN = "http://app.fittracker.test"
PASSWORD = "correct-horse-42"
GRPC_WEB = "application/grpc-web+proto"


@dataclass
class LogLines:
    """Every line the stack's processes printed, for assertions on the access log."""

    lines: list[str] = field(default_factory=list)

    def append(self, line: str) -> None:
        """Collect one line (called from the stack's reader threads; list.append is atomic)."""
        self.lines.append(line)

    def access_log(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """Envoy's access-log entry for ``request_id``, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith("[envoy] {") and request_id in line:
                    entry: dict[str, Any] = json.loads(line.removeprefix("[envoy] "))
                    if entry.get("request_id") == request_id:
                        return entry
            time.sleep(0.02)
        raise AssertionError(f"no access-log entry for request {request_id}")


@dataclass
class Reply:
    """An HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


@dataclass
class GrpcWebReply:
    """A gRPC-Web response taken apart: the message frames and the status from trailers."""

    http_status: int
    headers: dict[str, str]
    messages: list[bytes]
    trailers: dict[str, str]

    @property
    def grpc_status(self) -> int:
        """The status code, from the trailers frame or, for trailers-only replies, the headers."""
        return int(self.trailers.get("grpc-status", self.headers.get("grpc-status", "-1")))


@dataclass
class Account:
    """A registered user and their tokens."""

    email: str
    name: str
    access_token: str
    refresh_token: str

    @property
    def user_id(self) -> str:
        """The id part of ``users/{id}``."""
        return self.name.removeprefix("users/")


@dataclass
class Edge:
    """A client of the running edge."""

    stack: Stack
    logs: LogLines

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        """One plain HTTP/1.1 request."""
        connection = HTTPConnection(self.stack.host, self.stack.edge_port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def json(self, method: str, path: str, payload: Any = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        """A JSON API call, with a bearer token when given."""
        sent = dict(headers or {})
        if payload is not None:
            sent["content-type"] = "application/json"
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        body = None if payload is None else json.dumps(payload).encode()
        return self.http(method, path, body, sent)

    def grpc_web(self, method: str, request: Message | bytes, token: str | None = None,
                 headers: dict[str, str] | None = None) -> GrpcWebReply:
        """A unary gRPC-Web call built by hand: one length-prefixed frame in, frames out."""
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        sent = {"content-type": GRPC_WEB, "x-grpc-web": "1", "accept": GRPC_WEB, **(headers or {})}
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        reply = self.http("POST", method, struct.pack(">BI", 0, len(payload)) + payload, sent)
        messages, trailers = parse_grpc_web(reply.body)
        return GrpcWebReply(reply.status, reply.headers, messages, trailers)

    def register(self) -> Account:
        """Register a fresh account over JSON."""
        email = f"{uuid.uuid4().hex[:12]}@example.com"
        reply = self.json("POST", "/v1/users:register",
                          {"email": email, "password": PASSWORD, "display_name": "Ada"})
        assert reply.status == 200, reply.body
        body = reply.json()
        return Account(email, body["user"]["name"], body["tokens"]["access_token"], body["tokens"]["refresh_token"])


def parse_grpc_web(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """Split a gRPC-Web body into message frames and the trailers frame (flag 0x80)."""
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset < len(body):
        flags, length = struct.unpack_from(">BI", body, offset)
        frame = body[offset + 5: offset + 5 + length]
        offset += 5 + length
        if flags & 0x80:
            for line in frame.decode().split("\r\n"):
                key, sep, value = line.partition(":")
                if sep:
                    trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(frame)
    return messages, trailers


@pytest.fixture(scope="session")
def stack_logs() -> LogLines:
    """What the stack's processes print."""
    return LogLines()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_logs: LogLines) -> Iterator[Stack]:
    """Two user-service replicas and Envoy, on free ports, in a fresh data directory."""
    running = Stack(
        tmp_path_factory.mktemp("edge-stack"),
        services=["user"],
        replicas=2,
        use_free_ports=True,
        service_env={
            "FITTRACKER_ENVIRONMENT": "test",
            "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
            "FITTRACKER_ARGON2_TIME_COST": "1",
            # Short drains keep the replica-restart test and the teardown quick.
            "FITTRACKER_GRACE_SECONDS": "1",
            "FITTRACKER_LOG_LEVEL": "WARNING",
        },
        cors_origins=(ORIGIN,),
        sink=stack_logs.append,
    )
    running.start(timeout=45)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def edge(stack: Stack, stack_logs: LogLines) -> Edge:
    """A client of the edge."""
    return Edge(stack, stack_logs)


@pytest.fixture
def account(edge: Edge) -> Account:
    """A freshly registered account."""
    return edge.register()


@pytest.fixture(scope="session")
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    """A native gRPC channel to the edge (h2c)."""
    with grpc.insecure_channel(stack.edge_target) as opened:
        yield opened
