"""Where accounts are kept: the ``users`` collection and its documents."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
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

TOMBSTONES = CollectionSpec(
    name="user_tombstones",
    shard_key=("_id",),
    why="one point lookup by user id when an id is about to be used; never deleted",
)
REGISTRATIONS = CollectionSpec(
    name="registrations",
    shard_key=("_id",),
    why="a retried Register looks up its request id; claims expire with the idempotency window",
    indexes=(IndexSpec("expires_ttl", (("expires_at", 1),), expire_after_seconds=0),),
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
        self._tombstones = store.collection(TOMBSTONES)
        self._cache = cache

    async def ensure(self) -> None:
        """Create the indexes."""
        await self._store.ensure([USERS, TOMBSTONES])

    async def create(self, doc: Document) -> tuple[Document, bool]:
        """Insert a new user; return (stored document, created).

        A clash on ``_id`` is a retry of the same request racing the first attempt (both hold the
        id of the request's claim), so the stored document is returned with ``created`` False; a
        clash on the email is refused. An id that belonged to a deleted account is never reused.
        """
        if await self.is_tombstoned(doc["_id"]):
            raise IdRetired(doc["_id"])
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
        """Retire the id for ever (a tombstone), then delete the user document."""
        try:
            await self._tombstones.insert({"_id": user_id, "delete_time": now()})
        except DuplicateKeyError:
            pass  # a retried deletion: the id is already retired
        deleted = await self._users.delete_one({"_id": user_id})
        await self._invalidate(user_id)
        return deleted

    async def is_tombstoned(self, user_id: str) -> bool:
        """Whether ``user_id`` belonged to an account that was deleted."""
        return await self._tombstones.get(user_id) is not None


class IdRetired(Exception):
    """The id belonged to a deleted account and must never name another one."""


@dataclass(frozen=True)
class Claim:
    """A Register request id bound to the account it creates."""

    user_id: str
    email: str
    display_name: str
    #: False when an earlier attempt of the same request made the claim.
    fresh: bool


class Registrations:
    """Makes Register idempotent under its request id, for the same payload, within a window.

    The first attempt claims the request id with a new server-generated account id; a retry finds
    the claim and gets the same account (when the email and name match and the password verifies),
    never a new one. After the window the claim expires, and the request id is just a new request.
    The account id never derives from the request id, so nobody can steer which id they get.
    """

    def __init__(self, store: DocumentStore, window: timedelta) -> None:
        """Keep claims in ``store``'s ``registrations`` collection for ``window``."""
        self._store = store
        self._claims = store.collection(REGISTRATIONS)
        self._window = window

    async def ensure(self) -> None:
        """Create the TTL index."""
        await self._store.ensure([REGISTRATIONS])

    async def claim(self, request_id: str, new_user_id: str, email: str, display_name: str) -> Claim:
        """Claim ``request_id`` for ``new_user_id``, or return the live claim an earlier attempt made."""
        created = now()
        doc: Document = {
            "_id": request_id.lower(), "user_id": new_user_id, "email": email, "display_name": display_name,
            "create_time": created, "expires_at": created + self._window,
        }
        try:
            await self._claims.insert(doc)
        except DuplicateKeyError:
            # The TTL sweep runs now and then: an expired claim may still be stored; replace it.
            await self._claims.delete_one({"_id": doc["_id"], "expires_at": {"$lte": created}})
            existing = await self._claims.get(doc["_id"])
            if existing is None:
                return await self.claim(request_id, new_user_id, email, display_name)
            return Claim(existing["user_id"], existing["email"], existing["display_name"], fresh=False)
        return Claim(new_user_id, email, display_name, fresh=True)
