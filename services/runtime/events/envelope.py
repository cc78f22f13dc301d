"""Building event envelopes: ids, the payload oneof, times, streams and trace context.

Every event travels in a ``fittracker.events.v1.EventEnvelope`` (see its file comment in
``proto/fittracker/events/v1/events.proto``). ``make_envelope`` fills the envelope from a payload
message and the current OpenTelemetry context, so a consumer continues the producer's trace.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime

from fittracker.events.v1 import events_pb2
from google.protobuf.message import Message
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.runtime.settings import SERVICES

__all__ = [
    "SERVICE_STREAMS",
    "fact_id",
    "make_envelope",
    "stream_of",
    "trace_carrier",
]

#: Namespace of ``fact_id``: fixed forever, or every deterministic event id would change.
FACT_NAMESPACE = uuid.UUID("b3f8c1d2-5e7a-4c9b-8f60-2d41a7e9c035")
#: The field group of EventEnvelope holding the payload.
_PAYLOAD_ONEOF = events_pb2.EventEnvelope.DESCRIPTOR.oneofs_by_name["payload"]
#: Payload message full name -> the envelope field that carries it.
_PAYLOAD_FIELDS: dict[str, str] = {
    f.message_type.full_name: f.name for f in _PAYLOAD_ONEOF.fields if f.message_type is not None
}
#: The contract's rule for the envelope's user ("users/{user}"), checked here so a bad id fails
#: at the producer rather than in every consumer.
_USER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PRODUCER = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
#: W3C Trace Context only: the envelope has fields for traceparent and tracestate, nothing else.
_PROPAGATOR = TraceContextTextMapPropagator()


def stream_of(producer: str) -> str:
    """The stream ``producer`` publishes on, e.g. "events.workout"; consumers subscribe to it."""
    if not _PRODUCER.fullmatch(producer):
        raise ValueError(f"invalid producer name {producer!r}")
    return f"events.{producer}"


#: The stream of every service, for consumers that listen to all of them.
SERVICE_STREAMS: tuple[str, ...] = tuple(stream_of(s) for s in SERVICES)


def fact_id(*parts: str) -> str:
    """A deterministic event id (UUID v5) for a fact that may be produced more than once.

    The same parts always give the same id, so a retried operation publishes an event that
    consumers recognise as already handled. Name the fact first, e.g.
    ``fact_id("workout.session_completed", session_name)``.
    """
    if not parts:
        raise ValueError("fact_id needs at least one part")
    # JSON keeps the parts apart unambiguously: ("a:b", "c") and ("a", "b:c") differ.
    return str(uuid.uuid5(FACT_NAMESPACE, json.dumps(list(parts), separators=(",", ":"))))


def trace_carrier(envelope: events_pb2.EventEnvelope) -> dict[str, str]:
    """The envelope's W3C trace headers as a carrier for ``TraceContextTextMapPropagator``."""
    carrier = {"traceparent": envelope.traceparent} if envelope.traceparent else {}
    if envelope.traceparent and envelope.tracestate:
        carrier["tracestate"] = envelope.tracestate
    return carrier


def make_envelope(
    producer: str,
    user_id: str,
    payload: Message,
    *,
    event_id: str | None = None,
    occur_time: datetime | None = None,
    schema_version: int = 1,
) -> events_pb2.EventEnvelope:
    """Wrap ``payload`` (one of the envelope's payload messages) in a complete envelope.

    ``user_id`` is the bare id (a "users/" prefix is accepted too). ``event_id`` defaults to a
    random UUID; pass ``fact_id(...)`` for facts that may be produced twice. ``occur_time``
    defaults to now, and ``publish_time`` is set to now (the outbox relay restamps it when it
    publishes). The current OpenTelemetry span becomes the envelope's traceparent/tracestate.
    Raises ValueError for a payload type the envelope cannot carry or an invalid id.
    """
    field = _PAYLOAD_FIELDS.get(payload.DESCRIPTOR.full_name)
    if field is None:
        raise ValueError(f"{payload.DESCRIPTOR.full_name} is not an EventEnvelope payload")
    bare_user = user_id.removeprefix("users/")
    if not _USER_ID.fullmatch(bare_user):
        raise ValueError(f"invalid user id {user_id!r}")
    stream_of(producer)  # validates the producer name
    if schema_version < 1:
        raise ValueError("schema_version starts at 1")
    now = datetime.now(UTC)
    envelope = events_pb2.EventEnvelope(
        event_id=event_id or str(uuid.uuid4()),
        event_type=payload.DESCRIPTOR.full_name,
        producer=producer,
        user=f"users/{bare_user}",
        schema_version=schema_version,
    )
    occurred = occur_time or now
    # A naive datetime is taken as UTC, as the stores do, never as the machine's local time.
    occurred = occurred.replace(tzinfo=UTC) if occurred.tzinfo is None else occurred.astimezone(UTC)
    envelope.occur_time.FromDatetime(occurred)
    envelope.publish_time.FromDatetime(now)
    getattr(envelope, field).CopyFrom(payload)
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    envelope.traceparent = carrier.get("traceparent", "")
    envelope.tracestate = carrier.get("tracestate", "")
    return envelope
