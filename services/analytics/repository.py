"""Where the analytics read models live: collections, their keys and the writes that keep them.

Every write an event causes is idempotent by construction rather than by bookkeeping: a session's
figures are *set* under its own id inside a bounded document (``sessions.<session id>``), records
and markers are keyed on what they are about, and figures derived from several documents (streaks,
totals) are recomputed from those documents and written with a version check. A redelivered event
therefore rewrites the same values, whether the first delivery finished or died half-way.

Documents per user are bounded: one per local month (the sessions of that month), one per
exercise and month (the trend entries), one stats document (streak runs, one subtotal per month,
recent milestone records) and one per personal record set.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from services.runtime.storage import CollectionSpec, Document, DocumentStore, DuplicateKeyError, Filter, IndexSpec
from services.runtime.timeutil import now

#: How long a deleted user's id is remembered, so that their events still in flight (other
#: streams, redeliveries, dead-letter replays) are dropped instead of recreating their data.
TOMBSTONE_SECONDS = 30 * 24 * 3600

USER_STATS = CollectionSpec(
    name="analytics_user_stats",
    shard_key=("_id",),
    why="one document per user, read and written by user id",
)
USER_MONTHS = CollectionSpec(
    name="analytics_user_months",
    shard_key=("user_id",),
    why="a user's months are read together (weeks, reports, streak walks): one shard per user",
    # One user has a few hundred month documents at most: an index on the user alone finds
    # them, and both stores narrow an equality on a single-field index without a scan.
    indexes=(IndexSpec("user", (("user_id", 1),)),),
)
TRENDS = CollectionSpec(
    name="analytics_exercise_trends",
    shard_key=("user_id",),
    why="a trend reads one user's months of one exercise",
    # ``owner_exercise`` is "<user>:<exercise>", so one single-field equality finds a trend's months.
    indexes=(IndexSpec("owner_exercise", (("owner_exercise", 1),)), IndexSpec("user", (("user_id", 1),))),
)
RECORDS = CollectionSpec(
    name="analytics_personal_records",
    shard_key=("user_id",),
    why="the timeline is read and counted per user, newest first",
    indexes=(IndexSpec("user", (("user_id", 1),)),),
)
EXERCISES = CollectionSpec(
    name="analytics_exercises",
    shard_key=("_id",),
    why="a small catalog mirror looked up by exercise id",
)
ACTIVITY = CollectionSpec(
    name="analytics_platform_activity",
    shard_key=("user_key",),
    why="each write touches one user's marker, so writes spread over shards; the admin-only "
    "platform read scatters by date, which the date index serves on each shard",
    indexes=(IndexSpec("date", (("date", 1),)), IndexSpec("user_key", (("user_key", 1),))),
)
ROLLUPS = CollectionSpec(
    name="analytics_platform_rollups",
    shard_key=("_id",),
    why="one document per UTC day or ISO week, fetched by id",
)
TOMBSTONES = CollectionSpec(
    name="analytics_erased_users",
    shard_key=("_id",),
    why="looked up by user id on every event",
    indexes=(IndexSpec("expiry", (("erase_time", 1),), expire_after_seconds=TOMBSTONE_SECONDS),),
)
ALL = (USER_STATS, USER_MONTHS, TRENDS, RECORDS, EXERCISES, ACTIVITY, ROLLUPS, TOMBSTONES)


def month_id(user_id: str, month: str) -> str:
    """The id of a user's month document."""
    return f"{user_id}:{month}"


def trend_id(user_id: str, exercise_id: str, month: str) -> str:
    """The id of a user's month document of one exercise."""
    return f"{user_id}:{exercise_id}:{month}"


def marker_id(day: str, user_key: str) -> str:
    """The id of a platform activity marker: one per UTC day and user (or anonymous key)."""
    return f"{day}:{user_key}"


