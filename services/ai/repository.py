"""Where plans are kept: the ``plans`` collection.

A document holds the plan as the contract's message in proto-JSON form (``plan``) beside the
fields queries need: the owner, the creation time, the revision (for optimistic concurrency), the
days already judged by AdaptPlan (``assessed``) and the time zone the plan's dates are in.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from fittracker.ai.v1 import ai_pb2
from google.protobuf import json_format

from services.runtime.storage import CollectionSpec, Document, DocumentStore, DuplicateKeyError, IndexSpec

PLANS = CollectionSpec(
    name="plans",
    shard_key=("user_id", "_id"),
    why="every query names one user (list their plans, read or adapt one, erase them all), so each "
    "targets the one shard holding that user's plans; _id spreads a prolific user's plans",
    indexes=(IndexSpec("user_newest", (("user_id", 1), ("create_time", -1), ("_id", -1))),),
)
#: The most plans one user may keep.
MAX_PLANS_PER_USER = 20


def plan_to_document(plan: ai_pb2.Plan) -> dict[str, Any]:
    """The plan message as a storable dict (proto-JSON with field names as in the contract)."""
    return json_format.MessageToDict(plan, preserving_proto_field_name=True)


def document_to_plan(doc: Document) -> ai_pb2.Plan:
    """The stored plan as the contract's message, with its etag."""
    plan = json_format.ParseDict(doc["plan"], ai_pb2.Plan(), ignore_unknown_fields=True)
    plan.etag = etag_of(doc)
    return plan


def etag_of(doc: Document) -> str:
    """A checksum of the stored plan that changes with every revision."""
    body = json.dumps({"plan": doc["plan"], "revision": doc["revision"], "update_time": doc["update_time"]},
                      default=str, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class PlanRepository:
    """Reads and writes plan documents."""

    def __init__(self, store: DocumentStore) -> None:
        """Use ``store``'s ``plans`` collection."""
        self._store = store
        self._plans = store.collection(PLANS)

    async def ensure(self) -> None:
        """Create the indexes."""
        await self._store.ensure([PLANS])

    async def create(self, doc: Document) -> tuple[Document, bool]:
        """Insert a new plan; a clash on ``_id`` (a retried request) returns the stored one."""
        try:
            await self._plans.insert(doc)
        except DuplicateKeyError:
            existing = await self._plans.get(doc["_id"])
            if existing is None or existing["user_id"] != doc["user_id"]:
                raise
            return existing, False
        return doc, True

    async def get(self, user_id: str, plan_id: str) -> Document | None:
        """The plan ``plan_id`` of ``user_id``."""
        doc = await self._plans.get(plan_id)
        return doc if doc is not None and doc["user_id"] == user_id else None

    async def count(self, user_id: str) -> int:
        """How many plans the user has."""
        return await self._plans.count({"user_id": user_id})

    async def page(self, user_id: str, limit: int, after: tuple[datetime, str] | None) -> list[Document]:
        """Up to ``limit`` plans, newest first, after the (create_time, id) of the previous page's last."""
        query: dict[str, Any] = {"user_id": user_id}
        if after is not None:
            created, plan_id = after
            query["$or"] = [{"create_time": {"$lt": created}}, {"create_time": created, "_id": {"$lt": plan_id}}]
        return await self._plans.find(query, sort=[("create_time", -1), ("_id", -1)], limit=limit)

    async def replace(self, doc: Document, revision: int) -> Document | None:
        """Store ``doc`` if the stored revision is still ``revision``; None when another write won."""
        changes = {k: v for k, v in doc.items() if k != "_id"}
        return await self._plans.update_one({"_id": doc["_id"], "revision": revision}, {"$set": changes})

    async def erase_user(self, user_id: str) -> int:
        """Delete every plan of the user; how many were deleted."""
        return await self._plans.delete_many({"user_id": user_id})
