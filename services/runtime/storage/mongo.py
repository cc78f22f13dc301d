"""MongoStore: the document-store contract over MongoDB with PyMongo's async API.

Every collection writes with write concern ``majority`` and reads datetimes back timezone-aware in
UTC. Indexes come from the CollectionSpecs and are created by ``ensure()``.

TTL: expired documents are hidden from every read and write at once (each filter on a collection
with a TTL index gets ``{field: {$not: {$lte: now - ttl}}}``), because MongoDB's TTL monitor only
deletes them about once a minute; the embedded store behaves the same. A write that clashes with an
expired but not yet deleted document deletes the expired ones and is retried once.

The tests run this against FerretDB v1 (the MongoDB wire protocol over SQLite), which differs in
three ways handled here, all detected from the server's answers rather than assumed:

* it refuses ``expireAfterSeconds`` (NotImplemented, code 238): the index is created without it and
  this store deletes expired documents itself, at most once a minute per collection, on writes;
* its duplicate-key errors do not name the index (``E11000 duplicate key error collection: db.c``,
  or an InternalError carrying SQLite's ``UNIQUE constraint failed: index '<table>_<index>'``):
  the index is read from SQLite's message when present, otherwise found by looking up which unique
  key of the document being written is already taken;
* it applies updates as read-modify-write outside a transaction (FerretDB issue #2168), so
  concurrent ``$inc`` loses updates: when ``buildInfo`` reports ``ferretdbVersion``, this store
  serialises its updates per collection within the process. MongoDB needs none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from bson.codec_options import CodecOptions
from pymongo import AsyncMongoClient, IndexModel, ReturnDocument, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    CollectionInvalid,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from services.runtime.storage.base import (
    CollectionSpec,
    Document,
    DuplicateKeyError,
    Filter,
    IndexSpec,
    Sort,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
    Update,
)
from services.runtime.storage.embedded import apply_update, upsert_seed, values_at

__all__ = ["MongoStore"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

_CODEC: CodecOptions[Document] = CodecOptions(document_class=dict, tz_aware=True, tzinfo=UTC)
_MAJORITY = WriteConcern(w="majority")
#: MongoDB's TTL monitor runs every 60 s; where the server has none we purge no more often.
_PURGE_INTERVAL_SECONDS = 60.0
_NOT_IMPLEMENTED = 238
_NAMESPACE_EXISTS = 48
_DUPLICATE_KEY = 11000
_MONGO_INDEX = re.compile(r"index: (\S+) dup key")
_SQLITE_INDEX = re.compile(r"UNIQUE constraint failed: index '([^']+)'")


class MongoStore:
    """A DocumentStore on a MongoDB (or MongoDB wire protocol) server."""

    def __init__(
        self,
        url: str,
        database: str,
        *,
        app_name: str = "fittracker",
        max_pool_size: int = 50,
        min_pool_size: int = 0,
        server_selection_timeout_ms: int = 3000,
        connect_timeout_ms: int = 5000,
        operation_timeout_ms: int = 10000,
    ) -> None:
        """Configure a client for ``url``; it connects on first use.

        ``max_pool_size`` is per process (services run one process per core). The timeouts keep a
        missing server from hanging a call: server selection fails fast (health checks see it), and
        ``operation_timeout_ms`` bounds every operation, retries included (``timeoutMS``).
        """
        self._client: AsyncMongoClient[Document] = AsyncMongoClient(
            url,
            appname=app_name,
            tz_aware=True,
            tzinfo=UTC,
            w="majority",
            maxPoolSize=max_pool_size,
            minPoolSize=min_pool_size,
            maxIdleTimeMS=300_000,
            serverSelectionTimeoutMS=server_selection_timeout_ms,
            connectTimeoutMS=connect_timeout_ms,
            timeoutMS=operation_timeout_ms,
        )
        self._db = self._client.get_database(database, codec_options=_CODEC, write_concern=_MAJORITY)
        self._collections: dict[str, MongoCollection] = {}
        #: Collections whose TTL indexes the server refused; this store deletes their expired documents.
        self._purged_by_us: set[str] = set()
        self._serialise_updates: bool | None = None

    def raw(self, name: str) -> AsyncCollection[Document]:
        """Return the driver's collection, with this store's codec and write concern."""
        return self._db.get_collection(name, codec_options=_CODEC, write_concern=_MAJORITY)

    def collection(self, spec: CollectionSpec) -> MongoCollection:
        """Return the collection described by ``spec``."""
        existing = self._collections.get(spec.name)
        if existing is None or existing.spec != spec:
            existing = self._collections[spec.name] = MongoCollection(self, spec)
        return existing

    def purges_expired(self, name: str) -> bool:
        """Tell whether this store deletes expired documents of ``name`` itself (the server has no TTL)."""
        return name in self._purged_by_us

    async def ensure(self, specs: Sequence[CollectionSpec]) -> None:
        """Create missing collections and their indexes; creating an existing index is a no-op."""
        try:
            existing = set(await self._db.list_collection_names())
            for spec in specs:
                if spec.name not in existing:
                    await self._create_collection(spec.name)
                for index in spec.indexes:
                    await self._ensure_index(spec.name, index)
        except PyMongoError as exc:
            raise _store_error("ensuring collections failed", exc) from exc

    async def _create_collection(self, name: str) -> None:
        try:
            await self._db.create_collection(name)
        except CollectionInvalid:
            pass  # another process created it first
        except OperationFailure as exc:
            if exc.code != _NAMESPACE_EXISTS:
                raise

    async def _ensure_index(self, name: str, index: IndexSpec) -> None:
        options: dict[str, Any] = {"name": index.name}
        if index.unique:
            options["unique"] = True
        if index.expire_after_seconds is not None:
            options["expireAfterSeconds"] = index.expire_after_seconds
        try:
            await self.raw(name).create_indexes([IndexModel(list(index.keys), **options)])
        except OperationFailure as exc:
            refused_ttl = exc.code == _NOT_IMPLEMENTED or "not implemented" in str(exc).lower()
            if index.expire_after_seconds is None or not refused_ttl:
                raise
            _log.warning(
                "server refused TTL index %s.%s; expired documents are purged by the store", name, index.name
            )
            del options["expireAfterSeconds"]
            await self.raw(name).create_indexes([IndexModel(list(index.keys), **options)])
            self._purged_by_us.add(name)

    async def updates_need_serialising(self) -> bool:
        """Tell whether the server applies updates non-atomically (FerretDB); asked once per store."""
        if self._serialise_updates is None:
            try:
                info = await self._client.admin.command("buildInfo")
            except PyMongoError as exc:
                raise _store_error("cannot reach the database", exc) from exc
            self._serialise_updates = "ferretdbVersion" in info
        return self._serialise_updates

    async def ping(self) -> None:
        """Raise StoreError when the server cannot be reached within the selection timeout."""
        try:
            await self._client.admin.command("ping")
        except PyMongoError as exc:
            raise _store_error("cannot reach the database", exc) from exc

    async def close(self) -> None:
        """Close the client's connection pools."""
        await self._client.close()


