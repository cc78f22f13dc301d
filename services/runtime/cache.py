"""Read caching for services: an in-process L1 (bounded LRU + TTL) in front of Redis (L2), cache-aside.

A read asks L1, then Redis, then the loader (the store), and writes what the loader returned back
to both. A write changes the store first and then calls ``invalidate(key)``. Values are encoded
by a ``Codec`` (protobuf messages or JSON documents, never pickle: Redis is shared, and decoding
must not run code).

Why reads stay correct across replicas:

- Every key has a version in Redis, incremented by each invalidation. A Redis entry carries the
  version it was loaded under and counts only while that is still the key's version, and the
  write-back is a compare-and-set on the version. So a slow reader that loaded the old row before
  a write landed cannot put it back: the classic cache-aside race is closed in L2.
- The same version guards L1: an invalidation leaves a tombstone with the new version, and a load
  that started under an older version is not stored over it.
- Every replica drops its L1 copy on an invalidation message (Redis pub/sub). The writer waits,
  at most ``ack_timeout`` seconds, until every subscriber acknowledged it, so once the write's RPC
  returns no replica serves the old value from L1: a user never reads their own stale write,
  whichever replica the next request lands on. A replica that did not answer in time is counted
  (``cache_invalidation_ack_timeouts``); its L1 copy still expires after ``l1_ttl``.
- A replica whose subscription drops may have missed messages: it clears its L1 on resubscribing.

When Redis stops answering the cache steps aside rather than failing calls: reads go to the
loader (the store) and nothing is cached, not even in L1 (invalidations from other replicas no
longer arrive), until Redis answers again, tried at most every ``_L2_RETRY_SECONDS``. Keys this
process invalidated meanwhile are invalidated in Redis first when it is back, so a Redis that
kept its data (AOF) cannot serve what was current before the outage.

Without Redis the cache is L1 only, with a short TTL, and invalidation reaches only this process:
other processes (replicas, SO_REUSEPORT workers) may serve a value up to ``l1_ttl`` seconds old
after a write elsewhere. That is the documented limit of the no-Redis mode, meant for a single
process and the quick start.

L1 hands out the decoded object itself, shared between callers: treat cached values as read-only
(copy a protobuf message before changing it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("fittracker.cache")

T = TypeVar("T")
M = TypeVar("M", bound=Message)

#: L1 lifetime with Redis: invalidation messages keep it fresh, the TTL only bounds a missed one.
DEFAULT_L1_TTL_WITH_REDIS = 30.0
#: L1 lifetime without Redis: the staleness other processes may see after a write, so keep it short.
DEFAULT_L1_TTL_ALONE = 2.0
#: Redis copies expire so that cold keys leave memory; invalidation, not expiry, keeps them fresh.
DEFAULT_L2_TTL = 300.0
#: How long a write waits for every replica to confirm it dropped its L1 copy.
DEFAULT_ACK_TIMEOUT = 0.5
#: Version keys outlive the values they guard by this factor (see ``_version_ttl_ms``).
_VERSION_TTL_FACTOR = 10
_RESUBSCRIBE_BACKOFF = (0.05, 0.2, 1.0, 2.0)
#: While Redis is failing, how often a call tries it again (the others go straight to the store).
_L2_RETRY_SECONDS = 1.0
#: At most one warning this often per cache while Redis stays away.
_L2_WARN_SECONDS = 10.0
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

# Stores the value only while the key's version is still the one it was loaded under, atomically.
_CAS_SET = """
if (redis.call('GET', KEYS[1]) or '0') == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


class Codec(Protocol[T]):
    """Turns cached values into bytes for Redis and back."""

    def encode(self, value: T) -> bytes:
        """The bytes stored in Redis."""
        ...

    def decode(self, data: bytes) -> T:
        """The value ``data`` encodes."""
        ...


class ProtoCodec(Generic[M]):
    """A protobuf message type, in its binary wire form."""

    def __init__(self, message_type: type[M]) -> None:
        """Decode into ``message_type``."""
        self._type = message_type

    def encode(self, value: M) -> bytes:
        """Serialize the message."""
        return value.SerializeToString()

    def decode(self, data: bytes) -> M:
        """Parse the message."""
        return self._type.FromString(data)


