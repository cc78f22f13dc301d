"""Where notifications, per-user cursors and push devices are kept.

Cursors: each user has a sequence document whose ``last`` is raised with ``$inc`` for every new
notification; the notification is then inserted with that cursor under a unique (user, cursor)
index. The index is what guarantees uniqueness: a store that applies ``$inc`` as read-then-write
(FerretDB 1.24 across processes, see README "Known limits") may hand the same value to two
writers, and the loser of the insert simply allocates again. A cursor allocated by a writer that
then fails is never used: streams treat such a hole as lost after a grace period (see
``stream.py``). Two first notifications of a user may both try to create the sequence
document; the loser's upsert fails on ``_id`` and simply tries again.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from services.runtime.storage import CollectionSpec, Document, DocumentStore, DuplicateKeyError, Filter, IndexSpec

NOTIFICATIONS = CollectionSpec(
    name="notifications",
    shard_key=("user_id",),
    why="inbox pages, counts, marks and subscriptions all address one user's notifications; only the "
    "retry scan on delivery_due_at goes to every shard, and it reads few, short-lived entries",
    indexes=(
        # Single-field so the embedded store can narrow by user; MongoDB could use the compound's prefix.
        IndexSpec("user", (("user_id", 1),)),
        IndexSpec("user_cursor", (("user_id", 1), ("cursor", 1)), unique=True),
        IndexSpec("delivery_due", (("delivery_due_at", 1),)),
        IndexSpec("expire_ttl", (("expire_at", 1),), expire_after_seconds=0),
    ),
)

SEQUENCES = CollectionSpec(
    name="notification_sequences",
    shard_key=("_id",),
    why="one document per user, always addressed by the user id",
)

CLAIMS = CollectionSpec(
    name="delivery_claims",
    shard_key=("_id",),
    why="each claim is one insert of one (notification, due time) key",
    indexes=(IndexSpec("expire_ttl", (("expire_at", 1),), expire_after_seconds=0),),
)

DEVICES = CollectionSpec(
    name="devices",
    shard_key=("user_id",),
    why="listing and sending address one user's devices; registration finds a token's device by "
    "_id (derived from the token), which may cross shards when a token moves between users",
    indexes=(IndexSpec("user", (("user_id", 1),)),),
)

#: Device ids derive from the push token, so registering a token twice finds the same device.
DEVICE_NAMESPACE = uuid.UUID("0b7a4c1e-5f0d-4f55-9a6e-3c1d9e2f7a10")
#: Notification ids of retried sends derive from (user, request id), which makes retries idempotent.
REQUEST_NAMESPACE = uuid.UUID("9d2e6f3a-1b7c-4e8d-a5f2-6c4b3a2d1e0f")
#: How many times a writer re-allocates a cursor after losing the (user, cursor) race.
CURSOR_ATTEMPTS = 8


def notification_id_for(user_id: str, request_id: str) -> str:
    """The notification id for a request id (random when there is none)."""
    if not request_id:
        return uuid.uuid4().hex
    return uuid.uuid5(REQUEST_NAMESPACE, f"{user_id}/{request_id.lower()}").hex


def device_id_for(push_token: str) -> str:
    """The device id of a push token: a one-way digest, so the id never reveals the token."""
    return uuid.uuid5(DEVICE_NAMESPACE, push_token).hex


class NotificationRepository:
    """Reads and writes notifications and their per-user cursors."""

    def __init__(self, store: DocumentStore, retention: timedelta) -> None:
        """Use ``store``; notifications expire ``retention`` after creation."""
        self._store = store
        self._retention = retention
        self._notifications = store.collection(NOTIFICATIONS)
        self._sequences = store.collection(SEQUENCES)
        self._claims = store.collection(CLAIMS)

    async def ensure(self) -> None:
        """Create the indexes."""
        await self._store.ensure([NOTIFICATIONS, SEQUENCES, CLAIMS])

    async def create(self, doc: Document) -> tuple[Document, bool]:
        """Give ``doc`` the user's next cursor and insert it; return (stored, created).

        A clash on ``_id`` is a retried request (ids derive from request ids): the stored
        notification is returned with ``created`` False and nothing else happens.
        """
        user_id = doc["user_id"]
        doc["expire_at"] = doc["create_time"] + self._retention
        for _ in range(CURSOR_ATTEMPTS):
            try:
                sequence = await self._sequences.update_one({"_id": user_id}, {"$inc": {"last": 1}}, upsert=True)
            except DuplicateKeyError:
                continue  # two first notifications raced to create the sequence: the next try updates it
            doc["cursor"] = int(sequence["last"]) if sequence else 1
            try:
                await self._notifications.insert(doc)
            except DuplicateKeyError as clash:
                if clash.index == "_id_":
                    existing = await self._notifications.get(doc["_id"])
                    if existing is not None:
                        return existing, False
                continue  # another writer got the same cursor (non-atomic $inc): allocate again
            return doc, True
        raise RuntimeError(f"could not allocate a cursor for users/{user_id} in {CURSOR_ATTEMPTS} attempts")

    async def get(self, user_id: str, notification_id: str) -> Document | None:
        """One notification of ``user_id``."""
        doc = await self._notifications.get(notification_id)
        return doc if doc is not None and doc["user_id"] == user_id else None

    async def get_by_id(self, notification_id: str) -> Document | None:
        """One notification, whoever owns it (delivery worker)."""
        return await self._notifications.get(notification_id)

    async def page(
        self, user_id: str, *, limit: int, before_cursor: int | None, unread_only: bool, category: str | None
    ) -> list[Document]:
        """Up to ``limit`` notifications, newest first, below ``before_cursor`` when given."""
        flt: dict[str, Any] = {"user_id": user_id}
        if before_cursor is not None:
            flt["cursor"] = {"$lt": before_cursor}
        if unread_only:
            flt["read_time"] = None
        if category:
            flt["category"] = category
        return await self._notifications.find(flt, sort=[("cursor", -1)], limit=limit)

    async def after(self, user_id: str, cursor: int, limit: int) -> list[Document]:
        """Up to ``limit`` notifications above ``cursor``, in cursor order."""
        return await self._notifications.find(
            {"user_id": user_id, "cursor": {"$gt": cursor}}, sort=[("cursor", 1)], limit=limit
        )

    async def latest_cursor(self, user_id: str) -> int:
        """The highest cursor of a stored notification; 0 when there is none."""
        newest = await self._notifications.find({"user_id": user_id}, sort=[("cursor", -1)], limit=1)
        return int(newest[0]["cursor"]) if newest else 0

    async def replay_start(self, user_id: str, resume_cursor: int, max_replay: int) -> tuple[int, bool]:
        """Where a replay from ``resume_cursor`` starts, and whether it misses notifications.

        It misses some when the oldest kept notification is beyond ``resume_cursor + 1`` (older
        ones expired), or when more than ``max_replay`` are due: then it starts ``max_replay``
        notifications before the newest.
        """
        oldest = await self._notifications.find(
            {"user_id": user_id, "cursor": {"$gt": resume_cursor}}, sort=[("cursor", 1)], limit=1
        )
        expired = bool(oldest) and int(oldest[0]["cursor"]) > resume_cursor + 1 and resume_cursor > 0
        window = await self._notifications.find(
            {"user_id": user_id, "cursor": {"$gt": resume_cursor}}, sort=[("cursor", -1)], limit=max_replay + 1
        )
        if len(window) > max_replay:
            return int(window[-1]["cursor"]), True
        if expired:
            return int(oldest[0]["cursor"]) - 1, True
        return resume_cursor, False

    async def sequences_of(self, user_ids: list[str]) -> dict[str, int]:
        """The last allocated cursor of each user (one query for many; the store poller's view)."""
        docs = await self._sequences.find({"_id": {"$in": user_ids}})
        return {d["_id"]: int(d.get("last", 0)) for d in docs}

    async def unread_count(self, user_id: str) -> int:
        """How many notifications of ``user_id`` are unread."""
        return await self._notifications.count({"user_id": user_id, "read_time": None})

    async def mark_read(self, user_id: str, notification_id: str, when: datetime) -> Document | None:
        """Set the read time unless already set; the notification as it is after, or None."""
        updated = await self._notifications.update_one(
            {"_id": notification_id, "user_id": user_id, "read_time": None}, {"$set": {"read_time": when}}
        )
        return updated or await self.get(user_id, notification_id)

    async def mark_all_read(self, user_id: str, max_cursor: int, when: datetime) -> int:
        """Mark unread notifications up to ``max_cursor`` (0: all) read; return how many."""
        flt: dict[str, Any] = {"user_id": user_id, "read_time": None}
        if max_cursor:
            flt["cursor"] = {"$lte": max_cursor}
        return await self._notifications.update_many(flt, {"$set": {"read_time": when}})

    async def due(self, now: datetime, limit: int) -> list[Document]:
        """Notifications with deliveries due for an attempt, oldest due first."""
        return await self._notifications.find(
            {"delivery_due_at": {"$lte": now}}, sort=[("delivery_due_at", 1)], limit=limit
        )

    async def claim(self, doc: Document, lease_until: datetime) -> Document | None:
        """Take the delivery lease of ``doc`` if nobody took this due attempt before; None if taken.

        The claim is the insert of a key naming the notification and the due time being claimed:
        inserts are atomic on every store, whereas a conditional update is read-then-write on
        FerretDB, which let two replicas claim the same attempt. Each due time is claimed once.
        """
        due: datetime = doc["delivery_due_at"]
        try:
            await self._claims.insert({"_id": f"{doc['_id']}@{due.isoformat()}", "expire_at": lease_until})
        except DuplicateKeyError:
            return None
        return await self._notifications.update_one(
            {"_id": doc["_id"], "delivery_due_at": doc["delivery_due_at"]},
            {"$set": {"delivery_due_at": lease_until}},
        )

    async def record_deliveries(self, notification_id: str, changes: dict[str, Any]) -> Document | None:
        """Store the outcome of a delivery attempt."""
        return await self._notifications.update_one({"_id": notification_id}, {"$set": changes})

    async def erase_user(self, user_id: str) -> int:
        """Delete every notification and the cursor of ``user_id``; return how many notifications."""
        count = await self._notifications.delete_many({"user_id": user_id})
        await self._sequences.delete_one({"_id": user_id})
        return count


class DeviceRepository:
    """Reads and writes push devices."""

    def __init__(self, store: DocumentStore) -> None:
        """Use ``store``'s ``devices`` collection."""
        self._store = store
        self._devices = store.collection(DEVICES)

    async def ensure(self) -> None:
        """Create the indexes."""
        await self._store.ensure([DEVICES])

    async def get(self, device_id: str) -> Document | None:
        """A device by id, whoever owns it."""
        return await self._devices.get(device_id)

    async def count(self, user_id: str) -> int:
        """How many devices ``user_id`` has."""
        return await self._devices.count({"user_id": user_id})

    async def insert(self, doc: Document) -> bool:
        """Insert a new device; False when its token was registered meanwhile."""
        try:
            await self._devices.insert(doc)
        except DuplicateKeyError:
            return False
        return True

    async def update(self, device_id: str, changes: dict[str, Any]) -> Document | None:
        """Set ``changes`` on a device."""
        return await self._devices.update_one({"_id": device_id}, {"$set": changes})

    async def page(self, user_id: str, *, limit: int, after: tuple[datetime, str] | None) -> list[Document]:
        """Up to ``limit`` devices, most recently registered first, after the (time, id) of a page end."""
        flt: Filter = {"user_id": user_id}
        if after is not None:
            when, last_id = after
            flt = {"user_id": user_id, "$or": [
                {"update_time": {"$lt": when}}, {"update_time": when, "_id": {"$gt": last_id}},
            ]}
        return await self._devices.find(flt, sort=[("update_time", -1)], limit=limit)

    async def of_user(self, user_id: str) -> list[Document]:
        """Every device of ``user_id``."""
        return await self._devices.find({"user_id": user_id}, sort=[("update_time", -1)])

    async def delete(self, user_id: str, device_id: str) -> bool:
        """Delete a device of ``user_id``."""
        return await self._devices.delete_one({"_id": device_id, "user_id": user_id})

    async def erase_user(self, user_id: str) -> int:
        """Delete every device of ``user_id``."""
        return await self._devices.delete_many({"user_id": user_id})
