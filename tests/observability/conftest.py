"""One stack under full observation, shared by this directory's tests: Jaeger, Prometheus, Alertmanager, pager.

Every service runs (two replicas each: the replica-down test kills one) on Redis,
so events travel on Redis Streams; the edge and every replica export spans to Jaeger and serve
/metrics to a Prometheus that scrapes every second.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any

import pytest

from tests.servers import start_redis
from tools.devstack import Stack
from tools.observe import Observability, Ports

SERVICES = ["user", "workout", "ai", "notification", "analytics"]


class Lines:
    """Every log line of the stack, kept for the test to search (access-log lines carry trace ids)."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def json_lines(self, prefix: str) -> list[dict[str, Any]]:
        """The JSON lines of processes whose name starts with ``prefix`` (e.g. "ai-")."""
        with self._lock:
            lines = list(self._lines)
        found = []
        for line in lines:
            name, _, text = line.partition("] ")
            if name.lstrip("[").startswith(prefix) and text.startswith("{"):
                try:
                    found.append(json.loads(text))
                except ValueError:
                    continue
        return found


@pytest.fixture(scope="session")
def lines() -> Lines:
    return Lines()


@pytest.fixture(scope="session")
def observed(tmp_path_factory: pytest.TempPathFactory, lines: Lines) -> Iterator[tuple[Stack, Observability]]:
    work = tmp_path_factory.mktemp("observed")
    # A Redis of its own: on the session's shared one, this stack's consumer groups ("workout",
    # "user", ...) would take the events other tests publish for their own services.
    redis = start_redis(work / "redis")
    observability = Observability(work / "observability", lines.append, ports=Ports.free(), scrape_interval="1s")
    observability.start_tracing()
    stack = Stack(
        work / "stack",
        services=SERVICES,
        replicas=2,
        use_free_ports=True,
        metrics=True,
        otlp_endpoint=observability.otlp_endpoint,
        # The replica-down test's load comes from one client: no per-client quota.
        ip_limit=None,
        user_limit=None,
        service_env={
            "FITTRACKER_ENVIRONMENT": "test",
            "FITTRACKER_REDIS_URL": redis.url,
            "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
            "FITTRACKER_ARGON2_TIME_COST": "1",
            "FITTRACKER_GRACE_SECONDS": "1",
            "FITTRACKER_DRAIN_NOTICE_SECONDS": "0",
        },
        sink=lines.append,
    )
    try:
        stack.start(timeout=90)
        observability.start_monitoring(stack)
        yield stack, observability
    finally:
        stack.stop()
        observability.stop()
        redis.stop()


class Api:
    """JSON calls through the edge, with a token once signed in and an optional traceparent."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.token = ""

    def call(self, method: str, path: str, payload: Any = None, traceparent: str = "") -> tuple[int, Any]:
        connection = HTTPConnection(self.stack.host, self.stack.edge_port, timeout=15)
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if traceparent:
            headers["traceparent"] = traceparent
        try:
            connection.request(method, path, body=None if payload is None else json.dumps(payload), headers=headers)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        return response.status, (json.loads(body) if body else None)

    def sign_up(self, email: str, password: str = "observed password 42") -> None:
        status, body = self.call("POST", "/v1/users:register",
                                 {"email": email, "password": password, "display_name": "Obs"})
        assert status == 200, body
        status, body = self.call("POST", "/v1/auth:login", {"email": email, "password": password})
        assert status == 200, body
        self.token = body["tokens"]["access_token"]
