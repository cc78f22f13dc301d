"""Outgoing calls to other services: one channel per target, deadlines, retries, a circuit breaker.

Retries on UNAVAILABLE come from gRPC's own service config (transparent, with backoff), so a
handler never writes a retry loop. The deadline of an outgoing call is the smaller of its own
budget and what is left of the incoming call's, so a slow chain fails fast instead of piling up.
The circuit breaker stops calling a target that keeps failing and lets one probe through after
a cool-down, so a dead dependency costs microseconds instead of a timeout per call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.runtime.errors import Unavailable
from services.runtime.interceptors import call_deadline

T = TypeVar("T")

#: Codes that say "the target is unhealthy" (as opposed to "your request was wrong").
FAILURE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED,
})


def retry_service_config(max_attempts: int = 3) -> str:
    """A gRPC service config retrying UNAVAILABLE with exponential backoff on every method."""
    return json.dumps({
        "methodConfig": [{
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
        # Caps retries to 10% of calls once failures mount, so retries cannot amplify an outage.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    })


@dataclass
class CircuitBreaker:
    """Closed until ``threshold`` consecutive failures; then open for ``cool_down`` seconds."""

    threshold: int = 5
    cool_down: float = 5.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    _probing: bool = field(default=False, repr=False)

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cool_down else "open"

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open state only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def record(self, ok: bool) -> None:
        """Count the outcome of a call that was allowed."""
        self._probing = False
        if ok:
            self.failures, self.opened_at = 0, None
            return
        self.failures += 1
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = self.clock()


class ServiceClient:
    """Calls to one target service through a shared channel, guarded by a circuit breaker."""

    def __init__(self, target: str, *, default_timeout: float = 2.0, breaker: CircuitBreaker | None = None):
        """Open a lazily-connecting channel to ``target`` ("host:port")."""
        self.target = target
        self.default_timeout = default_timeout
        self.breaker = breaker or CircuitBreaker()
        self.channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.service_config", retry_service_config()),
                ("grpc.enable_retries", 1),
                ("grpc.keepalive_time_ms", 30_000),
            ],
            # The instrumentation package has no annotations; it returns aio client interceptors.
            interceptors=aio_client_interceptors(),  # type: ignore[no-untyped-call]
        )

    def timeout(self, budget: float | None = None) -> float:
        """The deadline for an outgoing call: its budget, capped by the incoming call's remainder."""
        own = budget or self.default_timeout
        inherited = call_deadline.get()
        return own if inherited is None else max(0.001, min(own, inherited))

    async def call(self, rpc: Callable[..., Awaitable[T]], request: object, *,
                   budget: float | None = None, metadata: tuple[tuple[str, str], ...] = ()) -> T:
        """Invoke ``rpc`` (a stub method) with a deadline, failing fast while the breaker is open."""
        if not self.breaker.allow():
            raise Unavailable(f"{self.target} is failing; not calling it for a few seconds")
        try:
            response = await rpc(request, timeout=self.timeout(budget), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            self.breaker.record(error.code() not in FAILURE_CODES)
            raise
        self.breaker.record(True)
        return response

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()


class ChannelPool:
    """One ServiceClient per target for the whole process."""

    def __init__(self) -> None:
        """Start empty; clients are created on first use."""
        self._clients: dict[str, ServiceClient] = {}

    def client(self, target: str) -> ServiceClient:
        """The shared client of ``target``."""
        existing = self._clients.get(target)
        if existing is None:
            existing = self._clients[target] = ServiceClient(target)
        return existing

    async def close(self) -> None:
        """Close every channel."""
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
