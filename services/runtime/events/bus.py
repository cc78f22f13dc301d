"""The event bus contract, and the consumer loop both implementations share.

A consumer belongs to a group; the group's consumers share the entries of its streams, and every
group gets every entry. Delivery is at-least-once, per entry:

1. The entry is read (or claimed) and becomes *pending* for this consumer, with a delivery count.
2. Already handled? (``handled_events`` holds ``group:event_id`` for a few days.) Then ack, done.
3. The handler runs inside a consumer span that continues the envelope's trace. On success the
   event id is recorded as handled and the entry acknowledged, in that order: a crash between the
   two redelivers an entry that step 2 then skips.
4. On failure the entry stays pending and this consumer claims it again after a backoff
   (``retry_base_seconds`` doubling up to ``retry_max_seconds``). The attempt that reaches
   ``max_deliveries`` moves it to the dead-letter stream ``<stream>.dead`` with the error, and
   acknowledges it.
5. Entries pending longer than ``claim_idle_seconds`` (their consumer died, or was cancelled
   mid-handler) are claimed by whichever consumer of the group looks next, every
   ``claim_interval_seconds``. An entry claimed more than ``max_deliveries`` times (a poison event
   that crashes its consumer) goes straight to the dead letters.

Order holds within a stream for entries handled first time; a retried entry is handled after the
ones behind it. Handlers must be idempotent (step 2 makes duplicates rare, not impossible: a slow
handler outliving ``claim_idle_seconds`` is run again by the consumer that reclaims its entry).

Payloads a consumer's schema does not know (an unset oneof: a newer producer) are acknowledged
without calling the handler, as the contract asks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from fittracker.events.v1 import events_pb2
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.runtime.events.envelope import stream_of, trace_carrier
from services.runtime.storage import Collection, CollectionSpec, DocumentStore, DuplicateKeyError, IndexSpec

__all__ = [
    "HANDLED_EVENTS",
    "BusTuning",
    "DeadLetter",
    "Delivery",
    "EventBus",
    "EventMetrics",
    "Handler",
    "Job",
    "StreamBus",
    "stop_if_cancelled",
]

log = logging.getLogger("fittracker.events")

#: What a consumer calls for each event; it must be idempotent.
Handler = Callable[[events_pb2.EventEnvelope], Awaitable[None]]
#: A background job, as ``ServiceDefinition.background`` takes them: each call runs one consumer.
Job = Callable[[], Coroutine[Any, Any, None]]

#: How long a handled event id is remembered: far longer than any redelivery takes (a reclaim
#: happens within minutes); a replay after that is caught by the handlers' own idempotence.
HANDLED_TTL_SECONDS = 3 * 24 * 3600

HANDLED_EVENTS = CollectionSpec(
    name="handled_events",
    shard_key=("_id",),
    why="each lookup and insert addresses one (group, event id) pair by its _id",
    indexes=(IndexSpec("handled_ttl", (("handled_at", 1),), expire_after_seconds=HANDLED_TTL_SECONDS),),
)

_PROPAGATOR = TraceContextTextMapPropagator()
#: Backoff after an infrastructure failure of the loop itself (Redis or the store unreachable).
_LOOP_BACKOFF_START = 0.1
_LOOP_BACKOFF_MAX = 5.0


def stop_if_cancelled() -> None:
    """Raise CancelledError if the current task was asked to stop, even if the request got lost.

    On Python 3.11, ``asyncio.wait_for`` returns normally when a cancellation arrives as its inner
    operation completes (fixed in 3.12), and redis-py wraps every command send in it once a
    ``socket_timeout`` is set (redis-py 8 sets 5 s by default). The request still counts in
    ``Task.cancelling()``, so a long-running loop that checks this on each turn stops anyway;
    without it, a service's shutdown could wait forever for its consumers.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class EventBus(Protocol):
    """Publishes envelopes to their producer's stream and runs consumer groups over streams."""

    async def publish(self, envelope: events_pb2.EventEnvelope) -> str:
        """Append ``envelope`` to ``stream_of(envelope.producer)``; return the entry id."""
        ...

    def consumer(
        self,
        group: str,
        streams: Sequence[str],
        handler: Handler,
        store: DocumentStore,
        *,
        max_deliveries: int = 5,
    ) -> Job:
        """A background job consuming ``streams`` as one consumer of ``group``.

        ``store`` keeps the handled event ids (collection ``handled_events``). Run the job with
        ``ServiceDefinition.background``; it runs until cancelled.
        """
        ...

    async def close(self) -> None:
        """Release what the bus holds (not a Redis client it was given)."""
        ...


