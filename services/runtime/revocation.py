"""Access tokens that stop counting before they expire: ended sessions and deleted accounts.

Access tokens are stateless ES256 JWTs; on their own they would stay valid for their whole lifetime
after a logout, a refresh-token reuse or an account deletion. The user service records each such
event here as a revocation of a session id (the token's ``sid``) or of a user id (every token of a
deleted account). Every replica of every service keeps the live revocations in memory, so the check
on a call is two set lookups, and polls the shared log for new ones every ``poll_seconds``: a
revocation reaches every replica within ``poll_seconds`` plus one round trip (the stated bound).

The shared log is Redis when configured (a sorted set scored by revocation time), else a document
store that all services of the deployment share (the embedded store's ``auth`` file on one machine,
or the MongoDB database). A revocation is kept for the access-token lifetime plus clock slack: by
then every token it could void has expired on its own.

When the log cannot be read a replica keeps its last view and retries (fail open: refusing every
call because Redis blinked would cost more availability than a few seconds of staleness costs
security); ``fittracker_revocations_view_age_seconds`` shows how stale the view is, for alerting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Protocol

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge

from services.runtime.auth import Principal
from services.runtime.storage import CollectionSpec, DocumentStore, IndexSpec

log = logging.getLogger("fittracker.revocation")

#: How far back each poll looks again: revocations written by another process commit in any order
#: within this window, and writers' clocks may differ by this much.
POLL_OVERLAP_SECONDS = 5.0
#: Tokens are accepted up to this much past their ``exp`` by verifiers (JWT clock skew).
CLOCK_SLACK_SECONDS = 60.0
#: Expired entries are dropped from the in-memory view this often (a scan of the whole view).
FORGET_EVERY_SECONDS = 30.0
REDIS_KEY = "fittracker:revocations"
SESSION_PREFIX = "session:"
USER_PREFIX = "user:"

REVOCATIONS = CollectionSpec(
    name="revocations",
    shard_key=("_id",),
    why="replicas poll by revocation time (a small range: the last few seconds); writes address one key",
    indexes=(
        IndexSpec("revoked_at", (("revoked_at", 1),)),
        IndexSpec("expires_ttl", (("expires_at", 1),), expire_after_seconds=0),
    ),
)


class RevocationLog(Protocol):
    """Where revocations are written once and read by every replica."""

    async def ensure(self) -> None:
        """Prepare storage (indexes); idempotent."""
        ...

    async def add(self, key: str, revoked_at: float, keep_seconds: float) -> None:
        """Record ``key`` as revoked at ``revoked_at`` (epoch seconds), kept ``keep_seconds``."""
        ...

    async def since(self, after: float) -> list[tuple[str, float]]:
        """Every live revocation with a revocation time after ``after``, as (key, revoked_at)."""
        ...


class RedisRevocationLog:
    """Revocations in one Redis sorted set, member = key, score = revocation time."""

    def __init__(self, redis: aioredis.Redis) -> None:
        """Use ``redis``."""
        self._redis = redis

    async def ensure(self) -> None:
        """Nothing to prepare."""

    async def add(self, key: str, revoked_at: float, keep_seconds: float) -> None:
        """ZADD, and drop what nobody needs any more in the same round trip."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(REDIS_KEY, {key: revoked_at})
            pipe.zremrangebyscore(REDIS_KEY, "-inf", revoked_at - keep_seconds)
            await pipe.execute()

    async def since(self, after: float) -> list[tuple[str, float]]:
        """ZRANGEBYSCORE (after, +inf]."""
        found = await self._redis.zrangebyscore(REDIS_KEY, f"({after}", "+inf", withscores=True)
        return [(_text(entry[0]), float(entry[1])) for entry in found]


def _text(member: object) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)


