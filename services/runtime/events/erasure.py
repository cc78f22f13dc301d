"""Each service's side of the deletion saga: erase what it holds of a user, then say so.

The user service announces UserDeleted; every service holding user data erases it and answers
DataErased with the same deletion_request_id (the saga in services/user waits for all answers).
The answer's event id is ``fact_id("<service>.data_erased", <deletion_request_id>)``, so a
redelivered UserDeleted, which erases nothing more, publishes the same fact again rather than a
second one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from fittracker.events.v1 import events_pb2

from services.runtime.events.envelope import fact_id, make_envelope
from services.runtime.timeutil import now, to_timestamp

log = logging.getLogger("fittracker.erasure")

#: Erases one user's data (idempotently) and says how much of what went, e.g. {"plans": 3}.
Eraser = Callable[[str], Awaitable[Mapping[str, int]]]


class EventSink(Protocol):
    """Where events go: the outbox (``services.runtime.events.Outbox``)."""

    async def add(self, envelope: events_pb2.EventEnvelope) -> bool:
        """Store ``envelope`` for publishing; idempotent on its event_id."""
        ...


def data_erased(service: str, user_id: str, deletion_request_id: str) -> events_pb2.EventEnvelope:
    """``service``'s DataErased answer to a deletion, with its deterministic event id."""
    erased_at = now()
    return make_envelope(
        service, user_id,
        events_pb2.DataErased(service=service, deletion_request_id=deletion_request_id,
                              erase_time=to_timestamp(erased_at)),
        event_id=fact_id(f"{service}.data_erased", deletion_request_id), occur_time=erased_at,
    )


class UserDeletedHandler:
    """Answers UserDeleted on the user stream: erase, then DataErased; other events are ignored."""

    def __init__(self, service: str, erase: Eraser, sink: EventSink) -> None:
        """Erase with ``erase``; publish the answer through ``sink`` as ``service``."""
        self._service = service
        self._erase = erase
        self._sink = sink

    async def __call__(self, envelope: events_pb2.EventEnvelope) -> None:
        """Handle one event of the user stream."""
        if envelope.WhichOneof("payload") != "user_deleted":
            return
        user_id = envelope.user.removeprefix("users/")
        request_id = envelope.user_deleted.deletion_request_id
        # Erasing is idempotent: a redelivered event finds nothing left and answers again.
        erased = await self._erase(user_id)
        await self._sink.add(data_erased(self._service, user_id, request_id))
        log.info("erased a deleted user's data", extra={"fields": {
            "service": self._service, "user": user_id, "deletion_request_id": request_id, **erased}})
