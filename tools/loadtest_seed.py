"""Seed data for the load tests: accounts with tokens, and per-service resources, through the real API.

Everything is created with the public contracts (no writes into a store behind a service's back),
so a seeded stack is one a client could have built. Re-seeding the same stack is idempotent for
accounts: each Register carries a request id derived from the email, so a retry returns the
existing account (and opens a fresh session, whose refresh token the RefreshToken scenario spends).

Each data set is written as a JSON array of request messages, which ghz uses round-robin (one per
call, by request number). A data set that cannot be made (a service answering differently than
its contract says) is reported with the reason; the scenarios that need it are skipped, not failed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
from fittracker.analytics.v1 import analytics_service_pb2, analytics_service_pb2_grpc
from fittracker.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from fittracker.workout.v1 import workout_pb2, workout_service_pb2, workout_service_pb2_grpc

from tools.bench_common import write_json

T = TypeVar("T")

#: Every seeded account uses this password: Login scenarios must send it, and it is a throwaway stack.
PASSWORD = "loadtest-password-42"  # noqa: S105 - the shared password of throwaway load-test accounts
EMAIL_DOMAIN = "loadtest.fittracker.test"
ADMIN_EMAIL = f"admin@{EMAIL_DOMAIN}"
#: Register's request ids derive from the email, so seeding the same stack twice is idempotent.
REQUEST_ID_NAMESPACE = uuid.UUID("0b0c5f0e-6f9b-4f62-9a55-3c7c2b4b8a10")
#: The data sets the seeder writes, and the service whose presence each needs.
DATA_SETS = {
    "user-names": "user", "logins": "user", "refresh-tokens": "user", "user-updates": "user",
    "session-names": "workout", "log-sets": "workout", "complete-sessions": "workout",
    "stats-names": "analytics", "recommend-requests": "ai", "subscribe-parents": "notification",
}
#: Registers at once: each costs one argon2id hash (64 MiB, ~0.17 s of CPU), so more only queue.
REGISTER_CONCURRENCY = 4
OTHER_CONCURRENCY = 16
CALL_TIMEOUT = 30.0
#: How long analytics may take to project the seeding's events before its scenarios are skipped.
ANALYTICS_WAIT_SECONDS = 30.0


@dataclass
class Account:
    """A seeded user: its resource name and the tokens its Register returned."""

    email: str
    name: str
    access_token: str
    refresh_token: str


@dataclass
class SeedResult:
    """What the scenarios can use: the admin token and the data-set files, or why one is missing."""

    directory: Path
    admin_token: str
    accounts: list[Account]
    files: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Write data set ``name`` (``<name>.json``, an array of request messages)."""
        path = self.directory / f"{name}.json"
        write_json(path, list(records))
        self.files[name] = path
        self.sizes[name] = len(records)


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata with an access token."""
    return (("authorization", f"Bearer {token}"),)


async def bounded(concurrency: int, jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``jobs`` with at most ``concurrency`` at a time, keeping their order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


class Seeder:
    """Creates the accounts and resources the scenarios read and write."""

    def __init__(self, addresses: Mapping[str, str], directory: Path, note: Callable[[str], None] = print) -> None:
        """``addresses`` maps each present service to where to call it (a replica, or the edge)."""
        self._addresses = dict(addresses)
        self._directory = directory
        self._note = note
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.aio.insecure_channel(self._addresses[service])
        return self._channels[service]

    async def close(self) -> None:
        """Close the channels."""
        for channel in self._channels.values():
            await channel.close()

    async def seed(self, users: int) -> SeedResult:
        """Register the admin and ``users`` accounts, then each present service's data sets."""
        self._directory.mkdir(parents=True, exist_ok=True)
        self._note(f"[seed] registering {users} accounts + 1 admin (argon2id: about 0.17 s of CPU each)")
        admin = await self._register(ADMIN_EMAIL, "Load test admin")
        accounts = await bounded(REGISTER_CONCURRENCY, [
            partial(self._register, f"user{i:05d}@{EMAIL_DOMAIN}", f"Load tester {i}") for i in range(users)
        ])
        result = SeedResult(self._directory, admin.access_token, accounts)
        result.add("user-names", [{"name": a.name} for a in accounts])
        result.add("logins", [{"email": a.email, "password": PASSWORD} for a in accounts])
        result.add("refresh-tokens", [{"refresh_token": a.refresh_token} for a in accounts])
        # Templated: ghz fills in the request number, so every write really changes the profile. The
        # mask is in its object form: ghz's JSON parser does not take the string form of a FieldMask.
        result.add("user-updates", [
            {"user": {"name": a.name, "display_name": "Load tester {{.RequestNumber}}"},
             "update_mask": {"paths": ["display_name"]}}
            for a in accounts
        ])
        if "workout" in self._addresses:
            await self._guarded(result, "workout", self._seed_workout(result))
        if "analytics" in self._addresses:
            await self._await_analytics(result)
            if "stats-names" not in result.problems:
                result.add("stats-names", [{"name": f"{a.name}/stats"} for a in accounts])
        if "ai" in self._addresses:
            result.add("recommend-requests", [
                {"user": a.name, "available_minutes": 60, "max_exercises": 6} for a in accounts
            ])
        if "notification" in self._addresses:
            result.add("subscribe-parents", [{"parent": a.name} for a in accounts])
        write_json(self._directory / "accounts.json", [a.__dict__ for a in accounts])
        return result

    async def _guarded(self, result: SeedResult, service: str, work: Awaitable[None]) -> None:
        """Run one service's seeding; a failure marks its data sets missing instead of ending the run."""
        try:
            await work
        except grpc.aio.AioRpcError as error:
            reason = f"{service} seeding failed: {error.code().name}: {error.details()}"
            self._note(f"[seed] {reason}")
            result.problems[service] = reason

    async def _register(self, email: str, display_name: str) -> Account:
        stub = user_service_pb2_grpc.UserServiceStub(self._channel("user"))
        reply = await stub.Register(
            user_service_pb2.RegisterRequest(
                email=email, password=PASSWORD, display_name=display_name,
                request_id=str(uuid.uuid5(REQUEST_ID_NAMESPACE, email)),
            ),
            timeout=CALL_TIMEOUT,
        )
        if email == ADMIN_EMAIL and reply.user.role != user_pb2.ROLE_ADMIN:
            self._note(f"[seed] warning: {email} is not an admin; the target must list it in FITTRACKER_ADMIN_EMAILS")
        return Account(email, reply.user.name, reply.tokens.access_token, reply.tokens.refresh_token)

    async def _seed_workout(self, result: SeedResult) -> None:
        """Per user: one completed session (history) and one open session with sets (reads, writes).

        A user may have one session in progress at a time, so the open sessions serve GetSession
        and LogSet first and are completed by the CompleteSession scenario, which runs last.
        """
        stub = workout_service_pb2_grpc.WorkoutServiceStub(self._channel("workout"))
        catalog = await stub.ListExercises(workout_service_pb2.ListExercisesRequest(page_size=20),
                                           metadata=bearer(result.admin_token), timeout=CALL_TIMEOUT)
        exercises = [e.name for e in catalog.exercises]
        if not exercises:
            result.problems["workout"] = "ListExercises returned no exercises to log sets against"
            return
        self._note(f"[seed] workout: per account a completed and an open session with sets "
                   f"({len(exercises)} exercises)")

        async def sessions_of(account: Account) -> str:
            auth = bearer(account.access_token)

            async def start(label: str) -> str:
                session = await stub.StartSession(
                    workout_service_pb2.StartSessionRequest(parent=account.name, display_name=label),
                    metadata=auth, timeout=CALL_TIMEOUT,
                )
                for k in range(3):
                    await stub.LogSet(
                        workout_service_pb2.LogSetRequest(parent=session.name, set=_working_set(exercises, k)),
                        metadata=auth, timeout=CALL_TIMEOUT,
                    )
                return session.name

            # A stack seeded before may hold an open session of this user: finish it, it is history now.
            open_ones = await stub.ListSessions(
                workout_service_pb2.ListSessionsRequest(parent=account.name, page_size=1,
                                                        state=workout_pb2.SESSION_STATE_IN_PROGRESS),
                metadata=auth, timeout=CALL_TIMEOUT,
            )
            for session in open_ones.sessions:
                await stub.CompleteSession(workout_service_pb2.CompleteSessionRequest(name=session.name),
                                           metadata=auth, timeout=CALL_TIMEOUT)
            done = await start("Load test: history")
            await stub.CompleteSession(workout_service_pb2.CompleteSessionRequest(name=done), metadata=auth,
                                       timeout=CALL_TIMEOUT)
            return await start("Load test: open")

        open_sessions = await bounded(OTHER_CONCURRENCY, [partial(sessions_of, a) for a in result.accounts])
        result.add("session-names", [{"name": s} for s in open_sessions])
        result.add("log-sets", [{"parent": s, "set": _set_json(exercises, i)} for i, s in enumerate(open_sessions)])
        result.add("complete-sessions", [{"name": s} for s in open_sessions])

    async def _await_analytics(self, result: SeedResult) -> None:
        """Wait until analytics has projected the seeded accounts' events (its reads need them)."""
        stub = analytics_service_pb2_grpc.AnalyticsServiceStub(self._channel("analytics"))
        last = result.accounts[-1].name if result.accounts else ""
        deadline = time.monotonic() + ANALYTICS_WAIT_SECONDS
        while True:
            try:
                await stub.GetUserStats(analytics_service_pb2.GetUserStatsRequest(name=f"{last}/stats"),
                                        metadata=bearer(result.admin_token), timeout=CALL_TIMEOUT)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    result.problems["stats-names"] = (
                        f"analytics did not know {last} within {ANALYTICS_WAIT_SECONDS:.0f} s of seeding "
                        f"({error.code().name}: {error.details()}): are its events flowing (Redis on)?")
                    return
                await asyncio.sleep(0.25)


def _working_set(exercises: Sequence[str], i: int) -> workout_pb2.WorkoutSet:
    return workout_pb2.WorkoutSet(
        exercise=exercises[i % len(exercises)], set_type=workout_pb2.SET_TYPE_WORKING,
        reps=5 + i % 6, weight_kg=40.0 + 2.5 * (i % 24), rpe=7.5,
    )


def _set_json(exercises: Sequence[str], i: int) -> dict[str, Any]:
    """A LogSet body as ghz's JSON (proto JSON names)."""
    return {
        "exercise": exercises[i % len(exercises)], "set_type": "SET_TYPE_WORKING",
        "reps": 5 + i % 6, "weight_kg": 40.0 + 2.5 * (i % 24), "rpe": 8.0,
    }
