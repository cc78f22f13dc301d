"""The real stack for edge tests: every present service, two replicas each, behind the real Envoy.

One stack per session (a few seconds to start); each test makes its own account, so tests do not
depend on each other's data. Helpers speak the three client protocols by hand: JSON over HTTP/1.1,
gRPC-Web frames (unary and server streaming), and native gRPC with the generated stubs. A request
can leave from another loopback address (127.0.0.0/8 is all local on Linux), which is how tests
get a client address of their own for the per-address quota.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, Protocol

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import Message

from services.runtime.auth import JWKS_FILE, SIGNING_KEY_FILE
from tools import envoy_config
from tools.devstack import Stack, present_services
from tools.envoy_config import Limit

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


class Target(Protocol):
    """Where an edge listens: a Stack, or an Envoy a test started on its own."""

    @property
    def host(self) -> str:
        """The listener's address."""
        ...

    @property
    def edge_port(self) -> int:
        """The listener's port."""
        ...


@dataclass
class Edge:
    """A client of a running edge."""

    stack: Target
    logs: LogLines

    #: The client address requests leave from (any 127.x.y.z), or None for the default.
    source: str | None = None
    #: Another Envoy in front of the same stack (its listener port), or None for the stack's own.
    port: int | None = None

    def from_address(self, source: str) -> Edge:
        """The same client, sending from ``source`` (a loopback address)."""
        return replace(self, source=source)

    def via(self, port: int) -> Edge:
        """The same client, calling the Envoy that listens on ``port``."""
        return replace(self, port=port)

    @property
    def edge_port(self) -> int:
        """The listener port this client calls."""
        return self.port or self.stack.edge_port

    @property
    def grpc_target(self) -> str:
        """The native gRPC target of the edge this client calls."""
        return f"{self.stack.host}:{self.edge_port}"

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        """One plain HTTP/1.1 request."""
        connection = HTTPConnection(self.stack.host, self.edge_port, timeout=10,
                                    source_address=(self.source, 0) if self.source else None)
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

    def grpc_web_stream_first(self, method: str, request: Message, token: str | None = None,
                              timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """Open a server-streaming gRPC-Web call and return (HTTP status, headers, first message).

        Reads exactly one frame off the still-open response, then closes the connection, which
        is how a browser tab that goes away ends a subscription.
        """
        payload = request.SerializeToString()
        sent = {"content-type": GRPC_WEB, "x-grpc-web": "1", "accept": GRPC_WEB}
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        connection = HTTPConnection(self.stack.host, self.edge_port, timeout=timeout)
        try:
            connection.request("POST", method, struct.pack(">BI", 0, len(payload)) + payload, sent)
            response = connection.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            head = response.read(5)
            if len(head) < 5:
                return response.status, headers, b""
            flags, length = struct.unpack(">BI", head)
            frame = response.read(length)
            if flags & 0x80:  # trailers first: the call ended without a message
                return response.status, {**headers, "trailers": frame.decode(errors="replace")}, b""
            return response.status, headers, frame
        finally:
            connection.close()

    def register(self) -> Account:
        """Register a fresh account over JSON."""
        email = f"{uuid.uuid4().hex[:12]}@example.com"
        reply = self.json("POST", "/v1/users:register",
                          {"email": email, "password": PASSWORD, "display_name": "Ada"})
        assert reply.status == 200, reply.body
        body = reply.json()
        return Account(email, body["user"]["name"], body["tokens"]["access_token"], body["tokens"]["refresh_token"])


def sign_token(keys_dir: Path, claims: dict[str, Any], *, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    """An access token signed with the key in ``keys_dir`` (or ``key``) under its key id."""
    real = serialization.load_pem_private_key((keys_dir / SIGNING_KEY_FILE).read_bytes(), password=None)
    kid = json.loads((keys_dir / JWKS_FILE).read_text())["keys"][0]["kid"]
    now = int(time.time())
    payload = {"iss": envoy_config.JWT_ISSUER, "aud": envoy_config.JWT_AUDIENCE, "iat": now, "exp": now + 300,
               "jti": uuid.uuid4().hex, **claims}
    return jwt.encode(payload, key or real, algorithm="ES256", headers={"kid": kid})  # type: ignore[arg-type]  # an EC key


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


#: Settings of every service process in edge stacks.
SERVICE_ENV = {
    "FITTRACKER_ENVIRONMENT": "test",
    "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
    "FITTRACKER_ARGON2_TIME_COST": "1",
    # Short grace keeps the replica-restart tests and the teardown quick.
    "FITTRACKER_GRACE_SECONDS": "1",
    # NOT_SERVING this long before the port closes: room for Envoy's checks (1 s x 2) on a busy box.
    "FITTRACKER_DRAIN_NOTICE_SECONDS": "4",
    "FITTRACKER_LOG_LEVEL": "WARNING",
    # Revocations reach every replica within 0.2 s; no test call runs longer than the 2 s erasure
    # delay, so erasure still follows every write a deleted account made (the rule it stands for).
    "FITTRACKER_REVOCATION_POLL_SECONDS": "0.2",
    "FITTRACKER_ERASURE_DELAY_SECONDS": "2",
}
#: Quotas far above what the session sends from one address and user (the kill-replica load
#: included): here they must never bite; tests/edge/test_rate_limits.py has a stack with small ones.
GENEROUS = Limit(100_000, "second", burst=100_000)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_logs: LogLines) -> Iterator[Stack]:
    """Every present service (two replicas each) and Envoy, on free ports, in a fresh data directory."""
    running = Stack(
        tmp_path_factory.mktemp("edge-stack"),
        services=present_services(),
        replicas=2,
        use_free_ports=True,
        service_env=SERVICE_ENV,
        cors_origins=(ORIGIN,),
        ip_limit=GENEROUS,
        user_limit=GENEROUS,
        sink=stack_logs.append,
    )
    running.start(timeout=90)
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
