"""Where accounts are kept: the ``users`` collection and its documents."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from services.runtime.cache import Cache
from services.runtime.errors import AlreadyExists
from services.runtime.storage import CollectionSpec, Document, DocumentStore, DuplicateKeyError, IndexSpec
from services.runtime.timeutil import now

USERS = CollectionSpec(
    name="users",
    shard_key=("_id",),
    why="every read and write addresses one user by id; login's email lookup is a unique "
    "secondary index (a sharded cluster keeps it unique through an email->id collection)",
    indexes=(
        IndexSpec("email_unique", (("email", 1),), unique=True),
        IndexSpec("request_id", (("request_id", 1),)),
    ),
)

#: The profile fields a user may change, and the ones the etag covers.
PROFILE_FIELDS = ("display_name", "birth_date", "height_cm", "weight_kg", "fitness_level")


def profile_etag(doc: Document) -> str:
    """A short checksum of the stored profile, changing whenever a profile field changes."""
    body = json.dumps({k: doc.get(k) for k in (*PROFILE_FIELDS, "update_time")}, default=str, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class UserRepository:
    """Reads and writes user documents."""

    def __init__(self, store: DocumentStore, cache: Cache[Document] | None = None) -> None:
        """Use ``store``'s ``users`` collection, reading by id through ``cache`` when given."""
        self._store = store
        self._users = store.collection(USERS)
        self._cache = cache

    async def ensure(self) -> None:
        """Create the indexes."""
        await self._store.ensure([USERS])

    async def create(self, doc: Document) -> tuple[Document, bool]:
        """Insert a new user; return (stored document, created).

        A clash on ``_id`` is a retry of the same request (ids derive from the request id), so
        the stored document is returned with ``created`` False; a clash on the email is refused.
        """
        try:
            await self._users.insert(doc)
        except DuplicateKeyError as clash:
            if clash.index == "_id_":
                existing = await self._users.get(doc["_id"])
                if existing is not None and existing["email"] == doc["email"]:
                    return existing, False
            raise AlreadyExists("an account with this email already exists") from None
        return doc, True

    async def get(self, user_id: str) -> Document | None:
        """The user with this id (a shared read-only document when it comes from the cache)."""
        if self._cache is None:
            return await self._users.get(user_id)
        return await self._cache.get_or_load(user_id, lambda: self._users.get(user_id))

    async def _invalidate(self, user_id: str) -> None:
        if self._cache is not None:
            await self._cache.invalidate(user_id)

    async def by_email(self, email: str) -> Document | None:
        """The user with this (lower-cased) email."""
        return await self._users.find_one({"email": email})

    async def update(self, user_id: str, changes: dict[str, Any], expected_etag: str = "") -> Document | None:
        """Set ``changes`` (and update_time); None when the user is gone or the etag is stale."""
        current = await self._users.get(user_id)
        if current is None or (expected_etag and profile_etag(current) != expected_etag):
            return None
        # Conditional on the update_time read above: a concurrent writer makes this match nothing.
        updated = await self._users.update_one(
            {"_id": user_id, "update_time": current["update_time"]},
            {"$set": {**changes, "update_time": now()}},
        )
        await self._invalidate(user_id)
        return updated

    async def delete(self, user_id: str) -> bool:
        """Delete the user document."""
        deleted = await self._users.delete_one({"_id": user_id})
        await self._invalidate(user_id)
        return deleted
