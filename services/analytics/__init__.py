"""The analytics service: per-user statistics, trends and reports, and platform metrics, built from events."""

from __future__ import annotations

from fittracker.analytics.v1 import analytics_service_pb2_grpc

from services.analytics.projector import Clock, Projector
from services.analytics.repository import AnalyticsRepository
from services.analytics.service import PUBLIC_METHODS, SERVICE, AnalyticsService
from services.runtime.events import stream_of
from services.runtime.resources import Resources
from services.runtime.server import ServiceDefinition
from services.runtime.settings import Settings
from services.runtime.timeutil import now

#: The consumer group every analytics replica joins: each event is handled by one of them.
CONSUMER_GROUP = "analytics"


async def build(settings: Settings, resources: Resources) -> ServiceDefinition:
    """Wire the analytics service: repository, outbox, the event consumer and the RPCs."""
    return await assemble(settings, resources)


async def assemble(settings: Settings, resources: Resources, *, clock: Clock = now) -> ServiceDefinition:
    """``build`` with the clock as a dependency, so that tests can fix "today"."""
    repo = AnalyticsRepository(resources.store)
    await repo.ensure()
    outbox = await resources.outbox()
    projector = Projector(repo, outbox, clock)
    consumer = resources.events.consumer(
        CONSUMER_GROUP, [stream_of("workout"), stream_of("user")], projector.handle, resources.store
    )
    servicer = AnalyticsService(repo, resources.page_tokens, clock)

    return ServiceDefinition.serving(
        servicer, analytics_service_pb2_grpc.add_AnalyticsServiceServicer_to_server, SERVICE,
        public_methods=PUBLIC_METHODS,
        background=[consumer, outbox.relay],
    )
