"""The document-store contract (services/runtime/storage/base.py), run against every store.

Each test gets an empty store of each kind from the ``store`` fixture: the embedded SQLite store in
a temporary directory, and MongoStore on the real FerretDB server of this session.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.runtime.storage import (
    Collection,
    CollectionSpec,
    Document,
    DocumentStore,
    DuplicateKeyError,
    EmbeddedStore,
    IndexSpec,
    MongoStore,
    open_store,
)

PEOPLE = CollectionSpec(
    name="people",
    shard_key=("_id",),
    why="test collection; every lookup is by _id or email",
    indexes=(
        IndexSpec("email_unique", (("email", 1),), unique=True),
        IndexSpec("team_age", (("team", 1), ("age", -1))),
        IndexSpec("tags_1", (("tags", 1),)),
    ),
)
SESSIONS = CollectionSpec(
    name="sessions",
    shard_key=("_id",),
    why="test collection with a TTL index",
    indexes=(IndexSpec("expires_ttl", (("expires_at", 1),), expire_after_seconds=60),),
)
COUNTERS = CollectionSpec(name="counters", shard_key=("_id",), why="test collection for $inc")

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


async def people(store: DocumentStore) -> Collection:
    await store.ensure([PEOPLE])
    return store.collection(PEOPLE)


def person(doc_id: str, **fields: Any) -> Document:
    return {"_id": doc_id, "email": f"{doc_id}@example.test", **fields}


async def ids(coll: Collection, flt: dict[str, Any], **kwargs: Any) -> list[str]:
    return [doc["_id"] for doc in await coll.find(flt, **kwargs)]


# -- insert and get ----------------------------------------------------------------------------------


async def test_insert_get_round_trips_nested_documents_lists_and_datetimes(store: DocumentStore) -> None:
    coll = await people(store)
    doc = person(
        "ana",
        name="Ana Ñandú",
        age=31,
        weight_kg=61.5,
        active=True,
        nickname=None,
        tags=["runner", "lifter"],
        profile={"city": "Oslo", "goals": {"weekly_sessions": 4, "targets": [5.0, 10]}},
        sets=[{"reps": 5, "at": T0}, {"reps": 3, "at": T0 + timedelta(minutes=3)}],
        created_at=datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
    )
    await coll.insert(doc)

    got = await coll.get("ana")

    # BSON keeps milliseconds; the embedded store does the same so both read back alike.
    expected = {**doc, "created_at": datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)}
    assert got == expected
    assert got is not None
    assert got["created_at"].tzinfo is not None and got["created_at"].utcoffset() == timedelta(0)
    assert got["sets"][1]["at"] == T0 + timedelta(minutes=3)
    assert isinstance(got["weight_kg"], float) and isinstance(got["age"], int) and got["active"] is True
    assert await coll.get("nobody") is None


async def test_returned_documents_are_copies(store: DocumentStore) -> None:
    coll = await people(store)
    doc = person("ana", tags=["a"])
    await coll.insert(doc)
    doc["tags"].append("changed after insert")
    got = await coll.get("ana")
    assert got is not None and got["tags"] == ["a"]
    got["tags"].append("changed after get")
    assert (await coll.get("ana")) == person("ana", tags=["a"])


async def test_non_utc_datetimes_come_back_in_utc(store: DocumentStore) -> None:
    coll = await people(store)
    oslo_summer = datetime(2025, 6, 1, 14, 0, tzinfo=UTC).astimezone(ZoneInfo("Europe/Oslo"))
    await coll.insert(person("ana", at=oslo_summer))
    got = await coll.get("ana")
    assert got is not None
    assert got["at"] == datetime(2025, 6, 1, 14, 0, tzinfo=UTC)
    assert got["at"].utcoffset() == timedelta(0)


# -- unique keys ----------------------------------------------------------------------------------


async def test_duplicate_id_is_refused_with_the_id_index(store: DocumentStore) -> None:
    coll = await people(store)
    await coll.insert(person("ana", age=31))
    with pytest.raises(DuplicateKeyError) as err:
        await coll.insert({"_id": "ana", "email": "other@example.test"})
    assert err.value.index == "_id_"
    assert err.value.collection == "people"
    assert await coll.get("ana") == person("ana", age=31)
    assert await coll.count({}) == 1


async def test_duplicate_unique_field_is_refused_with_its_index_name(store: DocumentStore) -> None:
    coll = await people(store)
    await coll.insert(person("ana"))
    with pytest.raises(DuplicateKeyError) as err:
        await coll.insert({"_id": "bob", "email": "ana@example.test"})
    assert err.value.index == "email_unique"
    assert await coll.get("bob") is None


async def test_update_onto_a_taken_unique_key_is_refused_and_changes_nothing(store: DocumentStore) -> None:
    coll = await people(store)
    await coll.insert(person("ana"))
    await coll.insert(person("bob", age=40))
    with pytest.raises(DuplicateKeyError) as err:
        await coll.update_one({"_id": "bob"}, {"$set": {"email": "ana@example.test", "age": 41}})
    assert err.value.index == "email_unique"
    assert await coll.get("bob") == person("bob", age=40)


async def test_upsert_clashes_name_the_index(store: DocumentStore) -> None:
    coll = await people(store)
    await coll.insert(person("ana"))
    with pytest.raises(DuplicateKeyError) as by_email:
        await coll.update_one({"_id": "bob"}, {"$set": {"email": "ana@example.test"}}, upsert=True)
    assert by_email.value.index == "email_unique"
    # The filter does not match ana, so the upsert tries to insert a second "ana".
    with pytest.raises(DuplicateKeyError) as by_id:
        await coll.update_one(
            {"_id": "ana", "age": 99}, {"$setOnInsert": {"email": "new@example.test"}}, upsert=True
        )
    assert by_id.value.index == "_id_"
    assert await coll.count({}) == 1


async def test_update_many_onto_one_unique_key_is_refused(store: DocumentStore) -> None:
    coll = await people(store)
    await coll.insert(person("ana", team="red"))
    await coll.insert(person("bob", team="red"))
    with pytest.raises(DuplicateKeyError) as err:
        await coll.update_many({"team": "red"}, {"$set": {"email": "same@example.test"}})
    assert err.value.index == "email_unique"


async def test_a_freed_unique_key_can_be_taken_again(store: DocumentStore) -> None:
    coll = await people(store)
    await coll.insert(person("ana"))
    await coll.update_one({"_id": "ana"}, {"$set": {"email": "ana2@example.test"}})
    await coll.insert({"_id": "bob", "email": "ana@example.test"})
    assert await coll.delete_one({"_id": "bob"})
    await coll.insert({"_id": "cid", "email": "ana@example.test"})
    assert (await coll.find_one({"email": "ana@example.test"})) == {"_id": "cid", "email": "ana@example.test"}


# -- filters --------------------------------------------------------------------------------------

ROSTER = [
    person(
        "ana",
        team="red",
        age=31,
        score=10.0,
        active=True,
        nickname="Speedy",
        tags=["runner", "lifter"],
        profile={"city": "Oslo", "country": "NO"},
        sets=[{"reps": 5}, {"reps": 3}],
        joined=T0,
    ),
    person(
        "bob",
        team="blue",
        age=45,
        score=7,
        active=False,
        nickname=None,
        tags=["lifter"],
        profile={"city": "Bergen", "country": "NO"},
        sets=[{"reps": 8}],
        joined=T0 + timedelta(days=10),
    ),
    person(
        "cid",
        team="red",
        age=22,
        score=10,
        active=True,
        tags=[],
        profile={"city": "Lund", "country": "SE"},
        sets=[],
        joined=T0 - timedelta(days=10),
    ),
    person("dag", team="green", age=31, score=3.5, active=1, tags=["swimmer"], profile={"city": "Oslo"}),
    person("eve", age=58, nickname="speedy gonzales"),
]

FILTER_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("everything", {}, ["ana", "bob", "cid", "dag", "eve"]),
    ("equality", {"team": "red"}, ["ana", "cid"]),
    ("id equality", {"_id": "bob"}, ["bob"]),
    ("two fields", {"team": "red", "age": 22}, ["cid"]),
    ("dotted path", {"profile.city": "Oslo"}, ["ana", "dag"]),
    ("dotted path through an array of documents", {"sets.reps": 3}, ["ana"]),
    ("list membership", {"tags": "lifter"}, ["ana", "bob"]),
    ("whole list", {"tags": ["lifter"]}, ["bob"]),
    ("int equals float", {"score": 10}, ["ana", "cid"]),
    ("bool is not a number", {"active": True}, ["ana", "cid"]),
    ("number is not a bool", {"active": 1}, ["dag"]),
    ("null matches null and missing", {"nickname": None}, ["bob", "cid", "dag"]),
    ("$eq", {"age": {"$eq": 31}}, ["ana", "dag"]),
    ("$ne includes missing fields", {"team": {"$ne": "red"}}, ["bob", "dag", "eve"]),
    ("$ne on a list", {"tags": {"$ne": "lifter"}}, ["cid", "dag", "eve"]),
    ("$gt", {"age": {"$gt": 31}}, ["bob", "eve"]),
    ("$gte", {"age": {"$gte": 31}}, ["ana", "bob", "dag", "eve"]),
    ("$lt", {"age": {"$lt": 31}}, ["cid"]),
    ("$lte", {"age": {"$lte": 31}}, ["ana", "cid", "dag"]),
    ("range", {"age": {"$gte": 25, "$lt": 50}}, ["ana", "bob", "dag"]),
    ("range over floats and ints", {"score": {"$gt": 5, "$lte": 10}}, ["ana", "bob", "cid"]),
    ("datetime range", {"joined": {"$gte": T0, "$lt": T0 + timedelta(days=30)}}, ["ana", "bob"]),
    ("string comparison", {"team": {"$lt": "green"}}, ["bob"]),
    ("comparisons stay within a type", {"age": {"$gt": "30"}}, []),
    ("$in", {"team": {"$in": ["blue", "green"]}}, ["bob", "dag"]),
    ("$in on ids", {"_id": {"$in": ["eve", "ana", "zed"]}}, ["ana", "eve"]),
    ("$in on a list field", {"tags": {"$in": ["swimmer", "runner"]}}, ["ana", "dag"]),
    ("$in with null", {"team": {"$in": [None, "blue"]}}, ["bob", "eve"]),
    ("$nin", {"team": {"$nin": ["red", "blue"]}}, ["dag", "eve"]),
    ("$exists true", {"nickname": {"$exists": True}}, ["ana", "bob", "eve"]),
    ("$exists false", {"team": {"$exists": False}}, ["eve"]),
    ("$exists on a dotted path", {"profile.country": {"$exists": True}}, ["ana", "bob", "cid"]),
    ("$regex", {"nickname": {"$regex": "^Speedy"}}, ["ana"]),
    ("$regex case-insensitive", {"nickname": {"$regex": "^speedy", "$options": "i"}}, ["ana", "eve"]),
    ("$regex on a list", {"tags": {"$regex": "^swim"}}, ["dag"]),
    ("$or", {"$or": [{"team": "blue"}, {"age": {"$gt": 50}}]}, ["bob", "eve"]),
    ("$and", {"$and": [{"team": "red"}, {"tags": "runner"}]}, ["ana"]),
    (
        "$or inside $and with a field",
        {"profile.country": "NO", "$and": [{"$or": [{"age": 31}, {"age": 45}]}]},
        ["ana", "bob"],
    ),
    ("no match", {"team": "purple"}, []),
]


@pytest.mark.parametrize(("flt", "expected"), [c[1:] for c in FILTER_CASES], ids=[c[0] for c in FILTER_CASES])
async def test_filter(store: DocumentStore, flt: dict[str, Any], expected: list[str]) -> None:
    coll = await people(store)
    for doc in ROSTER:
        await coll.insert(doc)

    assert await ids(coll, flt) == expected
    assert await coll.count(flt) == len(expected)
    first = await coll.find_one(flt)
    if expected:
        assert first is not None and first["_id"] in expected
    else:
        assert first is None


# -- find: sort, limit, skip ----------------------------------------------------------------------


async def test_find_sorts_by_several_keys_with_id_breaking_ties(store: DocumentStore) -> None:
    coll = await people(store)
    for doc in reversed(ROSTER):  # insertion order must not leak into the result order
        await coll.insert(doc)

    assert await ids(coll, {}, sort=[("age", -1)]) == ["eve", "bob", "ana", "dag", "cid"]
    assert await ids(coll, {}, sort=[("age", 1)]) == ["cid", "ana", "dag", "bob", "eve"]
    # eve has no team: missing sorts first ascending, like null.
    assert await ids(coll, {}, sort=[("team", 1), ("age", -1)]) == ["eve", "bob", "dag", "ana", "cid"]
    assert await ids(coll, {}, sort=[("team", -1), ("age", 1)]) == ["cid", "ana", "dag", "bob", "eve"]
    assert await ids(coll, {}, sort=[("profile.city", 1)]) == ["eve", "bob", "cid", "ana", "dag"]
    assert await ids(coll, {}, sort=[("_id", -1)]) == ["eve", "dag", "cid", "bob", "ana"]
    assert await ids(coll, {}) == ["ana", "bob", "cid", "dag", "eve"]


async def test_find_pages_with_skip_and_limit(store: DocumentStore) -> None:
    coll = await people(store)
    for i in range(25):
        # Only three distinct sort values, so the page boundaries depend on the _id tiebreak.
        await coll.insert(person(f"p{i:02d}", age=i % 3))
    expected = sorted((f"p{i:02d}" for i in range(25)), key=lambda d: (-(int(d[1:]) % 3), d))

    pages = [await ids(coll, {}, sort=[("age", -1)], skip=skip, limit=10) for skip in (0, 10, 20)]

    assert pages[0] == expected[:10]
    assert pages[1] == expected[10:20]
    assert pages[2] == expected[20:]
    assert await ids(coll, {"age": 1}, limit=3) == ["p01", "p04", "p07"]
    assert await ids(coll, {"age": 1}, skip=7) == ["p22"]
    assert await ids(coll, {}, skip=30) == []


async def test_count(store: DocumentStore) -> None:
    coll = await people(store)
    assert await coll.count({}) == 0
    for doc in ROSTER:
        await coll.insert(doc)
    assert await coll.count({}) == 5
    assert await coll.count({"profile.country": "NO"}) == 2


# -- updates --------------------------------------------------------------------------------------


async def test_update_one_applies_each_operator_and_returns_the_document_after(store: DocumentStore) -> None:
    coll = await people(store)
    await coll.insert(person("ana", age=31, tags=["runner", "lifter", "runner"], profile={"city": "Oslo"}))

    after_set = await coll.update_one(
        {"_id": "ana"}, {"$set": {"age": 32, "profile.goals.weekly": 4, "seen_at": T0}}
    )
    assert after_set == person(
        "ana",
        age=32,
        tags=["runner", "lifter", "runner"],
        profile={"city": "Oslo", "goals": {"weekly": 4}},
        seen_at=T0,
    )
    after_unset = await coll.update_one({"_id": "ana"}, {"$unset": {"profile.city": "", "nothing.here": ""}})
    assert after_unset is not None and after_unset["profile"] == {"goals": {"weekly": 4}}
    after_inc = await coll.update_one(
        {"email": "ana@example.test"}, {"$inc": {"age": 1, "visits": 2, "kg": 0.5}}
    )
    assert after_inc is not None
    assert (after_inc["age"], after_inc["visits"], after_inc["kg"]) == (33, 2, 0.5)
    after_push = await coll.update_one({"_id": "ana"}, {"$push": {"tags": "swimmer", "log": {"at": T0}}})
    assert after_push is not None
    assert after_push["tags"] == ["runner", "lifter", "runner", "swimmer"]
    assert after_push["log"] == [{"at": T0}]
    after_pull = await coll.update_one({"_id": "ana"}, {"$pull": {"tags": "runner"}})
    assert after_pull is not None and after_pull["tags"] == ["lifter", "swimmer"]
    after_many = await coll.update_one(
        {"_id": "ana"}, {"$set": {"team": "red"}, "$inc": {"age": -3}, "$setOnInsert": {"ignored": True}}
    )
    assert after_many is not None and (after_many["team"], after_many["age"]) == ("red", 30)
    assert "ignored" not in after_many

    assert await coll.get("ana") == after_many


async def test_update_one_without_a_match_returns_none_and_creates_nothing(store: DocumentStore) -> None:
    coll = await people(store)
    await coll.insert(person("ana", age=31))
    assert await coll.update_one({"_id": "bob"}, {"$set": {"age": 1}}) is None
    assert await coll.update_one({"_id": "ana", "age": 99}, {"$set": {"age": 1}}) is None
    assert await ids(coll, {}) == ["ana"]
    assert await coll.get("ana") == person("ana", age=31)


async def test_upsert_seeds_from_the_filter_and_set_on_insert_only_once(store: DocumentStore) -> None:
    coll = await people(store)
    update = {"$setOnInsert": {"email": "ana@example.test", "created_at": T0}, "$inc": {"logins": 1}}

    created = await coll.update_one({"_id": "ana", "team": "red"}, update, upsert=True)
    assert created == {
        "_id": "ana",
        "team": "red",
        "email": "ana@example.test",
        "created_at": T0,
        "logins": 1,
    }

    later = {**update, "$setOnInsert": {"email": "ana@example.test", "created_at": T0 + timedelta(days=1)}}
    again = await coll.update_one({"_id": "ana", "team": "red"}, later, upsert=True)
    assert again == {**created, "logins": 2}
    assert await coll.count({}) == 1


async def test_upsert_without_an_id_in_the_filter_gets_a_string_id(store: DocumentStore) -> None:
    coll = await people(store)
    created = await coll.update_one({"email": "x@example.test"}, {"$set": {"age": 5}}, upsert=True)
    assert created is not None
    assert isinstance(created["_id"], str) and created["_id"]
    assert (created["email"], created["age"]) == ("x@example.test", 5)
    assert await coll.get(created["_id"]) == created


async def test_update_many_updates_every_match_and_counts_them(store: DocumentStore) -> None:
    coll = await people(store)
    for doc in ROSTER:
        await coll.insert(doc)

    assert (
        await coll.update_many({"profile.country": "NO"}, {"$inc": {"age": 1}, "$set": {"nordic": True}}) == 2
    )
    assert await coll.update_many({"team": "purple"}, {"$set": {"x": 1}}) == 0

    assert [(d["_id"], d["age"]) for d in await coll.find({"nordic": True})] == [("ana", 32), ("bob", 46)]
    assert (await coll.get("cid") or {}).get("nordic") is None
    assert (await coll.get("cid") or {})["age"] == 22


async def test_delete_one_and_delete_many(store: DocumentStore) -> None:
    coll = await people(store)
    for doc in ROSTER:
        await coll.insert(doc)

    assert await coll.delete_one({"_id": "ana"}) is True
    assert await coll.delete_one({"_id": "ana"}) is False
    assert await coll.get("ana") is None
    assert await coll.delete_many({"age": {"$gte": 40}}) == 2
    assert await coll.delete_many({"age": {"$gte": 40}}) == 0
    assert await ids(coll, {}) == ["cid", "dag"]


# -- indexes and TTL ------------------------------------------------------------------------------


async def test_ensure_is_idempotent(store: DocumentStore) -> None:
    await store.ensure([PEOPLE, SESSIONS])
    coll = store.collection(PEOPLE)
    await coll.insert(person("ana"))
    await store.ensure([PEOPLE, SESSIONS])
    await store.ensure([PEOPLE])

    with pytest.raises(DuplicateKeyError) as err:
        await coll.insert({"_id": "bob", "email": "ana@example.test"})
    assert err.value.index == "email_unique"
    assert await ids(coll, {}) == ["ana"]
    if isinstance(store, MongoStore):
        names = [index["name"] async for index in await store.raw("people").list_indexes()]
        assert sorted(names) == ["_id_", "email_unique", "tags_1", "team_age"]


async def test_ensure_builds_indexes_over_existing_documents(store: DocumentStore) -> None:
    coll = store.collection(PEOPLE)  # written to before ensure(), as on a first deployment
    await coll.insert(person("ana", tags=["runner"]))
    await coll.insert(person("bob", tags=["lifter", "runner"]))
    await store.ensure([PEOPLE])

    assert await ids(coll, {"tags": "runner"}) == ["ana", "bob"]
    assert await ids(coll, {"email": "bob@example.test"}) == ["bob"]
    with pytest.raises(DuplicateKeyError):
        await coll.insert({"_id": "cid", "email": "bob@example.test"})


async def test_expired_documents_are_invisible_at_once(store: DocumentStore) -> None:
    await store.ensure([SESSIONS])
    coll = store.collection(SESSIONS)
    now = datetime.now(UTC)
    await coll.insert({"_id": "old", "user": "ana", "expires_at": now - timedelta(hours=1)})
    await coll.insert({"_id": "new", "user": "ana", "expires_at": now})
    await coll.insert({"_id": "forever", "user": "ana"})

    assert await coll.get("old") is None
    assert await ids(coll, {"user": "ana"}) == ["forever", "new"]
    assert await coll.count({}) == 2
    assert await coll.find_one({"_id": "old"}) is None
    assert await coll.update_one({"_id": "old"}, {"$set": {"x": 1}}) is None
    assert await coll.delete_one({"_id": "old"}) is False
    # An upsert of the expired id starts a fresh document instead of clashing with the dead one.
    fresh = await coll.update_one(
        {"_id": "old"}, {"$setOnInsert": {"user": "bob", "expires_at": now}}, upsert=True
    )
    assert fresh == {
        "_id": "old",
        "user": "bob",
        "expires_at": now.replace(microsecond=now.microsecond // 1000 * 1000),
    }
    assert await ids(coll, {}) == ["forever", "new", "old"]


@pytest.mark.mongo
async def test_mongo_ttl_index_is_declared_on_the_server(mongo_url: str) -> None:
    store = MongoStore(mongo_url, f"ttl_{uuid.uuid4().hex[:12]}")
    sessions = store.raw("sessions")
    try:
        await store.ensure([SESSIONS])
        indexes = {index["name"]: index async for index in await sessions.list_indexes()}
        assert dict(indexes["expires_ttl"]["key"]) == {"expires_at": 1}
        info = await sessions.database.client.admin.command("buildInfo")
        if "ferretdbVersion" not in info:
            assert indexes["expires_ttl"]["expireAfterSeconds"] == 60
            assert not store.purges_expired("sessions")
            return
        # FerretDB v1 refuses expireAfterSeconds; the store then deletes expired documents itself.
        assert "expireAfterSeconds" not in indexes["expires_ttl"]
        assert store.purges_expired("sessions")
        await sessions.insert_one({"_id": "dead", "expires_at": datetime.now(UTC) - timedelta(days=1)})
        await store.collection(SESSIONS).insert({"_id": "alive", "expires_at": datetime.now(UTC)})
        assert [doc["_id"] async for doc in sessions.find({})] == ["alive"]
    finally:
        await sessions.database.client.drop_database(sessions.database.name)
        await store.close()


async def test_embedded_store_purges_expired_rows_on_the_next_write(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "ttl.sqlite3")
    await store.ensure([SESSIONS])
    coll = store.collection(SESSIONS)
    await coll.insert({"_id": "old", "expires_at": datetime.now(UTC) - timedelta(hours=1)})
    await coll.insert({"_id": "other", "expires_at": datetime.now(UTC)})
    await store.close()

    with sqlite3.connect(tmp_path / "ttl.sqlite3") as raw:
        rows = raw.execute("SELECT id FROM documents WHERE coll = 'sessions' ORDER BY id").fetchall()
    assert rows == [("other",)]


# -- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_increments_are_never_lost(store: DocumentStore) -> None:
    await store.ensure([COUNTERS])
    coll = store.collection(COUNTERS)
    await coll.insert({"_id": "c", "n": 0})
    seen: list[int] = []

    async def bump(times: int) -> None:
        for _ in range(times):
            after = await coll.update_one({"_id": "c"}, {"$inc": {"n": 1}})
            assert after is not None
            seen.append(after["n"])

    await asyncio.gather(*(bump(10) for _ in range(40)))

    assert await coll.get("c") == {"_id": "c", "n": 400}
    # Each increment saw its own result: no two updates read the same before-value.
    assert sorted(seen) == list(range(1, 401))


def _increment_in_another_process(path: str, times: int) -> None:
    async def run() -> None:
        store = EmbeddedStore(Path(path))
        coll = store.collection(COUNTERS)
        for _ in range(times):
            await coll.update_one({"_id": "c"}, {"$inc": {"n": 1}}, upsert=True)
        await store.close()

    asyncio.run(run())


async def test_embedded_increments_from_two_processes_are_never_lost(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    store = EmbeddedStore(path)
    coll = store.collection(COUNTERS)
    context = multiprocessing.get_context("spawn")  # fork would copy this process's event loop and connection
    workers = [context.Process(target=_increment_in_another_process, args=(str(path), 300)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for _ in range(300):  # this process competes for the same row meanwhile
        await coll.update_one({"_id": "c"}, {"$inc": {"n": 1}}, upsert=True)
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]

    assert await coll.get("c") == {"_id": "c", "n": 900}
    await store.close()


# -- lifecycle ------------------------------------------------------------------------------------


async def test_ping(store: DocumentStore) -> None:
    await store.ping()


@pytest.mark.mongo
async def test_open_store_picks_the_backend(tmp_path: Path, mongo_url: str) -> None:
    embedded = open_store("", "fittracker", tmp_path, "workout")
    assert isinstance(embedded, EmbeddedStore)
    assert embedded.path == tmp_path / "workout.sqlite3"
    await embedded.ping()
    await embedded.close()

    mongo = open_store(mongo_url, "fittracker_open_store", tmp_path, "workout")
    assert isinstance(mongo, MongoStore)
    await mongo.ping()
    await mongo.close()
