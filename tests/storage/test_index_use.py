"""Queries are answered from indexes: a query no index answers fails instead of reading a collection.

Every test of the suite runs with ``FITTRACKER_STORE_REFUSE_SCANS=1`` (tests/conftest.py), so each
repository query a test exercises on the embedded store is checked against SQLite's EXPLAIN QUERY
PLAN. This file checks that check, and that the declared indexes exist on the MongoDB-wire server.
"""

from __future__ import annotations

import importlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.runtime.storage import CollectionSpec, DuplicateKeyError, EmbeddedStore, IndexSpec, MongoStore
from services.runtime.storage.embedded import ScanRefusedError, scans_documents

EVENTS = CollectionSpec(
    name="events",
    shard_key=("user_id",),
    why="test collection",
    indexes=(IndexSpec("user", (("user_id", 1),)), IndexSpec("due", (("due_at", 1),)),
             IndexSpec("user_time", (("owner", 1), ("at", -1)))),
)
#: Every module that declares collections; the wire-server test ensures all of them.
DECLARING_MODULES = (
    "services.user.repository", "services.user.tokens", "services.user.service",
    "services.workout.repository", "services.ai.repository", "services.notification.repository",
    "services.analytics.repository", "services.runtime.revocation", "services.runtime.counters",
    "services.runtime.events.outbox", "services.runtime.events.bus",
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def declared_collections() -> list[CollectionSpec]:
    """The CollectionSpecs the services declare."""
    found = {spec.name: spec for module in DECLARING_MODULES
             for spec in vars(importlib.import_module(module)).values() if isinstance(spec, CollectionSpec)}
    return sorted(found.values(), key=lambda spec: spec.name)


@pytest.fixture
async def strict(tmp_path: Path) -> EmbeddedStore:
    """An embedded store that refuses scans, holding a few events."""
    store = EmbeddedStore(tmp_path / "strict.sqlite3", refuse_scans=True)
    await store.ensure([EVENTS])
    events = store.collection(EVENTS)
    for i in range(20):
        await events.insert({"_id": f"e{i:02}", "user_id": f"u{i % 4}", "owner": f"u{i % 4}",
                             "due_at": T0 + timedelta(minutes=i), "at": i, "kind": i % 3})
    return store


async def test_indexed_equality_and_id_lookups_are_answered(strict: EmbeddedStore) -> None:
    events = strict.collection(EVENTS)

    assert [d["_id"] for d in await events.find({"user_id": "u1"})] == ["e01", "e05", "e09", "e13", "e17"]
    assert await events.count({"owner": "u2", "kind": 0}) == 2  # the compound index's first field
    assert [d["_id"] for d in await events.find({"_id": {"$in": ["e03", "e04"]}})] == ["e03", "e04"]


@pytest.mark.parametrize(("cond", "expected"), [
    ({"$lte": T0 + timedelta(minutes=2)}, ["e00", "e01", "e02"]),
    ({"$lt": T0 + timedelta(minutes=2)}, ["e00", "e01"]),
    ({"$gt": T0 + timedelta(minutes=17)}, ["e18", "e19"]),
    ({"$gte": T0 + timedelta(minutes=17), "$lt": T0 + timedelta(minutes=19)}, ["e17", "e18"]),
])
async def test_a_date_range_on_an_index_is_answered_from_it(
    strict: EmbeddedStore, cond: dict[str, datetime], expected: list[str]
) -> None:
    events = strict.collection(EVENTS)

    found = await events.find({"due_at": cond}, sort=[("due_at", 1)])

    assert [d["_id"] for d in found] == expected


@pytest.mark.parametrize("flt", [
    {"kind": 1},  # no index on the field
    {},  # everything
    {"at": {"$gt": 3}},  # only the second field of a compound index
    {"user_id": {"$ne": "u1"}},  # an index, but no equality or range it can answer
    {"$or": [{"user_id": "u1"}, {"kind": 1}]},
])
async def test_a_query_no_index_answers_is_refused_with_the_plan(strict: EmbeddedStore, flt: dict[str, object]) -> None:
    events = strict.collection(EVENTS)

    with pytest.raises(ScanRefusedError, match="no index answers the query on events") as refused:
        await events.find(flt)

    assert any(scans_documents(line) for line in refused.value.plan)
    with pytest.raises(ScanRefusedError):
        await events.count(flt)


async def test_writes_that_select_without_an_index_are_refused_too(strict: EmbeddedStore) -> None:
    events = strict.collection(EVENTS)

    with pytest.raises(ScanRefusedError):
        await events.update_many({"kind": 2}, {"$set": {"kind": 5}})
    with pytest.raises(ScanRefusedError):
        await events.delete_many({"kind": 2})
    assert await events.count({"user_id": "u2"}) == 5  # nothing was changed


async def test_a_store_that_allows_scans_answers_the_same_query(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "lax.sqlite3", refuse_scans=False)
    events = store.collection(EVENTS)
    await events.insert({"_id": "a", "kind": 1})

    assert [d["_id"] for d in await events.find({"kind": 1})] == ["a"]


@pytest.mark.mongo
async def test_every_declared_index_exists_on_the_wire_server_and_ids_are_pushed_down(mongo_url: str) -> None:
    # What the wire server can show. MongoDB's planner picks among the declared indexes; FerretDB
    # 1.24 on SQLite creates them but pushes only _id filters down to SQL, and its explain shows
    # SQLite's SCAN even then, so a plan check there would fail every query (README: data scale).
    database = f"indexes_{uuid.uuid4().hex[:12]}"
    store = MongoStore(mongo_url, database)
    specs = declared_collections()
    try:
        await store.ensure(specs)
        for spec in specs:
            raw = store.raw(spec.name)
            listed = {index["name"]: list(index["key"].items()) async for index in await raw.list_indexes()}
            for index in spec.indexes:
                assert listed.get(index.name) == [(k, d) for k, d in index.keys], (spec.name, index.name)
            plan = await raw.database.command({"explain": {"find": spec.name, "filter": {"_id": "x"}}})
            assert plan["filterPushdown"] is True, (spec.name, plan)
    finally:
        await store.raw("unused").database.client.drop_database(database)
        await store.close()


async def test_a_bulk_insert_keeps_every_index(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "bulk.sqlite3", refuse_scans=True)
    await store.ensure([EVENTS])
    events = store.collection(EVENTS)

    await events.insert_many([{"_id": f"b{i}", "user_id": f"u{i % 2}", "owner": "o", "at": i,
                               "due_at": T0 + timedelta(hours=i)} for i in range(6)])

    assert [d["_id"] for d in await events.find({"user_id": "u1"})] == ["b1", "b3", "b5"]
    assert [d["_id"] for d in await events.find({"due_at": {"$gte": T0 + timedelta(hours=4)}})] == ["b4", "b5"]
    with pytest.raises(DuplicateKeyError) as clash:
        await events.insert_many([{"_id": "b9"}, {"_id": "b0"}])
    assert clash.value.index == "_id_"
    assert await events.get("b9") is None  # the batch is one transaction
