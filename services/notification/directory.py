"""What this service asks other services: a recipient's address and preferences, exercise names.

Contact details are not copied here (events carry ids, not addresses): the user service is asked
before each delivery, with this service's own service-role token, so a changed address, a channel
turned off or a deleted account takes effect at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from fittracker.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from fittracker.workout.v1 import workout_service_pb2, workout_service_pb2_grpc

from services.runtime.auth import ServiceCredentials
from services.runtime.clients import ServiceClient
from services.runtime.errors import NotFound, Unavailable

if TYPE_CHECKING:
    from fittracker.user.v1.user_service_pb2_grpc import UserServiceAsyncStub
    from fittracker.workout.v1.workout_service_pb2_grpc import WorkoutServiceAsyncStub

#: Exercise names kept per process; the catalog changes rarely and is small.
NAME_CACHE_SIZE = 2048
#: Seconds an exercise-name lookup may take: a notification is better sent with a plain name.
NAME_BUDGET_SECONDS = 0.5


@dataclass(frozen=True)
class Recipient:
    """Who a notification goes to and how they want it."""

    user_id: str
    email: str
    display_name: str
    preferences: user_pb2.Preferences


class Directory:
    """Looks up recipients in the user service and exercise names in the workout service."""

    def __init__(self, users: ServiceClient, workouts: ServiceClient, credentials: ServiceCredentials) -> None:
        """Call the services through ``users`` and ``workouts`` as this service (``credentials``)."""
        self._users = users
        self._user_stub: UserServiceAsyncStub = user_service_pb2_grpc.UserServiceStub(users.channel)
        self._workouts = workouts
        self._workout_stub: WorkoutServiceAsyncStub = workout_service_pb2_grpc.WorkoutServiceStub(workouts.channel)
        self._credentials = credentials
        self._names: OrderedDict[str, str] = OrderedDict()

    async def recipient(self, user_id: str) -> Recipient:
        """The user's address and preferences; NOT_FOUND when the account does not exist."""
        metadata = self._credentials.metadata()
        try:
            user = await self._users.call(
                self._user_stub.GetUser, user_service_pb2.GetUserRequest(name=f"users/{user_id}"), metadata=metadata
            )
            preferences = await self._users.call(
                self._user_stub.GetPreferences,
                user_service_pb2.GetPreferencesRequest(name=f"users/{user_id}/preferences"),
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"users/{user_id} not found") from None
            code = error.code().name
            raise Unavailable(f"the user service could not be asked about users/{user_id}: {code}") from None
        return Recipient(user_id, user.email, user.display_name, preferences)

    async def require_user(self, user_id: str) -> None:
        """NOT_FOUND unless the account exists."""
        await self.recipient(user_id)

    async def exercise_name(self, exercise: str) -> str:
        """The display name of "exercises/{id}"; a readable form of the id when the catalog cannot say."""
        cached = self._names.get(exercise)
        if cached is not None:
            self._names.move_to_end(exercise)
            return cached
        try:
            found = await self._workouts.call(
                self._workout_stub.GetExercise, workout_service_pb2.GetExerciseRequest(name=exercise),
                budget=NAME_BUDGET_SECONDS, metadata=self._credentials.metadata(),
            )
            name = found.display_name or humanize(exercise)
        except (grpc.aio.AioRpcError, Unavailable):
            return humanize(exercise)
        self._names[exercise] = name
        while len(self._names) > NAME_CACHE_SIZE:
            self._names.popitem(last=False)
        return name


def humanize(exercise: str) -> str:
    """"exercises/barbell-back-squat" -> "Barbell back squat"; an opaque id -> "your exercise"."""
    slug = exercise.rsplit("/", 1)[-1]
    words = slug.replace("_", "-").split("-")
    if not any(w.isalpha() for w in words):
        return "your exercise"
    return " ".join(words).strip().capitalize()