class AnalyticsRepository:
    """Reads and writes the analytics collections."""

    def __init__(self, store: DocumentStore) -> None:
        """Use ``store``'s analytics collections."""
        self._store = store
        self.stats = store.collection(USER_STATS)
        self.months = store.collection(USER_MONTHS)
        self.trends = store.collection(TRENDS)
        self.records = store.collection(RECORDS)
        self.exercises = store.collection(EXERCISES)
        self.activity = store.collection(ACTIVITY)
        self.rollups = store.collection(ROLLUPS)
        self.tombstones = store.collection(TOMBSTONES)
        #: Exercise ids this process has already mirrored; saves a write per exercise per session.
        self._known_exercises: set[str] = set()

    async def ensure(self) -> None:
        """Create the collections' indexes."""
        await self._store.ensure(ALL)

    # --- per-user documents -----------------------------------------------------------------

    async def put_session(self, user_id: str, session_key: str, entry: Document) -> None:
        """Set a session's figures in its month document (the same values on every redelivery)."""
        await self.months.update_one(
            {"_id": month_id(user_id, entry["month"])},
            {
                "$set": {f"sessions.{session_key}": entry, "update_time": now()},
                "$setOnInsert": {"user_id": user_id, "month": entry["month"]},
            },
            upsert=True,
        )

    async def put_trend(self, user_id: str, exercise_id: str, session_key: str, entry: Document) -> None:
        """Set one session's figures for an exercise in the exercise's month document."""
        await self.trends.update_one(
            {"_id": trend_id(user_id, exercise_id, entry["month"])},
            {
                "$set": {f"sessions.{session_key}": entry},
                "$setOnInsert": {
                    "user_id": user_id, "exercise": exercise_id, "month": entry["month"],
                    "owner_exercise": f"{user_id}:{exercise_id}",
                },
            },
            upsert=True,
        )

    async def month_docs(self, user_id: str, first: str, last: str) -> list[Document]:
        """A user's month documents from ``first`` to ``last`` ("YYYY-MM", inclusive), oldest first."""
        return await self.months.find(
            {"user_id": user_id, "month": {"$gte": first, "$lte": last}}, sort=[("month", 1)]
        )

    async def trend_docs(self, user_id: str, exercise_id: str, first: str, last: str) -> list[Document]:
        """A user's month documents of one exercise from ``first`` to ``last``, oldest first."""
        return await self.trends.find(
            {"owner_exercise": f"{user_id}:{exercise_id}", "month": {"$gte": first, "$lte": last}},
            sort=[("month", 1)],
        )

    async def put_record(self, record_id: str, doc: Document) -> None:
        """Add a personal record to the timeline; a redelivered one is already there."""
        try:
            await self.records.insert({"_id": record_id, **doc})
        except DuplicateKeyError as clash:
            if clash.index != "_id_":
                raise

    async def mirror_exercises(self, exercise_ids: Iterable[str]) -> None:
        """Remember exercise ids seen in events: the catalog as far as analytics knows it."""
        for exercise_id in exercise_ids:
            if exercise_id in self._known_exercises:
                continue
            await self.exercises.update_one(
                {"_id": exercise_id}, {"$setOnInsert": {"first_seen": now()}}, upsert=True
            )
            self._known_exercises.add(exercise_id)

    async def exercise_known(self, exercise_id: str) -> bool:
        """Whether any event has named this exercise."""
        return exercise_id in self._known_exercises or await self.exercises.get(exercise_id) is not None

    async def touch_user(self, user_id: str) -> None:
        """Make sure a user's stats document exists (a registered user is known, with empty stats)."""
        await self.stats.update_one(
            {"_id": user_id},
            {"$setOnInsert": {"version": 0, "create_time": now(), "months": {}}},
            upsert=True,
        )

    # --- platform activity --------------------------------------------------------------------

    async def mark_activity(self, day: date, user_id: str, update: dict[str, Any]) -> None:
        """Record a user's activity on a UTC day in their marker (``update`` sets fields only)."""
        await self.activity.update_one(
            {"_id": marker_id(day.isoformat(), user_id)},
            {
                "$set": update,
                "$setOnInsert": {
                    "date": day.isoformat(), "week": (day - timedelta(days=day.weekday())).isoformat(),
                    "user_key": user_id,
                },
            },
            upsert=True,
        )

    async def invalidate_rollups(self, keys: Iterable[str]) -> None:
        """Tell readers the sealed figures of these days or weeks are stale (a late event came)."""
        for key in keys:
            await self.rollups.update_one({"_id": key}, {"$inc": {"v": 1}, "$unset": {"counts": ""}}, upsert=True)

    async def markers_on(self, days: Iterable[str]) -> list[Document]:
        """Every activity marker of these UTC days."""
        wanted = sorted(set(days))
        return await self.activity.find({"date": {"$in": wanted}}) if wanted else []

    async def rollup_docs(self, keys: Sequence[str]) -> dict[str, Document]:
        """The rollup documents with these ids."""
        return {d["_id"]: d for d in await self.rollups.find({"_id": {"$in": list(keys)}})} if keys else {}

    async def seal_rollup(self, key: str, read_version: int, counts: dict[str, int]) -> None:
        """Store figures computed from markers, unless a late event changed them since ``read_version``."""
        try:
            await self.rollups.update_one(
                {"_id": key, "v": read_version},
                {"$set": {"counts": counts, "counts_v": read_version}},
                upsert=read_version == 0,
            )
        except DuplicateKeyError:
            pass  # a late event created the document meanwhile: leave it unsealed

    # --- erasure --------------------------------------------------------------------------------

    async def tombstone(self, user_id: str) -> Document | None:
        """The erasure record of a deleted user, if they were deleted recently."""
        return await self.tombstones.get(user_id)

    async def bury(self, user_id: str, deletion_request_id: str) -> Document:
        """Record the erasure (first) and return the record, with the anonymous key markers get."""
        stored = await self.tombstones.update_one(
            {"_id": user_id},
            {
                "$setOnInsert": {"anonymous_key": f"anon-{uuid.uuid4().hex}", "erase_time": now()},
                "$set": {"deletion_request_id": deletion_request_id},
            },
            upsert=True,
        )
        assert stored is not None  # an upsert always returns the document
        return stored

    async def record_timeline(
        self, user_id: str, exercise: str, start: datetime | None, end: datetime | None,
        after: tuple[datetime, str] | None, limit: int,
    ) -> list[Document]:
        """A user's records newest first (by time, then id), optionally of one exercise and in [start, end)."""
        filters: list[dict[str, Any]] = [{"user_id": user_id}]
        if exercise:
            filters.append({"exercise": exercise})
        if start is not None:
            filters.append({"achieve_time": {"$gte": start}})
        if end is not None:
            filters.append({"achieve_time": {"$lt": end}})
        if after is not None:
            after_time, after_id = after
            filters.append({"$or": [
                {"achieve_time": {"$lt": after_time}},
                {"achieve_time": after_time, "_id": {"$lt": after_id}},
            ]})
        return await self.records.find({"$and": filters}, sort=[("achieve_time", -1), ("_id", -1)], limit=limit)

    async def records_between(self, user_id: str, start: datetime, end: datetime) -> list[Document]:
        """A user's records achieved in [start, end), oldest first."""
        return await self.records.find(
            {"user_id": user_id, "achieve_time": {"$gte": start, "$lt": end}}, sort=[("achieve_time", 1)]
        )

    async def count_records_between(self, user_id: str, start: datetime, end: datetime) -> int:
        """How many records a user achieved in [start, end)."""
        return await self.records.count({"user_id": user_id, "achieve_time": {"$gte": start, "$lt": end}})

    async def erase_user(self, user_id: str, anonymous_key: str) -> None:
        """Delete everything about a user; their platform markers keep only an anonymous key.

        Markers move to an id built from a random key that only the tombstone links to the user
        (and only until it expires), so daily and weekly counts stay right without the user id.
        """
        await self.stats.delete_one({"_id": user_id})
        await self.months.delete_many({"user_id": user_id})
        await self.trends.delete_many({"user_id": user_id})
        await self.records.delete_many({"user_id": user_id})
        for marker in await self.activity.find({"user_key": user_id}):
            moved = {**marker, "_id": marker_id(marker["date"], anonymous_key), "user_key": anonymous_key}
            try:
                await self.activity.insert(moved)
            except DuplicateKeyError as clash:
                if clash.index != "_id_":
                    raise
            await self.activity.delete_one({"_id": marker["_id"]})

    async def user_data_left(self, user_id: str) -> int:
        """How many documents still hold the user's id (0 after a complete erasure)."""
        total = 0
        for collection, flt in (
            (self.stats, {"_id": user_id}),
            (self.months, {"user_id": user_id}),
            (self.trends, {"user_id": user_id}),
            (self.records, {"user_id": user_id}),
            (self.activity, {"user_key": user_id}),
        ):
            total += await collection.count(flt)
        return total


def version_filter(user_id: str, current: Document | None) -> Filter:
    """The filter of a compare-and-set on a stats document read as ``current``."""
    return {"_id": user_id, "version": current.get("version", 0) if current else 0}

