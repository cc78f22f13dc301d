"""The event the ai service consumes, and the one it answers with.

Consumed: ``UserDeleted`` from the user service's stream, in group "ai": the user's plans are
erased (the only user data this service keeps), then ``DataErased`` answers the deletion saga,
through the outbox, with the id ``fact_id("ai.data_erased", <deletion_request_id>)`` so that a
redelivered event publishes the same fact again rather than a second one.
"""

from __future__ import annotations

import logging
from typing import Protocol

from fittracker.events.v1 import events_pb2

from services.ai.repository import PlanRepository
from services.runtime.events import fact_id, make_envelope
from services.runtime.timeutil import now, to_timestamp

PRODUCER = "ai"
#: The consumer group of this service on other services' streams.
GROUP = "ai"

log = logging.getLogger("fittracker.ai.events")


class EventSink(Protocol):
    """Where events go: the outbox (``services.runtime.events.Outbox``)."""

    async def add(self, envelope: events_pb2.EventEnvelope) -> bool:
        """Store ``envelope`` for publishing; idempotent on its event_id."""
        ...


class UserDeletedHandler:
    """Erases a deleted user's plans and answers the deletion saga with DataErased."""

    def __init__(self, plans: PlanRepository, sink: EventSink) -> None:
        """Erase through ``plans``; publish through ``sink``."""
        self._plans = plans
        self._sink = sink

    async def __call__(self, envelope: events_pb2.EventEnvelope) -> None:
        """Handle one event of the user stream; anything but UserDeleted is ignored."""
        if envelope.WhichOneof("payload") != "user_deleted":
            return
        user_id = envelope.user.removeprefix("users/")
        request_id = envelope.user_deleted.deletion_request_id
        # Erasing is idempotent: a redelivered event finds nothing left and answers again.
        erased = await self._plans.erase_user(user_id)
        erased_at = now()
        await self._sink.add(
            make_envelope(
                PRODUCER, user_id,
                events_pb2.DataErased(service=PRODUCER, deletion_request_id=request_id,
                                      erase_time=to_timestamp(erased_at)),
                event_id=fact_id("ai.data_erased", request_id), occur_time=erased_at,
            )
        )
        log.info("erased a deleted user's plans",
                 extra={"fields": {"user": user_id, "deletion_request_id": request_id, "plans": erased}})
