"""The ai service: form analysis from pose keypoints, workout recommendations, adaptive plans."""

from __future__ import annotations

from fittracker.ai.v1 import ai_service_pb2_grpc

from services.ai.events import GROUP, PRODUCER, eraser
from services.ai.peers import Peers
from services.ai.repository import PlanRepository
from services.ai.service import PUBLIC_METHODS, SERVICE, AiService
from services.runtime.events import UserDeletedHandler, stream_of
from services.runtime.resources import Resources
from services.runtime.server import ServiceDefinition
from services.runtime.settings import Settings


async def build(settings: Settings, resources: Resources) -> ServiceDefinition:
    """Wire the ai service from the shared resources."""
    plans = PlanRepository(resources.store)
    await plans.ensure()
    outbox = await resources.outbox()
    servicer = AiService(plans, Peers(resources.client("user"), resources.client("workout")), resources.page_tokens)
    erase_deleted_users = resources.events.consumer(
        GROUP, [stream_of("user")], UserDeletedHandler(PRODUCER, eraser(plans), outbox), resources.store
    )

    return ServiceDefinition.serving(
        servicer, ai_service_pb2_grpc.add_AiServiceServicer_to_server, SERVICE,
        public_methods=PUBLIC_METHODS,
        background=[outbox.relay, erase_deleted_users],
    )
