"""Outgoing calls: deadlines inherited from the incoming call, retries, and the circuit breaker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.clients import CircuitBreaker, ServiceClient
from services.runtime.errors import Unavailable
from services.runtime.interceptors import call_deadline
from services.runtime.server import start_service
from services.runtime.settings import Settings
from tests.runtime.test_server_runtime import build_probe, free_port


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_after_cool_down() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cool_down=5, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(False)
    assert breaker.state == "closed"
    breaker.record(False)
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.state == "half-open"
    assert breaker.allow()
    assert not breaker.allow(), "one probe at a time"
    breaker.record(False)
    assert breaker.state == "open"
    clock.now = 10.0
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state == "closed"


async def test_outgoing_deadline_is_capped_by_the_incoming_call() -> None:
    client = ServiceClient("127.0.0.1:1", default_timeout=2.0)
    assert client.timeout() == 2.0
    token = call_deadline.set(0.3)
    try:
        assert client.timeout() == 0.3
        assert client.timeout(budget=0.1) == 0.1
    finally:
        call_deadline.reset(token)
        await client.close()


async def test_a_dead_target_fails_fast_once_the_breaker_opens(tmp_path: Path) -> None:
    settings = Settings(service="user", environment="test", port=free_port(), data_dir=tmp_path, log_level="WARNING")
    running = await start_service(settings, build_probe)
    client = ServiceClient(f"127.0.0.1:{settings.port}", default_timeout=3.0,
                           breaker=CircuitBreaker(threshold=2, cool_down=60))
    stub = health_pb2_grpc.HealthStub(client.channel)
    reply = await client.call(stub.Check, health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await running.stop(grace=0)
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.call(stub.Check, health_pb2.HealthCheckRequest())
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    with pytest.raises(Unavailable):
        # An open breaker answers at once; waiting out the 3 s deadline would trip this 1 s one.
        await asyncio.wait_for(client.call(stub.Check, health_pb2.HealthCheckRequest()), timeout=1.0)
    await client.close()
