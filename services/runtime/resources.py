"""Shared resources a service process builds once at start and hands to its domain code."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis

from services.runtime.auth import JWKS_FILE, ServiceCredentials, TokenVerifier
from services.runtime.clients import ChannelPool, ServiceClient
from services.runtime.counters import Counters, RedisCounters, StoreCounters
from services.runtime.events import EventBus, open_bus
from services.runtime.observability import Metrics
from services.runtime.settings import ServiceName, Settings
from services.runtime.storage import DocumentStore, open_store


@dataclass
class Resources:
    """The store, the optional Redis, metrics, the token verifier, the event bus and outgoing channels."""

    settings: Settings
    store: DocumentStore
    redis: aioredis.Redis | None
    metrics: Metrics
    verifier: TokenVerifier
    counters: Counters
    service_credentials: ServiceCredentials
    #: Domain events: Redis Streams when Redis is configured, else the machine's embedded log.
    events: EventBus
    channels: ChannelPool = field(default_factory=ChannelPool)

    @classmethod
    async def open(cls, settings: Settings) -> Resources:
        """Connect to what ``settings`` name: MongoDB or the embedded store, and Redis if set."""
        store = open_store(settings.mongo_url, settings.mongo_database, settings.data_dir, settings.service)
        redis = aioredis.Redis.from_url(settings.redis_url) if settings.redis_url else None
        counters: Counters = RedisCounters(redis) if redis is not None else StoreCounters(store)
        await counters.ensure()
        metrics = Metrics()
        if settings.metrics_port:
            metrics.serve(settings.metrics_port + settings.worker_index)
        events = open_bus(settings, redis, registry=metrics.registry)
        return cls(
            settings=settings,
            store=store,
            redis=redis,
            metrics=metrics,
            verifier=TokenVerifier(settings.keys_dir / JWKS_FILE, settings.jwt_issuer, settings.jwt_audience),
            counters=counters,
            service_credentials=ServiceCredentials(
                settings.keys_dir, settings.service, settings.jwt_issuer, settings.jwt_audience
            ),
            events=events,
        )

    def client(self, service: ServiceName) -> ServiceClient:
        """The shared client of another service, at its configured address."""
        return self.channels.client(self.settings.address_of(service))

    async def close(self) -> None:
        """Close channels, the event bus, Redis and the store."""
        await self.channels.close()
        await self.events.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.store.close()