@dataclass(frozen=True)
class BusTuning:
    """Timings of the consumer loop; the defaults suit production, tests shorten them."""

    #: An entry pending this long is taken to be abandoned and may be claimed by another consumer.
    #: Must exceed the longest a handler runs, or slow handlers run twice.
    claim_idle_seconds: float = 60.0
    #: How often a consumer looks for abandoned entries.
    claim_interval_seconds: float = 5.0
    #: The first retry of a failed entry waits this long; each further retry twice as long.
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 30.0
    #: Entries read per round trip.
    batch_size: int = 32
    #: Longest a consumer waits for new entries before it looks at retries and reclaims again.
    block_seconds: float = 1.0

    def retry_delay(self, deliveries: int) -> float:
        """The wait before the next attempt of an entry that failed on delivery ``deliveries``."""
        return float(min(self.retry_max_seconds, self.retry_base_seconds * 2 ** max(0, deliveries - 1)))


class EventMetrics:
    """Prometheus counters of one bus: events published, and consumed by outcome per group."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Register on ``registry`` (the process's, from ``Metrics.registry``), or a private one."""
        self.registry = registry or CollectorRegistry()
        self.published = Counter(
            "events_published", "Event envelopes appended to a stream.", ["stream"], registry=self.registry
        )
        self.consumed = Counter(
            "events_consumed",
            "Deliveries a consumer group finished, by outcome: handled, failed (will be retried), "
            "dead_lettered, duplicate (already handled), skipped (unknown payload), lost (trimmed).",
            ["group", "stream", "outcome"],
            registry=self.registry,
        )
        # Sampled by each consumer every claim interval; replicas of a group report the same
        # figure, so dashboards and alerts take the max per group and stream.
        self.lag = Gauge(
            "events_consumer_lag",
            "Entries of a stream that a consumer group has not acknowledged yet (unread plus pending).",
            ["group", "stream"],
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "events_dead_letters", "Entries waiting in a stream's dead-letter stream.", ["stream"],
            registry=self.registry,
        )


@dataclass
class Delivery:
    """One delivery of a stream entry to a consumer."""

    stream: str
    entry_id: str
    #: The serialized envelope; None when the entry was trimmed away while pending.
    body: bytes | None
    #: How many times the entry has been delivered, this delivery included.
    deliveries: int


@dataclass(frozen=True)
class DeadLetter:
    """An entry moved to ``<stream>.dead`` after it failed ``deliveries`` times."""

    #: The id of the dead-letter entry itself.
    dead_entry_id: str
    #: The stream and entry id it came from.
    stream: str
    entry_id: str
    group: str
    error: str
    deliveries: int
    #: The serialized envelope, as it was in the stream (empty when it could not be read).
    body: bytes

    def envelope(self) -> events_pb2.EventEnvelope | None:
        """The envelope, or None when the body does not decode (why it may have died)."""
        try:
            return events_pb2.EventEnvelope.FromString(self.body)
        except DecodeError:
            return None


@dataclass
class ConsumerState:
    """One running consumer: what it consumes and the entries it will retry."""

    group: str
    streams: tuple[str, ...]
    handler: Handler
    store: DocumentStore
    handled: Collection
    max_deliveries: int
    name: str
    #: (stream, entry id) -> (monotonic time of the next attempt, seconds waited since the failure).
    retries: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    next_reclaim: float = 0.0
    #: Implementation-specific cursors and flags.
    extra: dict[str, Any] = field(default_factory=dict)


