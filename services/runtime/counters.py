"""Windowed counters for rate limits and brute-force protection, shared by every replica.

With Redis configured they live there (INCR + EXPIRE in one round trip); otherwise in the
service's document store, which the worker processes of one machine share. A counter starts at
the first increment and resets ``window`` seconds later (a fixed window, as limits are coarse).

When Redis cannot be reached the counters **fail open**: ``incr`` and ``get`` answer 0 and
``reset`` does nothing, so failed-login throttling and the per-user notification quota let calls
through instead of refusing every login while Redis is away. The edge's own quotas (per address
and per user, counted in Envoy, not in Redis) keep bounding what a client can send meanwhile, which
is why open is the safer direction: closed would turn a cache outage into a sign-in outage. Each
fail-open answer is logged (at most every ``_WARN_EVERY_SECONDS``) and counted in
``counters_failed_open``.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError

from services.runtime.storage import CollectionSpec, DocumentStore, DuplicateKeyError, IndexSpec

log = logging.getLogger("fittracker.counters")
_WARN_EVERY_SECONDS = 10.0

COUNTERS = CollectionSpec(
    name="counters",
    shard_key=("_id",),
    why="every operation addresses one counter by its key",
    indexes=(IndexSpec("expires_ttl", (("expires_at", 1),), expire_after_seconds=0),),
)


class Counters(Protocol):
    """Named counters that expire a fixed window after their first increment."""

    async def ensure(self) -> None:
        """Prepare storage (indexes); idempotent."""
        ...

    async def incr(self, key: str, window_seconds: int) -> int:
        """Add one and return the new count."""
        ...

    async def get(self, key: str) -> int:
        """The current count (0 when absent or expired)."""
        ...

    async def reset(self, key: str) -> None:
        """Forget the counter."""
        ...


class RedisCounters:
    """Counters in Redis, shared by every replica of every service; open when Redis is away."""

    def __init__(self, redis: aioredis.Redis, registry: CollectorRegistry | None = None) -> None:
        """Use ``redis`` for all counters; keys are prefixed with ``ctr:``."""
        self._redis = redis
        self._failed_open = Counter(
            "counters_failed_open", "Counter operations answered without Redis (fail open).",
            registry=registry or CollectorRegistry(),
        )
        self._warned_at = -_WARN_EVERY_SECONDS

    async def ensure(self) -> None:
        """Nothing to prepare."""

    async def incr(self, key: str, window_seconds: int) -> int:
        """INCR and, for a new key only, EXPIRE, in one pipeline round trip; 0 without Redis."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(f"ctr:{key}")
                pipe.expire(f"ctr:{key}", window_seconds, nx=True)
                count, _ = await pipe.execute()
        except (RedisError, OSError) as error:
            return self._open(error)
        return int(count)

    async def get(self, key: str) -> int:
        """GET, 0 when absent or without Redis."""
        try:
            value = await self._redis.get(f"ctr:{key}")
        except (RedisError, OSError) as error:
            return self._open(error)
        return int(value or 0)

    async def reset(self, key: str) -> None:
        """DEL; nothing without Redis."""
        try:
            await self._redis.delete(f"ctr:{key}")
        except (RedisError, OSError) as error:
            self._open(error)

    def _open(self, error: Exception) -> int:
        self._failed_open.inc()
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning("rate-limit counters unreachable; failing open", extra={"fields": {"error": repr(error)}})
        return 0


class StoreCounters:
    """Counters as documents, for a machine without Redis."""

    def __init__(self, store: DocumentStore) -> None:
        """Keep counters in ``store``'s ``counters`` collection."""
        self._store = store
        self._col = store.collection(COUNTERS)

    async def ensure(self) -> None:
        """Create the TTL index."""
        await self._store.ensure([COUNTERS])

    async def incr(self, key: str, window_seconds: int) -> int:
        """Increment atomically, restarting the window when the old one has expired."""
        now = datetime.now(UTC)
        # An expired document may linger until the TTL sweep: start it over instead of adding to it.
        await self._col.delete_one({"_id": key, "expires_at": {"$lte": now}})
        update = {"$inc": {"count": 1}, "$setOnInsert": {"expires_at": now + timedelta(seconds=window_seconds)}}
        try:
            doc = await self._col.update_one({"_id": key}, update, upsert=True)
        except DuplicateKeyError:
            # Two first increments raced to create the counter: the loser's retry finds it and adds to it.
            doc = await self._col.update_one({"_id": key}, update, upsert=True)
        return int(doc["count"]) if doc else 1

    async def get(self, key: str) -> int:
        """The count of a live window, else 0."""
        doc = await self._col.find_one({"_id": key, "expires_at": {"$gt": datetime.now(UTC)}})
        return int(doc["count"]) if doc else 0

    async def reset(self, key: str) -> None:
        """Delete the counter."""
        await self._col.delete_one({"_id": key})
