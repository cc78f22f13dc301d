"""The fault matrix's stack: user, workout, ai and analytics (two replicas each) behind Envoy, on a real Redis.

Redis runs durable (append-only file, fsync per write), as the events' Redis must in production,
so that killing and restarting it is an outage, not a data loss. The ai replicas reach workout
through a ``LatencyProxy`` (pass-through until a test sets a delay). Consumers reclaim an event
left pending by a dead replica after 2 s instead of 60 s, so a test sees it happen.

Each row of the matrix adds a line to ``MATRIX``; the terminal summary prints the table and
``.cache/reports/fault-matrix.json`` keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import RunningServer, start_redis
from tools.devstack import Stack
from tools.envoy_config import Limit
from tools.faults import LatencyProxy

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["user", "workout", "ai", "analytics"]
#: Quotas far above the matrix's load: here they must never bite.
GENEROUS = Limit(100_000, "second", burst=100_000)
SERVICE_ENV = {
    "FITTRACKER_ENVIRONMENT": "test",
    "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
    "FITTRACKER_ARGON2_TIME_COST": "1",
    "FITTRACKER_GRACE_SECONDS": "1",
    "FITTRACKER_DRAIN_NOTICE_SECONDS": "0",
    "FITTRACKER_LOG_LEVEL": "WARNING",
    "FITTRACKER_EVENTS_CLAIM_IDLE_SECONDS": "2",
}
#: One dict per row: the fault, sent, failed, retried, lost and the checks behind "lost".
MATRIX: list[dict[str, Any]] = []


@pytest.fixture(scope="package")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A durable Redis private to the fault stack, to kill and restart."""
    server = start_redis(tmp_path_factory.mktemp("faults-redis"), durable=True)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class FaultStack:
    """The running stack, its Redis and the proxy in front of workout for the ai replicas."""

    stack: Stack
    redis: RunningServer
    proxy: LatencyProxy


@pytest.fixture(scope="package")
def faults(tmp_path_factory: pytest.TempPathFactory, redis_server: RunningServer) -> Iterator[FaultStack]:
    """The fault stack, started once for the matrix and the short chaos run."""
    running = Stack(
        tmp_path_factory.mktemp("faults-stack"),
        services=SERVICES,
        replicas=2,
        use_free_ports=True,
        service_env={**SERVICE_ENV, "FITTRACKER_REDIS_URL": redis_server.url},
        ip_limit=GENEROUS,
        user_limit=GENEROUS,
        sink=lambda line: None,
    )
    proxy = LatencyProxy([(a.host, a.port) for a in running.topology["workout"]])
    proxy.start()
    for replica in running.replicas:
        if replica.service == "ai":
            replica.child.env["FITTRACKER_WORKOUT_ADDR"] = proxy.address
    try:
        running.start(timeout=120)
        yield FaultStack(running, redis_server, proxy)
    finally:
        running.stop()
        proxy.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the matrix and keep it as JSON."""
    if not MATRIX:
        return
    terminalreporter.section("fault matrix")
    terminalreporter.write_line(f"{'fault':<44} {'sent':>6} {'failed':>7} {'retried':>8} {'lost':>5}  p99 ms")
    for row in MATRIX:
        terminalreporter.write_line(
            f"{row['fault']:<44} {row['sent']:>6} {row['failed']:>7} {row['retried']:>8} {row['lost']:>5}  "
            f"{row['p99_ms']:>7}")
    out = ROOT / ".cache" / "reports" / "fault-matrix.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(MATRIX, indent=2) + "\n")
    terminalreporter.write_line(f"(also in {out.relative_to(ROOT)})")
