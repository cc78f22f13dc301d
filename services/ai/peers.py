"""Calls to the user and workout services, on the caller's behalf and within a time budget.

Every call forwards the caller's own bearer token (``forwarded_credentials``), so the other
service applies its own ownership rules, and runs through the shared ``ServiceClient``: a deadline
that is the smaller of the budget left and the incoming call's, gRPC's retries on UNAVAILABLE,
and the circuit breaker. Failures come out as two domain errors only: ``NotFound`` when the other
service says the user does not exist, ``Unavailable`` for anything else (down, slow, failing),
which callers turn into a degraded answer or pass on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import grpc
from fittracker.common.v1 import fitness_pb2 as fit
from fittracker.user.v1 import user_service_pb2, user_service_pb2_grpc
from fittracker.workout.v1 import workout_pb2, workout_service_pb2, workout_service_pb2_grpc
from google.protobuf.message import Message

from services.ai.catalog import FALLBACK, CatalogExercise
from services.ai.recommender import UserContext
from services.runtime.auth import forwarded_credentials
from services.runtime.clients import ServiceClient
from services.runtime.errors import NotFound, Unavailable
from services.runtime.timeutil import to_timestamp

if TYPE_CHECKING:
    from fittracker.user.v1.user_service_pb2_grpc import UserServiceAsyncStub
    from fittracker.workout.v1.workout_service_pb2_grpc import WorkoutServiceAsyncStub

T = TypeVar("T", bound=Message)
PAGE_SIZE = 100
#: Pages read at most per listing: bounded work even for a user with an enormous history.
MAX_PAGES = 10
CATALOG_TTL_SECONDS = 600.0


class Peers:
    """The user and workout services, as the ai service needs them."""

    def __init__(self, user: ServiceClient, workout: ServiceClient, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Use the shared clients of both services (built once at start)."""
        self._user = user
        self._workout = workout
        self._users: UserServiceAsyncStub = user_service_pb2_grpc.UserServiceStub(user.channel)
        self._workouts: WorkoutServiceAsyncStub = workout_service_pb2_grpc.WorkoutServiceStub(workout.channel)
        self._clock = clock
        self._catalog: list[CatalogExercise] = []
        self._catalog_time = -CATALOG_TTL_SECONDS

    async def context(self, user_id: str, deadline: float) -> UserContext:
        """Goal, level, equipment and time zone from the user service."""
        profile, preferences = await asyncio.gather(
            self._call(self._user, "user", self._users.GetUser,
                       user_service_pb2.GetUserRequest(name=f"users/{user_id}"), deadline),
            self._call(self._user, "user", self._users.GetPreferences,
                       user_service_pb2.GetPreferencesRequest(name=f"users/{user_id}/preferences"), deadline),
        )
        return UserContext(
            goal=preferences.goals.primary_goal,
            level=profile.fitness_level,
            equipment=frozenset(preferences.goals.available_equipment) - {fit.EQUIPMENT_UNSPECIFIED},
            time_zone=preferences.time_zone or "UTC",
        )

    async def sessions(self, user_id: str, since: datetime, deadline: float) -> list[workout_pb2.Session]:
        """The user's completed sessions that started at or after ``since``."""
        found: list[workout_pb2.Session] = []
        request = workout_service_pb2.ListSessionsRequest(
            parent=f"users/{user_id}", page_size=PAGE_SIZE, start_time=to_timestamp(since),
            state=workout_pb2.SESSION_STATE_COMPLETED,
        )
        for _ in range(MAX_PAGES):
            page = await self._call(self._workout, "workout", self._workouts.ListSessions, request, deadline)
            found.extend(page.sessions)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        return found

    async def maxima(self, user_id: str, deadline: float) -> dict[str, float]:
        """The best estimated one-rep maximum per exercise, in kilograms."""
        maxima: dict[str, float] = {}
        request = workout_service_pb2.ListPersonalRecordsRequest(
            parent=f"users/{user_id}", page_size=PAGE_SIZE, kind=fit.PERSONAL_RECORD_KIND_BEST_ESTIMATED_ONE_REP_MAX,
        )
        for _ in range(MAX_PAGES):
            page = await self._call(self._workout, "workout", self._workouts.ListPersonalRecords, request, deadline)
            for record in page.personal_records:
                maxima[record.exercise] = max(maxima.get(record.exercise, 0.0), record.value)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        return maxima

    async def catalog(self, deadline: float) -> tuple[Sequence[CatalogExercise], str]:
        """The exercise catalog and, when it is not the live one, a sentence saying so.

        The catalog is the same for everyone and changes rarely, so it is cached for ten minutes
        and a stale copy is preferred to none; only a process that never read it falls back to
        the short built-in list.
        """
        if self._clock() - self._catalog_time < CATALOG_TTL_SECONDS:
            return self._catalog, ""
        try:
            exercises: list[CatalogExercise] = []
            request = workout_service_pb2.ListExercisesRequest(page_size=PAGE_SIZE)
            for _ in range(MAX_PAGES):
                page = await self._call(self._workout, "workout", self._workouts.ListExercises, request, deadline)
                exercises.extend(CatalogExercise.from_proto(e) for e in page.exercises)
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
        except (Unavailable, NotFound):
            if self._catalog:
                return self._catalog, ""
            return FALLBACK, "The exercise catalog could not be read, so the choice is limited to common exercises."
        self._catalog, self._catalog_time = exercises, self._clock()
        return exercises, ""

    async def _call(self, client: ServiceClient, service: str, rpc: Callable[..., Awaitable[T]], request: Message,
                    deadline: float) -> T:
        remaining = deadline - self._clock()
        if remaining <= 0.001:
            raise Unavailable(f"the {service} service did not answer in time")
        try:
            return await client.call(rpc, request, budget=remaining, metadata=forwarded_credentials())
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(error.details() or "not found") from None
            code = error.code().name
            raise Unavailable(f"the {service} service answered {code}") from None
