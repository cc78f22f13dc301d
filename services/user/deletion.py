"""Account deletion as a saga: announce it, wait for every service's erasure, recover from crashes.

The user service deletes the account and its sessions itself; the data other services hold is
erased by them when UserDeleted reaches them, each answering DataErased (see
``services.runtime.events.erasure``). ``DeletionSaga`` keeps track of those answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, timedelta

from fittracker.events.v1 import events_pb2

from services.runtime.events import EventBus, Job, Outbox, fact_id, make_envelope, stop_if_cancelled, stream_of
from services.runtime.settings import ServiceName
from services.runtime.storage import CollectionSpec, Document, DocumentStore, IndexSpec
from services.runtime.timeutil import now
from services.user.repository import UserRepository

log = logging.getLogger("fittracker.user.deletion")

#: The services holding user data: each answers UserDeleted with DataErased.
ERASING_SERVICES: tuple[ServiceName, ...] = ("workout", "ai", "notification", "analytics")
#: The consumer group of the user service (it consumes DataErased).
EVENTS_GROUP = "user"


DELETIONS = CollectionSpec(
    name="deletions",
    shard_key=("_id",),
    why="a saga is read and updated by its deletion_request_id; the user_id and status lookups "
    "(a retried deletion, the recovery sweep) are rare and may scatter",
    indexes=(IndexSpec("user_id", (("user_id", 1),)), IndexSpec("status", (("status", 1),))),
)


class DeletionSaga:
    """The user side of account deletion: announce it, then record which services have erased.

    A saga document in ``deletions`` goes through three states:

    - ``deleting``: written before anything is deleted, with a new deletion_request_id. The
      account's tokens are revoked and the account deleted; UserDeleted waits ``erasure_delay``
      seconds, so that every call that passed the token check before the revocation reached its
      replica (the revocation bound plus the longest call) has finished writing before the
      services erase: a write racing the deletion is erased with the rest;
    - ``erasing``: the account is gone and UserDeleted is in the outbox (event id
      ``fact_id("user.deleted", user_id, deletion_request_id)``), so the relay publishes it;
    - ``complete``: every service in ``expected_services`` answered with DataErased
      (``answers`` maps each service to its erase time).

    How it survives failures, step by step:

    - A crash after ``deleting`` but before the account is deleted: the client's retried
      DeleteUser finds the same saga (``begin`` reuses it). If nobody retries, ``recover`` marks it
      ``abandoned`` once ``recover_after_seconds`` have passed with the account still there.
    - A crash after the account is deleted but before UserDeleted reached the outbox: nothing
      would announce it, so ``recover`` adds it for sagas stuck in ``deleting`` whose account is
      gone. ``recover_after_seconds`` exceeds the longest call deadline, so it never races a
      DeleteUser still in progress.
    - UserDeleted and DataErased travel at-least-once (outbox relay, consumer groups with retries,
      reclaim and dead letters), so each may arrive more than once. Each service erases
      idempotently (deleting what is left of a user twice deletes nothing the second time) and
      may answer twice; recording an answer is a ``$set`` of the same value, so repeats are harmless.
    - A service that is down answers when it is back: its group's entries wait in the stream.
      A saga still ``erasing`` long after its request_time names the services that never answered.
    """

    def __init__(
        self,
        store: DocumentStore,
        users: UserRepository,
        outbox: Outbox,
        *,
        expected_services: tuple[str, ...] = ERASING_SERVICES,
        erasure_delay_seconds: float = 0.0,
        recover_after_seconds: float = 120.0,
        recover_interval_seconds: float = 30.0,
    ) -> None:
        """Keep sagas in ``store``'s ``deletions`` collection and announce them through ``outbox``."""
        self._store = store
        self._sagas = store.collection(DELETIONS)
        self._users = users
        self._outbox = outbox
        self._expected = expected_services
        self._erasure_delay = erasure_delay_seconds
        # Never before the delayed announcement was due: recovery must not cut the delay short.
        self._recover_after = timedelta(seconds=max(recover_after_seconds, 2 * erasure_delay_seconds))
        self._recover_interval = recover_interval_seconds
        self._due: asyncio.Queue[tuple[float, Document]] = asyncio.Queue()

    async def ensure(self) -> None:
        """Create the collection's indexes."""
        await self._store.ensure([DELETIONS])

    async def get(self, deletion_request_id: str) -> Document | None:
        """The saga document, or None."""
        return await self._sagas.get(deletion_request_id)

    async def begin(self, user_id: str) -> Document:
        """The saga that deletes ``user_id``: one left unfinished by an earlier attempt, or a new one."""
        existing = await self._sagas.find_one({"user_id": user_id, "status": "deleting"})
        if existing is not None:
            return existing
        saga: Document = {
            "_id": uuid.uuid4().hex,
            "user_id": user_id,
            "expected_services": list(self._expected),
            "answers": {},
            "status": "deleting",
            "request_time": now(),
        }
        await self._sagas.insert(saga)
        return saga

    def announce_later(self, saga: Document) -> None:
        """Announce ``saga`` once the erasure delay has passed (``announcer`` does it)."""
        self._due.put_nowait((time.monotonic() + self._erasure_delay, saga))

    async def announcer(self) -> None:
        """Background job: announce sagas as their delay ends (one delay for all, so in order)."""
        while True:
            due, saga = await self._due.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                await self.announce(saga)
            except Exception:
                # Still ``deleting`` with the account gone: ``recover`` announces it later.
                log.exception("announcing a deletion failed; recovery will retry",
                              extra={"fields": {"deletion_request_id": saga["_id"]}})

    async def announce(self, saga: Document) -> None:
        """Put UserDeleted in the outbox and move the saga to ``erasing``; idempotent."""
        request_id = saga["_id"]
        await self._outbox.add(
            make_envelope(
                "user",
                saga["user_id"],
                events_pb2.UserDeleted(deletion_request_id=request_id, expected_services=saga["expected_services"]),
                event_id=fact_id("user.deleted", saga["user_id"], request_id),
            )
        )
        await self._sagas.update_one(
            {"_id": request_id, "status": "deleting"}, {"$set": {"status": "erasing", "announce_time": now()}}
        )

    async def on_event(self, envelope: events_pb2.EventEnvelope) -> None:
        """Record a DataErased answer (the handler of group "user"); other events are ignored."""
        if envelope.WhichOneof("payload") != "data_erased":
            return
        erased = envelope.data_erased
        service = erased.service or envelope.producer
        saga = await self._sagas.get(erased.deletion_request_id)
        fields = {"deletion_request_id": erased.deletion_request_id, "service": service}
        if saga is None or envelope.user != f"users/{saga['user_id']}":
            log.warning("DataErased answers no known deletion; ignored", extra={"fields": fields})
            return
        erase_time = erased.erase_time if erased.HasField("erase_time") else envelope.occur_time
        updated = await self._sagas.update_one(
            {"_id": saga["_id"]}, {"$set": {f"answers.{service}": erase_time.ToDatetime(tzinfo=UTC)}}
        )
        answered = set((updated or saga).get("answers", {}))
        waiting = sorted(set(saga["expected_services"]) - answered)
        log.info("data erased", extra={"fields": {**fields, "waiting_for": waiting}})
        if not waiting:
            await self._sagas.update_one(
                {"_id": saga["_id"], "status": {"$ne": "complete"}},
                {"$set": {"status": "complete", "complete_time": now()}},
            )

    def consumer(self, bus: EventBus, store: DocumentStore) -> Job:
        """The background job consuming DataErased from every service that erases data."""
        return bus.consumer(EVENTS_GROUP, [stream_of(s) for s in self._expected], self.on_event, store)

    async def recover(self) -> None:
        """Background job: finish sagas a crash interrupted (see the class docstring)."""
        while True:
            # A periodic sweep, not synchronisation: interrupted sagas are rare and not urgent.
            await asyncio.sleep(self._recover_interval)
            stop_if_cancelled()
            try:
                await self.recover_once()
            except Exception:
                log.exception("deletion recovery failed; will try again")

    async def recover_once(self) -> int:
        """Announce or abandon sagas stuck in ``deleting``; return how many were announced."""
        stuck = await self._sagas.find(
            {"status": "deleting", "request_time": {"$lte": now() - self._recover_after}}, limit=100
        )
        announced = 0
        for saga in stuck:
            if await self._users.get(saga["user_id"]) is not None:
                await self._sagas.update_one(
                    {"_id": saga["_id"], "status": "deleting"}, {"$set": {"status": "abandoned"}}
                )
                continue
            await self.announce(saga)
            announced += 1
        return announced