class DocumentCodec:
    """A store document (JSON types plus ``datetime``) as JSON; datetimes as ``{"$date": iso}``."""

    def encode(self, value: dict[str, Any]) -> bytes:
        """JSON with datetimes tagged, so they come back as datetimes."""
        return json.dumps(value, default=_tag_datetime, separators=(",", ":")).encode()

    def decode(self, data: bytes) -> dict[str, Any]:
        """The document, datetimes restored."""
        decoded: dict[str, Any] = json.loads(data, object_hook=_untag_datetime)
        return decoded


def _tag_datetime(value: object) -> dict[str, str]:
    if isinstance(value, datetime):
        return {"$date": value.isoformat()}
    raise TypeError(f"cannot cache a {type(value).__name__} in a document")


def _untag_datetime(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$date" in obj:
        return datetime.fromisoformat(obj["$date"])
    return obj


def _as_bytes(raw: bytes | str) -> bytes:
    """Redis replies as bytes, whichever way the client was told to decode responses."""
    return raw.encode() if isinstance(raw, str) else raw


class CacheMetrics:
    """The cache series of one process: lookups by layer and result, invalidations, slow acks."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Register the series on ``registry`` (pass the service's ``Metrics.registry``)."""
        self.registry = registry or CollectorRegistry()
        self.lookups = Counter(
            "cache_lookups", "Cache lookups, by cache, layer (l1, l2) and result (hit, miss).",
            ["cache", "layer", "result"], registry=self.registry,
        )
        self.invalidations = Counter(
            "cache_invalidations", "Keys invalidated by writes, by cache.", ["cache"], registry=self.registry,
        )
        self.ack_timeouts = Counter(
            "cache_invalidation_ack_timeouts",
            "Invalidations not acknowledged by every replica within the ack timeout, by cache.",
            ["cache"], registry=self.registry,
        )


_ABSENT: Any = object()


@dataclass(slots=True)
class _Entry:
    """An L1 slot: a value (or a tombstone, ``_ABSENT``), its version and its expiry."""

    value: Any
    version: int
    expires: float


class LruTtl:
    """A bounded LRU map whose entries also expire; not thread-safe (one event loop owns it)."""

    def __init__(self, max_entries: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Hold at most ``max_entries`` for ``ttl`` seconds each; 0 entries turns L1 off."""
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        """How many slots (values and tombstones) are held."""
        return len(self._entries)

    def get(self, key: str) -> Any:
        """The live value of ``key``, or ``_ABSENT``."""
        entry = self._entries.get(key)
        if entry is None:
            return _ABSENT
        if entry.expires <= self._clock():
            del self._entries[key]
            return _ABSENT
        if entry.value is not _ABSENT:
            self._entries.move_to_end(key)
        return entry.value

    def put(self, key: str, value: Any, version: int) -> bool:
        """Store ``value`` loaded under ``version``, unless a newer version (tombstone) is known."""
        if self.max_entries <= 0:
            return False
        entry = self._entries.get(key)
        if entry is not None and entry.version > version and entry.expires > self._clock():
            return False
        self._entries[key] = _Entry(value, version, self._clock() + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def tombstone(self, key: str, version: int) -> None:
        """Drop ``key``'s value and remember ``version``, so older loads are not stored after it."""
        if self.max_entries <= 0:
            return
        entry = self._entries.get(key)
        if entry is not None and entry.version > version:
            return
        self._entries[key] = _Entry(_ABSENT, version, self._clock() + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def version_of(self, key: str) -> int:
        """The newest version known for ``key`` here (0 when none)."""
        entry = self._entries.get(key)
        return entry.version if entry is not None else 0

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()


class Cache(Generic[T]):
    """A named cache of values of one type: L1 in this process, L2 in Redis when configured.

    Build one per kind of value at service start (``await cache.start()``), pass it to the
    repository that reads through it, and ``await cache.close()`` on shutdown.
    """

    def __init__(
        self,
        name: str,
        codec: Codec[T],
        *,
        redis: aioredis.Redis | None,
        metrics: CacheMetrics,
        l1_max_entries: int = 10_000,
        l1_ttl: float | None = None,
        l2_ttl: float = DEFAULT_L2_TTL,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Cache ``name`` (a key namespace shared by every replica); ``l1_max_entries=0`` turns L1 off."""
        if ":" in name or "{" in name or "}" in name:
            raise ValueError(f"cache name {name!r} must not contain ':', '{{' or '}}'")
        self.name = name
        self._codec = codec
        self._redis = redis
        ttl = l1_ttl if l1_ttl is not None else (DEFAULT_L1_TTL_WITH_REDIS if redis else DEFAULT_L1_TTL_ALONE)
        self.l1 = LruTtl(l1_max_entries, ttl, clock)
        self._l2_ttl_ms = max(1, int(l2_ttl * 1000))
        self._ack_timeout = ack_timeout
        self._channel = f"cache-invalidate:{name}"
        self._inflight: dict[str, asyncio.Future[T | None]] = {}
        self._cas: Any = redis.register_script(_CAS_SET) if redis is not None else None
        self._subscriber: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        # While Redis fails: when to try it again, and the keys invalidated meanwhile.
        self._l2_retry_at = 0.0
        self._l2_warned_at = -_L2_WARN_SECONDS
        self._unflushed: set[str] = set()
        # Without Redis, versions are a local counter: enough to order loads against invalidations.
        self._local_version = 0
        # Bound once: a labels() lookup per call would cost more than an L1 hit itself.
        self._metrics = metrics
        self._l1_hit = metrics.lookups.labels(name, "l1", "hit")
        self._l1_miss = metrics.lookups.labels(name, "l1", "miss")
        self._l2_hit = metrics.lookups.labels(name, "l2", "hit")
        self._l2_miss = metrics.lookups.labels(name, "l2", "miss")
        self._invalidated = metrics.invalidations.labels(name)
        self._ack_timeouts = metrics.ack_timeouts.labels(name)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to invalidation messages (with Redis); returns once the subscription is live."""
        if self._redis is None or self._subscriber is not None:
            return
        self._subscriber = asyncio.create_task(self._listen(), name=f"cache-{self.name}-invalidations")
        await asyncio.wait_for(self._subscribed.wait(), timeout=10.0)

    async def close(self) -> None:
        """Stop listening for invalidations."""
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber
            self._subscriber = None

    # --- reads --------------------------------------------------------------------------------

    async def get_or_load(self, key: str, loader: Callable[[], Awaitable[T | None]]) -> T | None:
        """The cached value of ``key``, or what ``loader`` returns (cached unless None).

        Concurrent misses of one key in this process share one load.
        """
        value = self.l1.get(key)
        if value is not _ABSENT:
            self._l1_hit.inc()
            return value  # type: ignore[no-any-return]  # L1 holds only values of type T
        self._l1_miss.inc()
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._load(key, loader)
        except BaseException as error:
            future.set_exception(error)
            # Retrieved here so that a load nobody else waited for does not log "never retrieved".
            future.exception()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key]

    async def get(self, key: str) -> T | None:
        """The cached value of ``key`` without loading it, or None."""
        value = self.l1.get(key)
        if value is not _ABSENT:
            self._l1_hit.inc()
            return value  # type: ignore[no-any-return]  # L1 holds only values of type T
        self._l1_miss.inc()
        if self._redis is None or not await self._l2_ready():
            return None
        try:
            found, version, _ = await self._read_l2(key)
        except _REDIS_DOWN as error:
            self._l2_failed(error)
            return None
        if found is not _ABSENT:
            self.l1.put(key, found, version)
            return found  # type: ignore[no-any-return]  # decoded by our codec
        return None

    async def get_many(self, keys: Iterable[str]) -> dict[str, T]:
        """The cached values among ``keys`` (absent ones left out), in one Redis round trip."""
        found: dict[str, T] = {}
        wanted: list[str] = []
        for key in keys:
            value = self.l1.get(key)
            if value is _ABSENT:
                self._l1_miss.inc()
                wanted.append(key)
            else:
                self._l1_hit.inc()
                found[key] = value
        if not wanted or self._redis is None or not await self._l2_ready():
            return found
        names = [name for key in wanted for name in self._redis_keys(key)]
        try:
            replies = await self._redis.mget(names)
        except _REDIS_DOWN as error:
            self._l2_failed(error)
            return found
        for i, key in enumerate(wanted):
            value, version = self._decode_l2(replies[2 * i], replies[2 * i + 1])
            if value is _ABSENT:
                self._l2_miss.inc()
                continue
            self._l2_hit.inc()
            self.l1.put(key, value, version)
            found[key] = value
        return found

    # --- writes -------------------------------------------------------------------------------

    async def put(self, key: str, value: T) -> None:
        """Cache ``value`` as the current one (write-through after a write that returned it)."""
        if self._redis is None:
            self.l1.put(key, value, self._local_version)
            return
        if not await self._l2_ready():
            return
        version_key, value_key = self._redis_keys(key)
        try:
            current = await self._redis.get(version_key)
            version = int(current or 0)
            stored = await self._cas(keys=[version_key, value_key], args=[version, self._payload(value, version),
                                                                           self._l2_ttl_ms])
        except _REDIS_DOWN as error:
            self._l2_failed(error)
            return
        if stored and self._subscribed.is_set():
            self.l1.put(key, value, version)

    async def invalidate(self, key: str) -> None:
        """Make every replica forget ``key``; call it after the write reached the store."""
        self._invalidated.inc()
        if self._redis is None:
            self._local_version += 1
            self.l1.tombstone(key, self._local_version)
            return
        if not await self._l2_ready():
            self._unflushed.add(key)
            return
        try:
            version = await self._bump([key])
            self.l1.tombstone(key, version)
            ack_key = f"cache-ack:{uuid.uuid4().hex}"
            receivers = await self._redis.publish(self._channel, f"{version}\n{ack_key}\n{key}")
            await self._await_acks(ack_key, int(receivers))
        except _REDIS_DOWN as error:
            # The write itself is in the store; Redis learns of it as soon as it answers again.
            self._unflushed.add(key)
            self._l2_failed(error)

    async def _bump(self, keys: Iterable[str]) -> int:
        """Raise each key's version and drop its Redis copy in one transaction; the last new version."""
        assert self._redis is not None
        keys = list(keys)
        # One key: one transaction. Several (after an outage): keys of different Redis Cluster slots
        # cannot share one, and each key's three commands stay safe without (see invalidate).
        async with self._redis.pipeline(transaction=len(keys) == 1) as pipe:
            for key in keys:
                version_key, value_key = self._redis_keys(key)
                pipe.incr(version_key)
                pipe.pexpire(version_key, self._version_ttl_ms())
                pipe.delete(value_key)
            replies = await pipe.execute()
        return int(replies[-3])

    async def _l2_ready(self) -> bool:
        """Whether to use Redis now: not while it is failing, and only once missed invalidations are in."""
        if not self._unflushed and self._l2_retry_at == 0.0:
            return True
        if time.monotonic() < self._l2_retry_at:
            return False
        try:
            if self._unflushed:
                keys = list(self._unflushed)
                await self._bump(keys)
                self._unflushed.difference_update(keys)
        except _REDIS_DOWN as error:
            self._l2_failed(error)
            return False
        self._l2_retry_at = 0.0
        return True

    def _l2_failed(self, error: BaseException) -> None:
        """Redis failed: serve from the store without caching until ``_L2_RETRY_SECONDS`` have passed."""
        now = time.monotonic()
        if now - self._l2_warned_at >= _L2_WARN_SECONDS:
            self._l2_warned_at = now
            log.warning("cache cannot reach Redis; reading from the store", extra={"fields": {
                "cache": self.name, "error": repr(error)}})
        self._l2_retry_at = now + _L2_RETRY_SECONDS
        # Invalidations from other replicas no longer arrive: nothing in L1 can be trusted.
        self.l1.clear()

    # --- internals ----------------------------------------------------------------------------

    async def _load(self, key: str, loader: Callable[[], Awaitable[T | None]]) -> T | None:
        if self._redis is None:
            version = self._local_version
            value = await loader()
            if value is not None:
                self.l1.put(key, value, version)
            return value
        if not await self._l2_ready():
            return await loader()
        try:
            cached, version, raw_version = await self._read_l2(key)
        except _REDIS_DOWN as error:
            self._l2_failed(error)
            return await loader()
        if cached is not _ABSENT:
            if self._subscribed.is_set():
                self.l1.put(key, cached, version)
            return cached  # type: ignore[no-any-return]  # decoded by our codec
        value = await loader()
        if value is not None:
            await self._write_back(key, value, version, raw_version)
        return value

    async def _write_back(self, key: str, value: T, version: int, raw_version: bytes) -> None:
        """Store a loaded value in Redis if its version still holds, and then in L1."""
        assert self._redis is not None
        version_key, value_key = self._redis_keys(key)
        try:
            stored = await self._cas(keys=[version_key, value_key],
                                     args=[raw_version, self._payload(value, version), self._l2_ttl_ms])
        except _REDIS_DOWN as error:
            self._l2_failed(error)
            return
        # Only a value Redis accepted under the current version is safe to keep in L1 as well, and
        # only while invalidation messages arrive.
        if stored and self._subscribed.is_set():
            self.l1.put(key, value, version)

    async def _read_l2(self, key: str) -> tuple[Any, int, bytes]:
        """(value or _ABSENT, current version, the version as Redis holds it) in one MGET."""
        assert self._redis is not None
        raw_version, raw_value = await self._redis.mget(self._redis_keys(key))
        value, version = self._decode_l2(raw_version, raw_value)
        if value is _ABSENT:
            self._l2_miss.inc()
        else:
            self._l2_hit.inc()
        return value, version, _as_bytes(raw_version or b"0")

    def _decode_l2(self, raw_version: bytes | str | None, raw_value: bytes | str | None) -> tuple[Any, int]:
        version = int(raw_version or 0)
        if raw_value is None:
            return _ABSENT, version
        stamp, _, data = _as_bytes(raw_value).partition(b":")
        # An entry loaded under an older version is dead: a write landed after its load began.
        if int(stamp) != version:
            return _ABSENT, version
        return self._codec.decode(data), version

    def _payload(self, value: T, version: int) -> bytes:
        return b"%d:%s" % (version, self._codec.encode(value))

    def _redis_keys(self, key: str) -> tuple[str, str]:
        # One hash tag per key: the version and the value land on the same Redis Cluster slot,
        # which MGET and the compare-and-set script need.
        tag = f"{{{self.name}:{key}}}"
        return f"cache:{tag}:v", f"cache:{tag}:d"

    def _version_ttl_ms(self) -> int:
        # A version must outlive every value stored under an older one, or a reset to 0 could
        # resurrect a value loaded under version 0 before the reset.
        return max(self._l2_ttl_ms * _VERSION_TTL_FACTOR, 3_600_000)

    async def _await_acks(self, ack_key: str, expected: int) -> None:
        """Wait until ``expected`` replicas acknowledged, at most ``ack_timeout`` seconds."""
        assert self._redis is not None
        deadline = time.monotonic() + self._ack_timeout
        acked = 0
        while acked < expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # BLPOP's timeout is in seconds with millisecond resolution; 0 would mean "forever".
            reply = await self._redis.blpop([ack_key], timeout=max(remaining, 0.001))
            if reply is None:
                break
            acked += 1
        if acked < expected:
            self._ack_timeouts.inc()
            log.warning(
                "invalidation not acknowledged by every replica",
                extra={"fields": {"cache": self.name, "acked": acked, "expected": expected}},
            )
        await self._redis.delete(ack_key)

    async def _listen(self) -> None:
        """Apply invalidation messages to L1 and acknowledge them; resubscribe after a drop."""
        assert self._redis is not None
        attempt = 0
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                # Messages sent while we were not subscribed are lost: forget everything instead.
                self.l1.clear()
                self._subscribed.set()
                attempt = 0
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self._apply(message["data"])
            except asyncio.CancelledError:
                raise
            except _REDIS_DOWN as error:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # redis-py turns a cancellation that interrupts a read into a ConnectionError:
                    # an outage would resubscribe, a close must stop (or close() waits forever).
                    raise asyncio.CancelledError from error
                self._subscribed.clear()
                self.l1.clear()
                delay = _RESUBSCRIBE_BACKOFF[min(attempt, len(_RESUBSCRIBE_BACKOFF) - 1)]
                attempt += 1
                log.warning("cache invalidation subscription lost; resubscribing",
                            extra={"fields": {"cache": self.name, "error": str(error), "retry_in": delay}})
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _apply(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        version, ack_key, key = text.split("\n", 2)
        self.l1.tombstone(key, int(version))
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(ack_key, 1)
            pipe.expire(ack_key, 10)
            await pipe.execute()