def _store_error(what: str, exc: PyMongoError) -> StoreError:
    """What callers are told: not sent (UNAVAILABLE, safe to retry), outcome unknown, or a plain error."""
    if isinstance(exc, ServerSelectionTimeoutError):
        return StoreUnavailable(f"{what}: {exc}")
    if isinstance(exc, ConnectionFailure) or exc.timeout:
        return StoreTimeout(f"{what}: {exc}")
    return StoreError(f"{what}: {exc}")


def _duplicate_index(exc: PyMongoError, spec: CollectionSpec) -> tuple[bool, str | None]:
    """Tell whether ``exc`` is a duplicate-key error, and the index it names when it names one."""
    details: dict[str, Any] = getattr(exc, "details", None) or {}
    message = str(details.get("errmsg") or exc)
    if getattr(exc, "code", None) == _DUPLICATE_KEY:
        # MongoDB: "... index: email_1 dup key: {...}" plus keyPattern; FerretDB: neither.
        if found := _MONGO_INDEX.search(message):
            return True, found.group(1)
        pattern = details.get("keyPattern")
        fields = list(pattern) if isinstance(pattern, dict) else []
        names = {("_id",): "_id_"} | {tuple(path for path, _ in i.keys): i.name for i in spec.indexes}
        return True, names.get(tuple(fields))
    if found := _SQLITE_INDEX.search(message):
        # FerretDB names SQLite indexes "<table>_<index>"; the longest declared name that fits wins.
        fitting = [i.name for i in spec.indexes if i.unique and found.group(1).endswith("_" + i.name)]
        return True, max(fitting, key=len, default=None)
    return False, None


