"""Helpers for tests that involve events: waiting for consumers, recording handlers, running jobs.

Consumers run in the background, so a test never sleeps a fixed time: it polls a condition with
``eventually`` (a short interval, a hard timeout), e.g. until a recorder saw the events or until
``bus.backlog(group, streams) == 0`` (both bus implementations have ``backlog``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from fittracker.events.v1 import events_pb2

from services.runtime.events import Job


async def eventually(
    check: Callable[[], object], within: float = 5.0, interval: float = 0.01, what: str = ""
) -> None:
    """Poll ``check`` until its result (awaited if awaitable) is truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or check}")
        await asyncio.sleep(interval)


class Recorder:
    """A handler that records what it handles; it can fail its first ``fail_times`` calls."""

    def __init__(self, fail_times: int = 0, work_seconds: float = 0.0) -> None:
        self.fail_times = fail_times
        self.work_seconds = work_seconds
        self.calls = 0
        self.seen: list[events_pb2.EventEnvelope] = []

    async def __call__(self, envelope: events_pb2.EventEnvelope) -> None:
        self.calls += 1
        if self.work_seconds:
            await asyncio.sleep(self.work_seconds)  # simulated work, lets other consumers take entries
        if self.calls <= self.fail_times:
            raise RuntimeError(f"planned failure {self.calls}")
        self.seen.append(envelope)

    @property
    def ids(self) -> list[str]:
        return [e.event_id for e in self.seen]


@contextlib.asynccontextmanager
async def running(*jobs: Job) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run background jobs for the duration of the block, then cancel them."""
    tasks = [asyncio.create_task(job()) for job in jobs]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _HasBacklog(Protocol):
    async def backlog(self, group: str, streams: Sequence[str]) -> int: ...


async def drained(bus: _HasBacklog, group: str, streams: Sequence[str]) -> bool:
    """Whether ``group`` has acknowledged everything on ``streams`` (for ``eventually``)."""
    return await bus.backlog(group, streams) == 0