class StoreRevocationLog:
    """Revocations as documents, for a deployment without Redis."""

    def __init__(self, store: DocumentStore) -> None:
        """Keep revocations in ``store``'s ``revocations`` collection."""
        self._store = store
        self._col = store.collection(REVOCATIONS)

    async def ensure(self) -> None:
        """Create the indexes."""
        await self._store.ensure([REVOCATIONS])

    async def add(self, key: str, revoked_at: float, keep_seconds: float) -> None:
        """Upsert: revoking twice keeps the first time (the later one changes nothing)."""
        expires = datetime.fromtimestamp(revoked_at + keep_seconds, UTC)
        # A date rather than epoch seconds: a date range is what both stores answer from the index.
        # Millisecond precision loses nothing that matters: tokens carry whole-second issue times.
        await self._col.update_one(
            {"_id": key},
            {"$setOnInsert": {"revoked_at": datetime.fromtimestamp(revoked_at, UTC), "expires_at": expires}},
            upsert=True,
        )

    async def since(self, after: float) -> list[tuple[str, float]]:
        """An index range on revoked_at."""
        docs = await self._col.find({"revoked_at": {"$gt": datetime.fromtimestamp(after, UTC)}})
        return [(str(d["_id"]), d["revoked_at"].timestamp()) for d in docs]


class Revocations:
    """One replica's view of the revoked sessions and users, kept fresh by ``poll``."""

    def __init__(
        self,
        revocation_log: RevocationLog,
        *,
        token_ttl_seconds: float,
        poll_seconds: float,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Read ``revocation_log``; keep entries ``token_ttl_seconds`` (+ slack) after they were made."""
        self._log = revocation_log
        self._keep = token_ttl_seconds + CLOCK_SLACK_SECONDS
        self._poll_seconds = poll_seconds
        self._sessions: dict[str, float] = {}
        self._users: dict[str, float] = {}
        self._cursor = 0.0
        self._fresh_at = 0.0
        self._forgot_at = 0.0
        age = Gauge(
            "fittracker_revocations_view_age_seconds",
            "Seconds since this replica last read the revocation log.",
            registry=registry,
        ) if registry is not None else None
        if age is not None:
            age.set_function(lambda: time.time() - self._fresh_at if self._fresh_at else float("inf"))

    @property
    def poll_seconds(self) -> float:
        """How often the view is refreshed: the bound on how late a replica learns a revocation."""
        return self._poll_seconds

    def is_revoked(self, principal: Principal) -> bool:
        """Whether ``principal``'s token belongs to an ended session or a deleted account."""
        return principal.session_id in self._sessions or principal.user_id in self._users

    async def revoke_session(self, session_id: str) -> None:
        """End every access token of one login session."""
        await self._record(SESSION_PREFIX + session_id)

    async def revoke_user(self, user_id: str) -> None:
        """End every access token of one account (it is being deleted)."""
        await self._record(USER_PREFIX + user_id)

    async def _record(self, key: str) -> None:
        now = time.time()
        await self._log.add(key, now, self._keep)
        self._learn([(key, now)])  # this replica knows at once; the others at their next poll

    async def ensure(self) -> None:
        """Prepare the log's storage."""
        await self._log.ensure()

    async def refresh(self) -> None:
        """Read what was revoked since the last refresh (all live entries the first time)."""
        now = time.time()
        after = max(self._cursor - POLL_OVERLAP_SECONDS, now - self._keep)
        found = await self._log.since(after)
        self._learn(found)
        self._cursor = max([self._cursor, *(at for _, at in found)]) or now
        self._fresh_at = now
        if now - self._forgot_at > FORGET_EVERY_SECONDS:
            self._forget(now - self._keep)
            self._forgot_at = now

    async def poll(self) -> None:
        """Background job: refresh every ``poll_seconds``, keeping the last view when the log is down."""
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("revocation log unreadable; keeping the last view", exc_info=True)

    def _learn(self, found: list[tuple[str, float]]) -> None:
        for key, at in found:
            if key.startswith(SESSION_PREFIX):
                self._sessions[key[len(SESSION_PREFIX):]] = at
            elif key.startswith(USER_PREFIX):
                self._users[key[len(USER_PREFIX):]] = at

    def _forget(self, before: float) -> None:
        for entries in (self._sessions, self._users):
            for key in [k for k, at in entries.items() if at < before]:
                del entries[key]
