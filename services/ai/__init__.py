"""The ai service: form analysis from pose keypoints, workout recommendations, adaptive plans."""

from __future__ import annotations

import grpc
from fittracker.ai.v1 import ai_service_pb2_grpc

from services.ai.events import GROUP, PRODUCER, eraser
from services.ai.peers import Peers
from services.ai.repository import PlanRepository
from services.ai.service import PUBLIC_METHODS, SERVICE, AiService
from services.runtime.events import Outbox, UserDeletedHandler, stream_of
from services.runtime.resources import Resources
from services.runtime.server import ServiceDefinition
from services.runtime.settings import Settings


async def build(settings: Settings, resources: Resources) -> ServiceDefinition:
    """Wire the ai service from the shared resources."""
    plans = PlanRepository(resources.store)
    await plans.ensure()
    outbox = Outbox(resources.store, resources.events)
    await outbox.ensure()
    servicer = AiService(plans, Peers(resources.client("user"), resources.client("workout")), resources.page_tokens)
    erase_deleted_users = resources.events.consumer(
        GROUP, [stream_of("user")], UserDeletedHandler(PRODUCER, eraser(plans), outbox), resources.store
    )

    def register(server: grpc.aio.Server) -> None:
        ai_service_pb2_grpc.add_AiServiceServicer_to_server(servicer, server)

    return ServiceDefinition(
        service_names=[SERVICE],
        register=register,
        public_methods=PUBLIC_METHODS,
        background=[outbox.relay, erase_deleted_users],
    )
