"""Where routines, sessions (with their sets) and personal records are kept, and how they change.

Every write that depends on what was read is conditional: it names the state it expects
(``state``, ``version``) in its filter, and a filter that no longer matches means someone else
wrote first. Sets live inside their session document, so logging a set is one ``$push`` guarded by
the session's state: it can never land in a session that was completed in between, and two
concurrent LogSet calls both land (MongoDB applies each ``$push`` atomically; the embedded store
serialises writes in SQLite; on FerretDB the store serialises updates within the process).

Collection names carry the service's prefix: the services may share one MongoDB database, where
the user service already owns ``sessions``.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from fittracker.common.v1 import fitness_pb2

from services.runtime.errors import Aborted
from services.runtime.storage import CollectionSpec, Document, DocumentStore, DuplicateKeyError, IndexSpec
from services.runtime.timeutil import now
from services.workout.records import Candidate

IN_PROGRESS = "SESSION_STATE_IN_PROGRESS"
COMPLETED = "SESSION_STATE_COMPLETED"
DISCARDED = "SESSION_STATE_DISCARDED"
#: The ``active`` value of a user's one session in progress; finished sessions use their own id.
ACTIVE = "in_progress"
#: How often a conditional write is retried against a fresh read before the call gives up.
MAX_ATTEMPTS = 8

ROUTINES = CollectionSpec(
    name="workout_routines",
    shard_key=("user_id",),
    why="every routine query names one user (list, get, update, delete, the 200 limit), so "
    "hashing user_id puts each user's routines on one shard and spreads users evenly",
    indexes=(IndexSpec("user_recent", (("user_id", 1), ("update_time", -1), ("_id", -1))),),
)
SESSIONS = CollectionSpec(
    name="workout_sessions",
    shard_key=("user_id",),
    why="history, the one-in-progress rule and every session write are per user; user_id alone "
    "(hashed) rather than (user_id, start_time), because the unique one_in_progress index must "
    "be prefixed by the whole shard key",
    indexes=(
        # History by time range, newest first, with _id breaking ties for keyset paging.
        IndexSpec("user_history", (("user_id", 1), ("start_time", -1), ("_id", -1))),
        # At most one session in progress per user: ``active`` is "in_progress" for it and the
        # session's own id for every other session, so only a second one in progress clashes.
        IndexSpec("one_in_progress", (("user_id", 1), ("active", 1)), unique=True),
        # Completed sessions whose records and events are not written yet (crash recovery).
        IndexSpec("unfinalized", (("finalized", 1), ("state", 1), ("update_time", 1))),
    ),
)
RECORDS = CollectionSpec(
    name="workout_personal_records",
    shard_key=("user_id",),
    why="records are read and compared per user (ListPersonalRecords, completing a session), "
    "so each user's records sit on one shard; _id is user, exercise and kind",
    indexes=(IndexSpec("user_order", (("user_id", 1), ("sort_key", 1))),),
)
ALL_COLLECTIONS = (ROUTINES, SESSIONS, RECORDS)


def etag_of(doc: Document) -> str:
    """A short checksum that changes with every write to the document (its version counter)."""
    return hashlib.sha256(f"{doc['_id']}:{doc.get('version', 0)}".encode()).hexdigest()[:16]


class RoutineRepository:
    """Routine documents: ``{_id, user_id, display_name, description, exercises, version, ...}``."""

    def __init__(self, store: DocumentStore) -> None:
        """Use ``store``'s ``workout_routines`` collection."""
        self._routines = store.collection(ROUTINES)

    async def get(self, user_id: str, routine_id: str) -> Document | None:
        """The routine if it exists and belongs to ``user_id``."""
        doc = await self._routines.get(routine_id)
        return doc if doc is not None and doc["user_id"] == user_id else None

    async def count(self, user_id: str) -> int:
        """How many routines the user has."""
        return await self._routines.count({"user_id": user_id})

    async def create(self, doc: Document) -> Document:
        """Insert ``doc``; a clash on ``_id`` is a retry of the same request, answered with the stored one."""
        try:
            await self._routines.insert(doc)
        except DuplicateKeyError:
            existing = await self.get(doc["user_id"], doc["_id"])
            if existing is None:
                raise
            return existing
        return doc

    async def page(self, user_id: str, after: tuple[datetime, str] | None, limit: int) -> list[Document]:
        """Up to ``limit`` routines, most recently changed first, after the keyset ``after``."""
        flt: dict[str, Any] = {"user_id": user_id}
        if after is not None:
            time, last_id = after
            flt["$or"] = [{"update_time": {"$lt": time}}, {"update_time": time, "_id": {"$lt": last_id}}]
        return await self._routines.find(flt, sort=[("update_time", -1), ("_id", -1)], limit=limit)

    async def update(self, doc: Document, changes: dict[str, Any]) -> Document | None:
        """Apply ``changes`` if the routine is still at ``doc``'s version; None when it moved on."""
        return await self._routines.update_one(
            {"_id": doc["_id"], "user_id": doc["user_id"], "version": doc["version"]},
            {"$set": {**changes, "update_time": now()}, "$inc": {"version": 1}},
        )

    async def delete(self, doc: Document, *, at_version: bool) -> bool:
        """Delete the routine (only at ``doc``'s version when ``at_version``); True when deleted."""
        flt: dict[str, Any] = {"_id": doc["_id"], "user_id": doc["user_id"]}
        if at_version:
            flt["version"] = doc["version"]
        return await self._routines.delete_one(flt)

    async def erase_user(self, user_id: str) -> int:
        """Delete every routine of the user."""
        return await self._routines.delete_many({"user_id": user_id})


