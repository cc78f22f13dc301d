"""Session revocations: written once, seen by every replica's view after its next refresh.

Each backend runs for real: Redis, the embedded store shared through a file, and MongoDB (FerretDB).
Two ``Revocations`` objects stand for two replicas; only the shared log connects them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from services.runtime.auth import Principal
from services.runtime.revocation import RedisRevocationLog, RevocationLog, Revocations, StoreRevocationLog
from services.runtime.storage import EmbeddedStore, MongoStore

LOGS = ("redis", "embedded", "mongo")


@pytest_asyncio.fixture(params=LOGS)
async def two_logs(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[RevocationLog, RevocationLog]]:
    """Two connections to one shared revocation log, as two replicas would hold."""
    kind = request.param
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        first, second = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
        yield RedisRevocationLog(first), RedisRevocationLog(second)
        await first.aclose()
        await second.aclose()
    elif kind == "embedded":
        stores = [EmbeddedStore(tmp_path / "auth.sqlite3"), EmbeddedStore(tmp_path / "auth.sqlite3")]
        yield StoreRevocationLog(stores[0]), StoreRevocationLog(stores[1])
        for store in stores:
            await store.close()
    else:
        url, database = request.getfixturevalue("mongo_url"), f"revocations_{uuid.uuid4().hex[:8]}"
        stores_m = [MongoStore(url, database), MongoStore(url, database)]
        yield StoreRevocationLog(stores_m[0]), StoreRevocationLog(stores_m[1])
        for store_m in stores_m:
            await store_m.close()


def _principal(user_id: str, session_id: str) -> Principal:
    return Principal(user_id=user_id, role="member", session_id=session_id, token_id=uuid.uuid4().hex)


async def test_a_revocation_reaches_another_replica_at_its_next_refresh(
    two_logs: tuple[RevocationLog, RevocationLog],
) -> None:
    writer = Revocations(two_logs[0], token_ttl_seconds=900, poll_seconds=1)
    reader = Revocations(two_logs[1], token_ttl_seconds=900, poll_seconds=1)
    await writer.ensure()
    await reader.refresh()
    ended, live = _principal("u1", uuid.uuid4().hex), _principal("u1", uuid.uuid4().hex)
    deleted = _principal(uuid.uuid4().hex, uuid.uuid4().hex)

    await writer.revoke_session(ended.session_id)
    await writer.revoke_user(deleted.user_id)
    assert writer.is_revoked(ended) and writer.is_revoked(deleted), "the writing replica knows at once"
    assert not reader.is_revoked(ended), "the other replica has not refreshed yet"

    await reader.refresh()
    assert reader.is_revoked(ended)
    assert reader.is_revoked(deleted)
    assert not reader.is_revoked(live), "another session of the same user is untouched"


async def test_a_replica_started_later_loads_every_live_revocation(
    two_logs: tuple[RevocationLog, RevocationLog],
) -> None:
    writer = Revocations(two_logs[0], token_ttl_seconds=900, poll_seconds=1)
    await writer.ensure()
    ended = _principal("u2", uuid.uuid4().hex)
    await writer.revoke_session(ended.session_id)
    await writer.revoke_session(ended.session_id)  # revoking twice is harmless

    late = Revocations(two_logs[1], token_ttl_seconds=900, poll_seconds=1)
    await late.refresh()
    assert late.is_revoked(ended)
