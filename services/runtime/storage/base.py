"""The document-store contract every repository is written against.

Repositories speak a small, MongoDB-shaped subset (filters, ``$set``-style updates, sorted and
limited finds) so that one repository implementation runs on MongoDB in production and on the
embedded file store for the quick start; ``tests/storage`` holds the contract both must pass.

Documents are plain dicts of str, int, float, bool, None, list, dict and timezone-aware UTC
datetimes. ``_id`` is always a string chosen by the caller. Datetimes are kept to the millisecond
(BSON's precision), so a value read back is the one written truncated to the millisecond, in UTC.

Filters: ``{"field": value}`` (dotted paths reach into sub-documents; a list field matches when
any element equals the value), and operator documents ``{"field": {"$in": [...]}}`` with ``$eq``,
``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``, ``$in``, ``$nin``, ``$exists`` and ``$regex``
(with ``$options: "i"``); top-level ``$and`` / ``$or`` lists of filters.

Updates: ``$set``, ``$unset``, ``$inc``, ``$push`` (one value), ``$pull`` (equal values),
``$setOnInsert`` (upserts only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Document = dict[str, Any]
Filter = Mapping[str, Any]
Update = Mapping[str, Any]
#: Sort keys: (dotted field, 1 ascending | -1 descending).
Sort = Sequence[tuple[str, int]]


@dataclass(frozen=True)
class IndexSpec:
    """An index declared in code and ensured at start."""

    name: str
    keys: tuple[tuple[str, int], ...]
    unique: bool = False
    #: Documents expire this many seconds after the datetime in the (single) indexed field.
    #: Expired documents are invisible to reads and writes at once; storage reclaims them later.
    expire_after_seconds: int | None = None


@dataclass(frozen=True)
class CollectionSpec:
    """A collection, its indexes, and the shard key it would be sharded on in MongoDB."""

    name: str
    #: Chosen so that every query of the owning service targets one shard; ``why`` says how.
    shard_key: tuple[str, ...]
    why: str
    indexes: tuple[IndexSpec, ...] = field(default=())


class StoreError(Exception):
    """Base class of storage failures the domain layer may handle."""


class StoreUnavailable(StoreError):
    """The database could not be reached, so the operation was not sent; it may succeed later."""


class StoreTimeout(StoreError):
    """The database stopped answering during the operation: it may or may not have been applied."""


class DuplicateKeyError(StoreError):
    """An insert or update broke a unique index (``_id`` included)."""

    def __init__(self, collection: str, index: str) -> None:
        """Record which unique index refused the write; ``index`` is ``_id_`` for the id."""
        super().__init__(f"duplicate key in {collection} on index {index}")
        self.collection = collection
        self.index = index


class Collection(Protocol):
    """One collection of documents."""

    @property
    def name(self) -> str:
        """The collection's name."""
        ...

    async def insert(self, doc: Document) -> None:
        """Insert a new document; raise DuplicateKeyError when ``_id`` or a unique index clashes."""
        ...

    async def get(self, doc_id: str) -> Document | None:
        """The document with this ``_id``, or None."""
        ...

    async def find_one(self, flt: Filter) -> Document | None:
        """The first document matching ``flt``, or None."""
        ...

    async def find(self, flt: Filter, *, sort: Sort = (), limit: int = 0, skip: int = 0) -> list[Document]:
        """Matching documents in ``sort`` order (``_id`` breaks ties); ``limit`` 0 means all."""
        ...

    async def count(self, flt: Filter) -> int:
        """How many documents match."""
        ...

    async def update_one(self, flt: Filter, update: Update, *, upsert: bool = False) -> Document | None:
        """Apply ``update`` to the first match and return it as it is after; None when none matched.

        With ``upsert`` a missing document is created from the equality parts of ``flt``, then
        ``$setOnInsert`` and the other operators. Raises DuplicateKeyError like ``insert``.
        """
        ...

    async def update_many(self, flt: Filter, update: Update) -> int:
        """Apply ``update`` to every match; return how many matched."""
        ...

    async def delete_one(self, flt: Filter) -> bool:
        """Delete the first match; True when one was deleted."""
        ...

    async def delete_many(self, flt: Filter) -> int:
        """Delete every match; return how many were deleted."""
        ...


class DocumentStore(Protocol):
    """A database: collections by spec, index creation, lifecycle."""

    def collection(self, spec: CollectionSpec) -> Collection:
        """The collection described by ``spec`` (indexes are created by ``ensure``)."""
        ...

    async def ensure(self, specs: Sequence[CollectionSpec]) -> None:
        """Create the collections and indexes in ``specs``; idempotent, called at start."""
        ...

    async def ping(self) -> None:
        """Raise StoreError when the store cannot be reached (health checks call this)."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...
