"""Shared resources a service process builds once at start and hands to its domain code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis

from services.runtime.auth import JWKS_FILE, ServiceCredentials, TokenVerifier
from services.runtime.cache import Cache, CacheMetrics, Codec
from services.runtime.clients import ChannelPool, ServiceClient
from services.runtime.counters import Counters, RedisCounters, StoreCounters
from services.runtime.events import EventBus, Outbox, open_bus
from services.runtime.observability import Metrics
from services.runtime.paging import PageTokens, load_key
from services.runtime.revocation import RedisRevocationLog, RevocationLog, Revocations, StoreRevocationLog
from services.runtime.settings import ServiceName, Settings
from services.runtime.storage import DocumentStore, open_store

T = TypeVar("T")


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
    #: Sessions and accounts whose access tokens no longer count (checked on every call).
    revocations: Revocations
    #: The page-token codec of every list method (one key per deployment).
    page_tokens: PageTokens
    channels: ChannelPool = field(default_factory=ChannelPool)
    _caches: list[Cache[Any]] = field(default_factory=list)
    _cache_metrics: CacheMetrics | None = None
    #: Stores opened here beside the service's own (the shared revocation log's), closed with it.
    _extra_stores: list[DocumentStore] = field(default_factory=list)

    async def shared_cache(self, name: str, codec: Codec[T]) -> Cache[T] | None:
        """A read cache shared by every replica through Redis, or None without Redis.

        Without Redis an in-process cache could serve one replica's stale copy after a write on
        another, and the stores it would front answer in microseconds anyway, so there is none.
        """
        if self.redis is None:
            return None
        if self._cache_metrics is None:
            self._cache_metrics = CacheMetrics(self.metrics.registry)
        cache = Cache(name, codec, redis=self.redis, metrics=self._cache_metrics)
        await cache.start()
        self._caches.append(cache)
        return cache

    @classmethod
    async def open(cls, settings: Settings) -> Resources:
        """Connect to what ``settings`` name: MongoDB or the embedded store, and Redis if set."""
        store = open_store(settings.mongo_url, settings.mongo_database, settings.data_dir, settings.service)
        redis = aioredis.Redis.from_url(settings.redis_url) if settings.redis_url else None
        metrics = Metrics()
        counters: Counters = RedisCounters(redis, metrics.registry) if redis is not None else StoreCounters(store)
        await counters.ensure()
        if settings.metrics_port:
            metrics.serve(settings.metrics_port + settings.worker_index)
        events = open_bus(settings, redis, registry=metrics.registry)
        extra_stores: list[DocumentStore] = []
        revocation_log: RevocationLog
        if redis is not None:
            revocation_log = RedisRevocationLog(redis)
        elif settings.mongo_url:
            revocation_log = StoreRevocationLog(store)  # one database for every service
        else:
            # Each service has its own embedded file; revocations need one every service reads.
            extra_stores.append(open_store("", "", settings.data_dir, "auth"))
            revocation_log = StoreRevocationLog(extra_stores[0])
        revocations = Revocations(
            revocation_log,
            token_ttl_seconds=settings.access_token_ttl_seconds,
            poll_seconds=settings.revocation_poll_seconds,
            registry=metrics.registry,
        )
        await revocations.ensure()
        await revocations.refresh()
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
            revocations=revocations,
            page_tokens=PageTokens(load_key(
                settings.page_token_key, settings.keys_dir, allow_create=settings.environment != "production"
            )),
            _extra_stores=extra_stores,
        )

    async def outbox(self) -> Outbox:
        """A new outbox on this service's store and bus, its collection ready."""
        outbox = Outbox(self.store, self.events)
        await outbox.ensure()
        return outbox

    def client(self, service: ServiceName) -> ServiceClient:
        """The shared client of another service, at its configured address."""
        return self.channels.client(self.settings.address_of(service))

    async def close(self) -> None:
        """Close channels, the event bus, Redis and the store."""
        for cache in self._caches:
            await cache.close()
        await self.channels.close()
        await self.events.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.store.close()
        for extra in self._extra_stores:
            await extra.close()