class SessionRepository:
    """Session documents with their sets embedded, in the order they were logged."""

    def __init__(self, store: DocumentStore) -> None:
        """Use ``store``'s ``workout_sessions`` collection."""
        self._sessions = store.collection(SESSIONS)

    async def get(self, user_id: str, session_id: str) -> Document | None:
        """The session if it exists and belongs to ``user_id``."""
        doc = await self._sessions.get(session_id)
        return doc if doc is not None and doc["user_id"] == user_id else None

    async def start(self, doc: Document) -> tuple[Document, bool]:
        """Insert a new session in progress; return (stored, created).

        A clash on ``_id`` is a retry of the same StartSession (ids derive from the request id):
        the stored session is returned with ``created`` False. A clash on ``one_in_progress``
        raises DuplicateKeyError: the user already has a session in progress.
        """
        try:
            await self._sessions.insert(doc)
        except DuplicateKeyError:
            # Which index the server names when both clash varies, so look at the id itself.
            existing = await self.get(doc["user_id"], doc["_id"])
            if existing is None:
                raise
            return existing, False
        return doc, True

    async def in_progress(self, user_id: str) -> Document | None:
        """The user's session in progress, if any."""
        return await self._sessions.find_one({"user_id": user_id, "active": ACTIVE})

    async def page(
        self, user_id: str, after: tuple[datetime, str] | None, limit: int, *,
        started_from: datetime | None = None, started_before: datetime | None = None, state: str = "",
    ) -> list[Document]:
        """Up to ``limit`` sessions, newest start first, after the keyset ``after``.

        Optionally only those started in [started_from, started_before) and in ``state``.
        """
        query: dict[str, Any] = {"user_id": user_id}
        bounds: dict[str, datetime] = {}
        if started_from is not None:
            bounds["$gte"] = started_from
        if started_before is not None:
            bounds["$lt"] = started_before
        if bounds:
            query["start_time"] = bounds
        if state:
            query["state"] = state
        if after is not None:
            time, last_id = after
            keyset = [{"start_time": {"$lt": time}}, {"start_time": time, "_id": {"$lt": last_id}}]
            query = {"$and": [query, {"$or": keyset}]}
        return await self._sessions.find(query, sort=[("start_time", -1), ("_id", -1)], limit=limit)

    async def push_set(self, doc_id: str, user_id: str, workout_set: Document, max_sets: int) -> Document | None:
        """Append a set to a session in progress that has room and not this set id yet.

        One conditional ``$push``: None when the session is gone, not in progress, full, or
        already has the set (a retried request); the caller reads it again to tell which.
        """
        return await self._sessions.update_one(
            {
                "_id": doc_id,
                "user_id": user_id,
                "state": IN_PROGRESS,
                "set_count": {"$lt": max_sets},
                "sets.id": {"$ne": workout_set["id"]},
            },
            {"$push": {"sets": workout_set}, "$inc": {"set_count": 1, "version": 1},
             "$set": {"update_time": workout_set["create_time"]}},
        )

    async def replace_sets(self, doc: Document, sets: list[Document]) -> Document | None:
        """Replace the sets of a session in progress still at ``doc``'s version; None when it moved on."""
        return await self._sessions.update_one(
            {"_id": doc["_id"], "user_id": doc["user_id"], "state": IN_PROGRESS, "version": doc["version"]},
            {"$set": {"sets": sets, "set_count": len(sets), "update_time": now()}, "$inc": {"version": 1}},
        )

    async def finish(self, doc: Document, changes: dict[str, Any]) -> Document | None:
        """Move a session in progress, still at ``doc``'s version, to another state.

        It stops being the user's one session in progress in the same write.
        """
        return await self._sessions.update_one(
            {"_id": doc["_id"], "user_id": doc["user_id"], "state": IN_PROGRESS, "version": doc["version"]},
            {"$set": {**changes, "active": doc["_id"], "update_time": now()}, "$inc": {"version": 1}},
        )

    async def mark_finalized(self, doc: Document, personal_records: list[Document]) -> Document | None:
        """Record that a completed session's records and events are written; None if already so."""
        return await self._sessions.update_one(
            {"_id": doc["_id"], "user_id": doc["user_id"], "finalized": False},
            {"$set": {"finalized": True, "personal_records": personal_records}},
        )

    async def unfinalized(self, *, user_id: str | None = None, closed_before: datetime | None = None,
                          limit: int = 100) -> list[Document]:
        """Completed sessions whose records and events were not written (a crash mid-completion).

        ``closed_before`` filters on update_time, which the closing write set (a client-given
        end_time says nothing about when the completion ran).
        """
        flt: dict[str, Any] = {"finalized": False, "state": COMPLETED}
        if user_id is not None:
            flt["user_id"] = user_id
        if closed_before is not None:
            flt["update_time"] = {"$lt": closed_before}
        return await self._sessions.find(flt, sort=[("update_time", 1)], limit=limit)

    async def erase_user(self, user_id: str) -> int:
        """Delete every session of the user."""
        return await self._sessions.delete_many({"user_id": user_id})