class MongoCollection:
    """One MongoDB collection under the contract in ``base.py``."""

    def __init__(self, store: MongoStore, spec: CollectionSpec) -> None:
        """Bind ``spec`` to ``store``."""
        self._store = store
        self.spec = spec
        self._raw = store.raw(spec.name)
        self._ttl = [
            (i.keys[0][0], i.expire_after_seconds) for i in spec.indexes if i.expire_after_seconds is not None
        ]
        self._update_lock = asyncio.Lock()
        self._last_purge = float("-inf")

    @property
    def name(self) -> str:
        """Return the collection's name."""
        return self.spec.name

    # -- TTL -----------------------------------------------------------------------------------

    def _live(self, flt: Filter) -> dict[str, Any]:
        """Restrict ``flt`` to documents no TTL index has expired."""
        live: dict[str, Any] = dict(flt)
        now = datetime.now(UTC)
        for path, seconds in self._ttl:
            fresh = {"$not": {"$lte": now - timedelta(seconds=seconds)}}
            # Top level when free, so that an upsert still seeds the equality fields of ``flt``.
            live = {"$and": [live, {path: fresh}]} if path in live else {**live, path: fresh}
        return live

    def _expired(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {"$or": [{path: {"$lte": now - timedelta(seconds=seconds)}} for path, seconds in self._ttl]}

    async def _purge_if_due(self) -> None:
        if not self._store.purges_expired(self.name):
            return
        now = time.monotonic()
        if now - self._last_purge < _PURGE_INTERVAL_SECONDS:
            return
        self._last_purge = now
        await self._raw.delete_many(self._expired())

    async def _retrying_expired(self, write: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``write``; if it clashes with a unique key, delete expired documents and retry once."""
        try:
            return await write()
        except PyMongoError as exc:
            if not self._ttl or not _duplicate_index(exc, self.spec)[0]:
                raise
            if (await self._raw.delete_many(self._expired())).deleted_count == 0:
                raise
        return await write()

    # -- errors --------------------------------------------------------------------------------

    async def _translate(
        self, exc: PyMongoError, written: Callable[[], Awaitable[tuple[Document, bool]]]
    ) -> StoreError:
        """Map ``exc`` to a StoreError; ``written`` gives the document the write tried to store."""
        duplicate, index = _duplicate_index(exc, self.spec)
        if not duplicate:
            return _store_error(self.name, exc)
        if index is None:
            try:
                doc, is_new = await written()
                index = await self._clashing_index(doc, is_new=is_new)
            except (PyMongoError, StoreError, ValueError, KeyError):
                index = None
        return DuplicateKeyError(self.name, index or "unknown")

    async def _clashing_index(self, doc: Document, *, is_new: bool) -> str | None:
        """Find which unique index already holds a key of ``doc`` (for servers whose errors do not say)."""
        if is_new and await self._raw.find_one({"_id": doc["_id"]}, projection={"_id": 1}) is not None:
            return "_id_"
        for index in self.spec.indexes:
            if not index.unique:
                continue
            query: dict[str, Any] = {"_id": {"$ne": doc["_id"]}}
            for path, _direction in index.keys:
                found = [e for v in values_at(doc, path) for e in (v if isinstance(v, list) else [v])]
                query[path] = {"$in": found} if len(found) > 1 else (found[0] if found else None)
            if await self._raw.find_one(query, projection={"_id": 1}) is not None:
                return index.name
        return None

    @contextlib.asynccontextmanager
    async def _update_guard(self) -> AsyncIterator[None]:
        if await self._store.updates_need_serialising():
            async with self._update_lock:
                yield
        else:
            yield

    # -- the contract --------------------------------------------------------------------------

    async def insert(self, doc: Document) -> None:
        """Insert a new document; DuplicateKeyError names ``_id_`` or the unique index it broke."""
        if not isinstance(doc.get("_id"), str):
            raise ValueError("documents need a string _id")
        new = dict(doc)  # the driver would add fields to the caller's dict

        async def written() -> tuple[Document, bool]:
            return new, True

        try:
            await self._purge_if_due()
            await self._retrying_expired(lambda: self._raw.insert_one(dict(new)))
        except PyMongoError as exc:
            raise await self._translate(exc, written) from exc

    async def get(self, doc_id: str) -> Document | None:
        """Return the live document with this ``_id``, or None."""
        return await self.find_one({"_id": doc_id})

    async def find_one(self, flt: Filter) -> Document | None:
        """Return a live document matching ``flt``, or None."""
        try:
            return await self._raw.find_one(self._live(flt))
        except PyMongoError as exc:
            raise _store_error(self.name, exc) from exc

    async def find(self, flt: Filter, *, sort: Sort = (), limit: int = 0, skip: int = 0) -> list[Document]:
        """Return matches in ``sort`` order with ``_id`` as the final tiebreak."""
        order = list(sort)
        if not any(path == "_id" for path, _ in order):
            order.append(("_id", 1))
        try:
            return await self._raw.find(self._live(flt), sort=order, skip=skip, limit=limit).to_list()
        except PyMongoError as exc:
            raise _store_error(self.name, exc) from exc

    async def count(self, flt: Filter) -> int:
        """Count the live documents that match."""
        try:
            return await self._raw.count_documents(self._live(flt))
        except PyMongoError as exc:
            raise _store_error(self.name, exc) from exc

    async def update_one(self, flt: Filter, update: Update, *, upsert: bool = False) -> Document | None:
        """Apply ``update`` to a match and return the document after it (``find_one_and_update``)."""
        if upsert:
            update = _with_string_id(flt, update)

        async def attempt() -> Document | None:
            return await self._raw.find_one_and_update(
                self._live(flt), dict(update), upsert=upsert, return_document=ReturnDocument.AFTER
            )

        async def written() -> tuple[Document, bool]:
            before = await self._raw.find_one(self._live(flt))
            if before is not None:
                return apply_update(before, update), False
            return apply_update(upsert_seed(flt), update, inserting=True), True

        async with self._update_guard():
            try:
                await self._purge_if_due()
                return await self._retrying_expired(attempt)
            except PyMongoError as exc:
                raise await self._translate(exc, written) from exc

    async def update_many(self, flt: Filter, update: Update) -> int:
        """Apply ``update`` to every live match; return how many matched."""

        async def written() -> tuple[Document, bool]:
            # The server stops at the first clash; the first match that would clash is the one to name.
            for before in await self._raw.find(self._live(flt)).to_list():
                after = apply_update(before, update)
                if await self._clashing_index(after, is_new=False) is not None:
                    return after, False
            raise KeyError("no clashing document")

        async with self._update_guard():
            try:
                await self._purge_if_due()
                return (await self._raw.update_many(self._live(flt), dict(update))).matched_count
            except PyMongoError as exc:
                raise await self._translate(exc, written) from exc

    async def delete_one(self, flt: Filter) -> bool:
        """Delete a live match; True when one was deleted."""
        try:
            return (await self._raw.delete_one(self._live(flt))).deleted_count == 1
        except PyMongoError as exc:
            raise _store_error(self.name, exc) from exc

    async def delete_many(self, flt: Filter) -> int:
        """Delete every live match; return how many were deleted."""
        try:
            return (await self._raw.delete_many(self._live(flt))).deleted_count
        except PyMongoError as exc:
            raise _store_error(self.name, exc) from exc


def _with_string_id(flt: Filter, update: Update) -> Update:
    """Add a generated string ``_id`` on insert to ``update`` where neither it nor ``flt`` fixes one.

    MongoDB would otherwise give the new document an ObjectId, and the contract promises strings.
    """
    if (
        "_id" in upsert_seed(flt)
        or "_id" in update.get("$set", {})
        or "_id" in update.get("$setOnInsert", {})
    ):
        return update
    return {**update, "$setOnInsert": {**update.get("$setOnInsert", {}), "_id": uuid.uuid4().hex}}
