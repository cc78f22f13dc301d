"""The event the ai service consumes, and the one it answers with.

Consumed: ``UserDeleted`` from the user service's stream, in group "ai": the user's plans are
erased (the only user data this service keeps), then ``DataErased`` answers the deletion saga
(``services.runtime.events.erasure``).
"""

from __future__ import annotations

from collections.abc import Mapping

from services.ai.repository import PlanRepository
from services.runtime.events import Eraser

PRODUCER = "ai"
#: The consumer group of this service on other services' streams.
GROUP = "ai"


def eraser(plans: PlanRepository) -> Eraser:
    """What erasing a deleted user means here: their plans."""

    async def erase(user_id: str) -> Mapping[str, int]:
        return {"plans": await plans.erase_user(user_id)}

    return erase
