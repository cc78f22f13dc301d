"""Domain events between services: envelopes, the bus (Redis Streams or embedded), the outbox.

Producing::

    envelope = make_envelope("workout", user_id, events_pb2.SessionCompleted(...),
                             event_id=fact_id("workout.session_completed", session_name))
    await outbox.add(envelope)          # or: await resources.events.publish(envelope)

Consuming (in a service's ``build``)::

    job = resources.events.consumer("analytics", [stream_of("workout")], handle, resources.store)
    return ServiceDefinition(..., background=[job, outbox.relay])

``handle`` receives every envelope of the streams (route on ``envelope.WhichOneof("payload")``,
ignore the rest); it must be idempotent, and raising makes the entry be retried and, after
``max_deliveries`` attempts, dead-lettered. ``bus.py`` explains the delivery guarantees.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from services.runtime.events.bus import (
    HANDLED_EVENTS,
    BusTuning,
    DeadLetter,
    EventBus,
    EventMetrics,
    Handler,
    Job,
    dead_letter_stream,
    stop_if_cancelled,
)
from services.runtime.events.embedded import EmbeddedBus
from services.runtime.events.envelope import SERVICE_STREAMS, fact_id, make_envelope, stream_of, trace_carrier
from services.runtime.events.erasure import Eraser, EventSink, UserDeletedHandler, data_erased
from services.runtime.events.outbox import OUTBOX, Outbox
from services.runtime.events.redis_streams import RedisStreamsBus
from services.runtime.settings import Settings

__all__ = [
    "HANDLED_EVENTS",
    "OUTBOX",
    "SERVICE_STREAMS",
    "BusTuning",
    "DeadLetter",
    "EmbeddedBus",
    "Eraser",
    "EventBus",
    "EventMetrics",
    "EventSink",
    "Handler",
    "Job",
    "Outbox",
    "RedisStreamsBus",
    "UserDeletedHandler",
    "data_erased",
    "dead_letter_stream",
    "fact_id",
    "make_envelope",
    "open_bus",
    "stop_if_cancelled",
    "stream_of",
    "trace_carrier",
]

#: The embedded event log's file in ``data_dir``, shared by every service of the machine.
EVENTS_FILE = "events.sqlite3"


def open_bus(
    settings: Settings, redis: aioredis.Redis | None, *, registry: CollectorRegistry | None = None
) -> EventBus:
    """Redis Streams when Redis is configured, else the embedded log in ``data_dir/events.sqlite3``.

    ``registry`` receives the bus's Prometheus counters (pass the process's ``Metrics.registry``).
    """
    metrics = EventMetrics(registry)
    idle = settings.events_claim_idle_seconds
    tuning = BusTuning(claim_idle_seconds=idle, claim_interval_seconds=min(BusTuning.claim_interval_seconds, idle / 4))
    if redis is not None:
        return RedisStreamsBus(redis, tuning=tuning, metrics=metrics)
    return EmbeddedBus(settings.data_dir / EVENTS_FILE, tuning=tuning, metrics=metrics)