class RecordRepository:
    """Personal records, one document per user, exercise and kind (and weight, for most-reps)."""

    def __init__(self, store: DocumentStore) -> None:
        """Use ``store``'s ``personal_records`` collection."""
        self._records = store.collection(RECORDS)

    async def page(self, user_id: str, flt: dict[str, Any], after: str | None, limit: int) -> list[Document]:
        """Up to ``limit`` records matching ``flt``, by exercise then kind, after sort key ``after``."""
        query: dict[str, Any] = {**flt, "user_id": user_id}
        if after is not None:
            query["sort_key"] = {"$gt": after}
        return await self._records.find(query, sort=[("sort_key", 1)], limit=limit)

    async def apply(self, user_id: str, session: Document, found: list[Candidate]) -> list[Document]:
        """Store the candidates that beat the user's records; return the records the session set.

        Idempotent per session, so a completion interrupted half-way can simply run again: a
        record this session already wrote is recognised by its ``session`` field and compared
        against the value it replaced (kept in ``previous_value``), giving the same answer as the
        first run. Each write is conditional on the record read, and is retried on a clash.
        """
        achieved: list[Document] = []
        for candidate in found:
            record = await self._apply_one(user_id, session, candidate)
            if record is not None:
                achieved.append(record)
        return achieved

    async def _apply_one(self, user_id: str, session: Document, candidate: Candidate) -> Document | None:
        doc_id = f"{user_id}:{candidate.record_id}"
        for _ in range(MAX_ATTEMPTS):
            existing = await self._records.get(doc_id)
            if existing is not None and existing["session"] == session["_id"]:
                return existing
            baseline = None if existing is None else float(existing["value"])
            if baseline is not None and candidate.value <= baseline:
                return None
            record: Document = {
                "_id": doc_id,
                "user_id": user_id,
                "record_id": candidate.record_id,
                "exercise": candidate.exercise,
                "kind": fitness_pb2.PersonalRecordKind.Name(candidate.kind),
                "sort_key": candidate.sort_key,
                "value": candidate.value,
                "previous_value": baseline,
                "weight_kg": candidate.weight_kg,
                "reps": candidate.reps,
                "session": session["_id"],
                "set": candidate.set_id,
                "achieve_time": session["end_time"],
            }
            if existing is None:
                try:
                    await self._records.insert(record)
                except DuplicateKeyError:
                    continue
                return record
            written = await self._records.update_one(
                {"_id": doc_id, "value": existing["value"], "session": existing["session"]},
                {"$set": {k: v for k, v in record.items() if k != "_id"}},
            )
            if written is not None:
                return written
        raise Aborted("personal records changed concurrently; retry the call")

    async def erase_user(self, user_id: str) -> int:
        """Delete every record of the user."""
        return await self._records.delete_many({"user_id": user_id})
