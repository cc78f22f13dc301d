"""The outbox: events written to the service's own store first, published by a relay.

A handler that changes state and must announce it calls ``await outbox.add(envelope)`` right
after its write. The entry is in the same database as the state, so a bus outage never fails the
request or loses the event: the relay publishes it once the bus answers. The store contract has no
multi-document transactions, so a crash *between* the state write and ``add`` loses the event;
producers close that gap by using deterministic event ids (``fact_id``) and re-adding on retry
(``add`` is idempotent on event_id), or by recording their intent first (see the user service's
deletion saga).

The relay publishes unsent entries in insertion order and marks them sent: at-least-once, so a
crash after publishing and before marking publishes again; consumers dedupe on event_id. A failed
publish is retried, from the same entry (order is kept), after a backoff doubling from
``retry_base_seconds`` to ``retry_max_seconds``.

Several worker processes share one outbox. Each relay publishes the entries its own process
added, woken at once by ``add``; entries of another process are left to it, unless they have been
waiting ``orphan_after_seconds`` (their process died or its relay is stuck): then any relay
publishes them. Without that rule every relay would poll and publish every entry, which would
duplicate most events and interleave their order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import time
from datetime import UTC, datetime, timedelta

from fittracker.events.v1 import events_pb2

from services.runtime.events.bus import EventBus, envelope_stream, stop_if_cancelled
from services.runtime.storage import CollectionSpec, DocumentStore, DuplicateKeyError, IndexSpec

__all__ = ["OUTBOX", "Outbox"]

log = logging.getLogger("fittracker.events.outbox")

#: How long a sent entry stays, for operators' inspection; unsent ones stay until sent.
SENT_TTL_SECONDS = 24 * 3600

OUTBOX = CollectionSpec(
    name="outbox",
    shard_key=("_id",),
    why="kept unsharded in practice: it is small (sent entries expire after a day) and the relay "
    "reads the whole unsent set; were it sharded, by _id (the event id) with scatter-gather relays",
    indexes=(
        IndexSpec("unsent", (("sent", 1),)),
        IndexSpec("sent_ttl", (("sent_at", 1),), expire_after_seconds=SENT_TTL_SECONDS),
    ),
)


class Outbox:
    """Events stored with the service's data and relayed to the bus."""

    def __init__(
        self,
        store: DocumentStore,
        bus: EventBus,
        *,
        poll_interval: float = 0.5,
        orphan_after_seconds: float = 10.0,
        retry_base_seconds: float = 0.1,
        retry_max_seconds: float = 10.0,
        batch_size: int = 100,
    ) -> None:
        """Keep entries in ``store``'s ``outbox`` collection and publish them on ``bus``."""
        self._store = store
        self._bus = bus
        self._entries = store.collection(OUTBOX)
        self._poll_interval = poll_interval
        self._orphan_after = orphan_after_seconds
        self._retry_base = retry_base_seconds
        self._retry_max = retry_max_seconds
        self._batch = batch_size
        self._owner = f"{socket.gethostname()}-{os.getpid()}"
        self._last_seq = 0
        self._wake = asyncio.Event()

    async def ensure(self) -> None:
        """Create the collection's indexes; idempotent, call it at start."""
        await self._store.ensure([OUTBOX])

    def _next_seq(self) -> int:
        # Nanoseconds since the epoch, forced to increase within the process even if the clock
        # steps back; across processes the order is the clocks' (their events are concurrent).
        self._last_seq = max(time.time_ns(), self._last_seq + 1)
        return self._last_seq

    async def add(self, envelope: events_pb2.EventEnvelope) -> bool:
        """Store ``envelope`` for publishing; True if added, False if its event_id was already there."""
        if not envelope.event_id or not envelope.producer:
            raise ValueError("an outbox entry needs an event_id and a producer (use make_envelope)")
        try:
            await self._entries.insert({
                "_id": envelope.event_id,
                "seq": self._next_seq(),
                "stream": envelope_stream(envelope),
                "event_type": envelope.event_type,
                "envelope": base64.b64encode(envelope.SerializeToString()).decode(),
                "owner": self._owner,
                "add_time": datetime.now(UTC),
                "sent": False,
            })
        except DuplicateKeyError as clash:
            if clash.index != "_id_":
                raise
            return False
        self._wake.set()
        return True

    async def relay(self) -> None:
        """Publish unsent entries forever (a background job for ``ServiceDefinition.background``)."""
        failures = 0
        ensured = False
        while True:
            stop_if_cancelled()
            self._wake.clear()
            try:
                if not ensured:
                    await self.ensure()  # inside the retry: a store still starting must not end the job
                    ensured = True
                published, full = await self.relay_once()
                failures = 0
            except Exception:
                failures += 1
                delay = min(self._retry_max, self._retry_base * 2 ** (failures - 1))
                log.warning("outbox relay failed; retrying in %.2fs", delay, exc_info=True)
                await asyncio.sleep(delay)
                continue
            if published and full:
                continue  # a full batch: more are probably waiting
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a coinciding cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()

    async def relay_once(self) -> tuple[int, bool]:
        """Publish one batch of due entries in order; return (how many, whether the batch was full).

        Raises what the bus or the store raised; the entries not yet marked sent stay unsent.
        """
        batch = await self._entries.find({"sent": False}, sort=[("seq", 1)], limit=self._batch)
        orphaned_before = datetime.now(UTC) - timedelta(seconds=self._orphan_after)
        published = 0
        for doc in batch:
            if doc.get("owner") != self._owner and doc["add_time"] > orphaned_before:
                continue  # its own process relays it
            envelope = events_pb2.EventEnvelope.FromString(base64.b64decode(doc["envelope"]))
            # publish_time says when it was really published, later than occur_time after a delay.
            envelope.publish_time.FromDatetime(datetime.now(UTC))
            await self._bus.publish(envelope)
            await self._entries.update_one({"_id": doc["_id"]}, {"$set": {"sent": True, "sent_at": datetime.now(UTC)}})
            published += 1
        return published, len(batch) == self._batch

    async def unsent(self) -> int:
        """How many entries wait to be published (all processes)."""
        return await self._entries.count({"sent": False})