class StreamBus(ABC):
    """The shared consumer loop; subclasses supply the stream primitives (Redis or SQLite)."""

    #: The ``messaging.system`` span attribute.
    system = "unknown"

    def __init__(self, tuning: BusTuning | None, metrics: EventMetrics | None) -> None:
        """Keep the tuning and metrics; consumer names are ``host-pid-n``, unique per process."""
        self.tuning = tuning or BusTuning()
        self.metrics = metrics or EventMetrics()
        self._names = itertools.count(1)
        self._name_prefix = f"{socket.gethostname()}-{os.getpid()}"

    # --- the contract -----------------------------------------------------------------------

    @abstractmethod
    async def publish(self, envelope: events_pb2.EventEnvelope) -> str:
        """Append ``envelope`` to its producer's stream; return the entry id."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the bus holds."""

    def consumer(
        self,
        group: str,
        streams: Sequence[str],
        handler: Handler,
        store: DocumentStore,
        *,
        max_deliveries: int = 5,
    ) -> Job:
        """A background job consuming ``streams`` in ``group`` (see the module docstring)."""
        if not group or not streams:
            raise ValueError("a consumer needs a group and at least one stream")
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        wanted = tuple(dict.fromkeys(streams))

        async def job() -> None:
            state = ConsumerState(
                group=group,
                streams=wanted,
                handler=handler,
                store=store,
                handled=store.collection(HANDLED_EVENTS),
                max_deliveries=max_deliveries,
                name=f"{self._name_prefix}-{next(self._names)}",
            )
            await self._run(state)

        return job

    # --- what an implementation provides -------------------------------------------------------

    @abstractmethod
    async def _prepare(self, state: ConsumerState) -> None:
        """Create the group on each stream (from the start, idempotently)."""

    @abstractmethod
    async def _fetch(self, state: ConsumerState, wait_seconds: float) -> list[Delivery]:
        """New entries for this consumer, waiting up to ``wait_seconds`` for some."""

    @abstractmethod
    async def _claim(self, state: ConsumerState, stream: str, entry_id: str, min_idle: float) -> Delivery | None:
        """Take one pending entry again if it has been idle ``min_idle`` seconds; None if not."""

    @abstractmethod
    async def _reclaim(self, state: ConsumerState) -> list[Delivery]:
        """Claim entries of the group pending longer than ``claim_idle_seconds``."""

    @abstractmethod
    async def _ack(self, state: ConsumerState, delivery: Delivery) -> None:
        """Acknowledge: the entry is no longer pending."""

    @abstractmethod
    async def _dead_letter(self, state: ConsumerState, delivery: Delivery, error: str) -> None:
        """Append the entry to ``<stream>.dead`` with ``error`` and acknowledge it, atomically."""

    @abstractmethod
    async def backlog(self, group: str, streams: Sequence[str]) -> int:
        """Entries of ``streams`` that ``group`` has not acknowledged yet (unread plus pending)."""

    @abstractmethod
    async def dead_letter_count(self, stream: str) -> int:
        """How many entries wait in ``stream``'s dead-letter stream."""

    @abstractmethod
    async def _release(self, state: ConsumerState) -> None:
        """Tidy up after the consumer stopped (also after it was cancelled)."""

    # --- the loop ---------------------------------------------------------------------------------

    async def _run(self, state: ConsumerState) -> None:
        backoff = _LOOP_BACKOFF_START
        prepared = False
        try:
            while True:
                stop_if_cancelled()
                try:
                    if not prepared:
                        await state.store.ensure([HANDLED_EVENTS])
                        await self._prepare(state)
                        prepared = True
                    await self._cycle(state)
                    backoff = _LOOP_BACKOFF_START
                except Exception:
                    # The bus or the store is unreachable: keep the service up and try again later.
                    # Entries taken but not finished stay pending and are reclaimed.
                    log.exception("event consumer failed; retrying", extra={"fields": {"group": state.group}})
                    # Prepared again before the next try: a Redis that restarted without its data
                    # has lost the groups, and every read would fail with NOGROUP until they exist.
                    prepared = False
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _LOOP_BACKOFF_MAX)
        finally:
            await self._release(state)

    async def _cycle(self, state: ConsumerState) -> None:
        """Retries that are due, then abandoned entries when it is time, then new entries."""
        tuning = self.tuning
        now = time.monotonic()
        for key, (due, waited) in sorted(state.retries.items(), key=lambda item: item[1][0]):
            if due > now:
                break
            del state.retries[key]
            # Only if still idle since the failure: another consumer may have reclaimed it meanwhile.
            delivery = await self._claim(state, key[0], key[1], min_idle=waited)
            if delivery is not None:
                await self._deliver(state, delivery)
        if now >= state.next_reclaim:
            state.next_reclaim = now + tuning.claim_interval_seconds
            for delivery in await self._reclaim(state):
                await self._deliver(state, delivery)
            await self._sample_backlog(state)
        now = time.monotonic()
        wake = min([state.next_reclaim, *(due for due, _ in state.retries.values())])
        for delivery in await self._fetch(state, max(0.0, min(tuning.block_seconds, wake - now))):
            await self._deliver(state, delivery)

    async def _sample_backlog(self, state: ConsumerState) -> None:
        """Set the lag and dead-letter gauges of this consumer's streams."""
        for stream in state.streams:
            self.metrics.lag.labels(state.group, stream).set(await self.backlog(state.group, (stream,)))
            self.metrics.dead_letters.labels(stream).set(await self.dead_letter_count(stream))

    def _count(self, state: ConsumerState, delivery: Delivery, outcome: str) -> None:
        self.metrics.consumed.labels(state.group, delivery.stream, outcome).inc()

    async def _deliver(self, state: ConsumerState, delivery: Delivery) -> None:
        """Handle one delivery (steps 2-4 of the module docstring)."""
        fields: dict[str, object] = {"group": state.group, "stream": delivery.stream, "entry_id": delivery.entry_id}
        if delivery.body is None:
            log.error("pending entry was trimmed from its stream before it was handled", extra={"fields": fields})
            await self._ack(state, delivery)
            self._count(state, delivery, "lost")
            return
        try:
            envelope = events_pb2.EventEnvelope.FromString(delivery.body)
        except DecodeError as error:
            await self._dead_letter(state, delivery, f"undecodable envelope: {error}")
            self._count(state, delivery, "dead_lettered")
            log.error("undecodable entry dead-lettered", extra={"fields": fields})
            return
        if envelope.WhichOneof("payload") is None:
            await self._ack(state, delivery)
            self._count(state, delivery, "skipped")
            return
        key = f"{state.group}:{envelope.event_id}"
        if await state.handled.get(key) is not None:
            await self._ack(state, delivery)
            self._count(state, delivery, "duplicate")
            return
        fields |= {"event_id": envelope.event_id, "event_type": envelope.event_type, "deliveries": delivery.deliveries}
        tracer = trace.get_tracer("fittracker.events")
        with tracer.start_as_current_span(
            f"process {delivery.stream}",
            context=_PROPAGATOR.extract(trace_carrier(envelope)),
            kind=SpanKind.CONSUMER,
            record_exception=False,
            set_status_on_exception=False,
            attributes={
                "messaging.system": self.system,
                "messaging.operation.type": "process",
                "messaging.destination.name": delivery.stream,
                "messaging.consumer.group.name": state.group,
                "messaging.message.id": envelope.event_id,
            },
        ) as span:
            if delivery.deliveries > state.max_deliveries:
                # Claimed again and again without an answer: it kills its consumers. Do not run it.
                reason = f"delivered {delivery.deliveries} times without being handled (consumer crashed?)"
                await self._dead_letter(state, delivery, reason)
                self._count(state, delivery, "dead_lettered")
                log.error("event dead-lettered: %s", reason, extra={"fields": fields})
                return
            try:
                await state.handler(envelope)
                await _remember(state, envelope)
            except Exception as failure:
                span.record_exception(failure)
                span.set_status(Status(StatusCode.ERROR, type(failure).__name__))
                if delivery.deliveries >= state.max_deliveries:
                    await self._dead_letter(state, delivery, f"{type(failure).__name__}: {failure}")
                    self._count(state, delivery, "dead_lettered")
                    log.exception("event handler failed; dead-lettered", extra={"fields": fields})
                else:
                    delay = self.tuning.retry_delay(delivery.deliveries)
                    state.retries[(delivery.stream, delivery.entry_id)] = (time.monotonic() + delay, delay)
                    self._count(state, delivery, "failed")
                    log.warning("event handler failed; will retry", exc_info=True, extra={"fields": fields})
                return
        await self._ack(state, delivery)
        self._count(state, delivery, "handled")


async def _remember(state: ConsumerState, envelope: events_pb2.EventEnvelope) -> None:
    """Record that the group handled this event id."""
    try:
        await state.handled.insert({
            "_id": f"{state.group}:{envelope.event_id}",
            "group": state.group,
            "event_id": envelope.event_id,
            "event_type": envelope.event_type,
            "handled_at": datetime.now(UTC),
        })
    except DuplicateKeyError:
        pass  # another consumer of the group handled a redelivery at the same time: same outcome


def dead_letter_stream(stream: str) -> str:
    """Where ``stream``'s dead letters go."""
    return f"{stream}.dead"


def envelope_stream(envelope: events_pb2.EventEnvelope) -> str:
    """The stream an envelope is published on: its producer's."""
    return stream_of(envelope.producer)
