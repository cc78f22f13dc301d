"""The EventBus contract, run on Redis Streams (a real Redis) and on the embedded SQLite bus."""

from __future__ import annotations

import asyncio
import uuid

from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.runtime.events import make_envelope
from tests.events.conftest import BusKit
from tests.events.support import Recorder, drained, eventually, running


def session_completed(kit: BusKit, user: str = "u1", volume: float = 1200.0) -> events_pb2.EventEnvelope:
    """A realistic envelope on the kit's stream."""
    payload = events_pb2.SessionCompleted(
        session=f"users/{user}/sessions/s{uuid.uuid4().hex[:6]}",
        time_zone="Europe/Paris",
        total_volume_kg=volume,
        total_sets=12,
        exercises=[
            events_pb2.ExerciseSummary(
                exercise="exercises/back-squat",
                primary_muscle_groups=[fitness_pb2.MUSCLE_GROUP_QUADRICEPS],
                set_count=4,
                total_reps=20,
                total_volume_kg=volume,
                best_set_weight_kg=100.0,
                best_set_reps=5,
                estimated_one_rep_max_kg=116.7,
            )
        ],
    )
    payload.start_time.GetCurrentTime()
    payload.end_time.GetCurrentTime()
    return make_envelope(kit.producer, user, payload)


async def test_publish_and_consume_round_trip(kit: BusKit) -> None:
    bus = await kit.bus()
    sent = session_completed(kit)
    entry_id = await bus.publish(sent)
    assert entry_id
    handler = Recorder()
    async with running(bus.consumer("analytics", [kit.stream], handler, kit.store)):
        await eventually(lambda: handler.seen, what="the event")
        await eventually(lambda: drained(bus, "analytics", [kit.stream]), what="the ack")
    assert handler.seen == [sent]
    assert handler.seen[0].WhichOneof("payload") == "session_completed"


async def test_consumers_of_one_group_share_the_work(kit: BusKit) -> None:
    first, second = await kit.bus(), await kit.bus()
    a, b = Recorder(work_seconds=0.01), Recorder(work_seconds=0.01)
    async with running(
        first.consumer("workers", [kit.stream], a, kit.store),
        second.consumer("workers", [kit.stream], b, kit.store),
    ):
        sent = [session_completed(kit) for _ in range(24)]
        for envelope in sent:
            await first.publish(envelope)
        await eventually(lambda: len(a.seen) + len(b.seen) >= len(sent), what="all events")
        await eventually(lambda: drained(first, "workers", [kit.stream]), what="all acks")
    assert sorted(a.ids + b.ids) == sorted(e.event_id for e in sent)
    assert not set(a.ids) & set(b.ids)
    assert a.seen and b.seen, "both consumers should have taken part"


async def test_every_group_gets_every_event(kit: BusKit) -> None:
    bus = await kit.bus()
    sent = [session_completed(kit) for _ in range(5)]
    for envelope in sent[:2]:
        await bus.publish(envelope)  # published before the groups exist: groups start at the beginning
    analytics, notification = Recorder(), Recorder()
    async with running(
        bus.consumer("analytics", [kit.stream], analytics, kit.store),
        bus.consumer("notification", [kit.stream], notification, kit.store),
    ):
        for envelope in sent[2:]:
            await bus.publish(envelope)
        await eventually(lambda: len(analytics.seen) == 5 and len(notification.seen) == 5, what="both groups")
    assert analytics.ids == notification.ids == [e.event_id for e in sent]


async def test_a_failed_handler_is_retried_until_it_succeeds(kit: BusKit) -> None:
    bus = await kit.bus()
    handler = Recorder(fail_times=2)
    await bus.publish(sent := session_completed(kit))
    async with running(bus.consumer("ai", [kit.stream], handler, kit.store)):
        await eventually(lambda: handler.seen, what="the successful retry")
        await eventually(lambda: drained(bus, "ai", [kit.stream]), what="the ack")
    assert handler.calls == 3
    assert handler.ids == [sent.event_id]
    assert await bus.dead_letters(kit.stream) == []
    failed = bus.metrics.registry.get_sample_value(
        "events_consumed_total", {"group": "ai", "stream": kit.stream, "outcome": "failed"}
    )
    assert failed == 2


async def test_an_event_failing_max_deliveries_times_is_dead_lettered(kit: BusKit) -> None:
    bus = await kit.bus()
    handler = Recorder(fail_times=100)
    poison, fine = session_completed(kit), session_completed(kit)
    await bus.publish(poison)
    await bus.publish(fine)
    async with running(bus.consumer("ai", [kit.stream], handler, kit.store, max_deliveries=3)):
        await eventually(lambda: bus.dead_letters(kit.stream), what="a dead letter")
        await eventually(lambda: drained(bus, "ai", [kit.stream]), what="the acks")
    dead = await bus.dead_letters(kit.stream)
    assert [d.envelope() for d in dead] == [poison, fine]
    for letter in dead:
        assert (letter.group, letter.stream, letter.deliveries) == ("ai", kit.stream, 3)
        assert "planned failure" in letter.error
    assert handler.calls == 6  # three attempts each, no more


async def test_the_lag_and_dead_letter_gauges_follow_the_stream(kit: BusKit) -> None:
    bus = await kit.bus()
    for _ in range(3):
        await bus.publish(session_completed(kit))
    assert await bus.dead_letter_count(kit.stream) == 0

    def gauge(name: str, labels: dict[str, str]) -> float | None:
        return bus.metrics.registry.get_sample_value(name, labels)

    async def sampled(name: str, labels: dict[str, str], value: float) -> bool:
        return gauge(name, labels) == value

    lag = {"group": "ai", "stream": kit.stream}
    async with running(bus.consumer("ai", [kit.stream], Recorder(fail_times=100), kit.store, max_deliveries=1)):
        await eventually(lambda: sampled("events_dead_letters", {"stream": kit.stream}, 3.0),
                         what="three dead letters counted")
        await eventually(lambda: sampled("events_consumer_lag", lag, 0.0), what="no lag left")
    assert await bus.dead_letter_count(kit.stream) == 3
    await bus.publish(session_completed(kit))
    assert await bus.backlog("ai", [kit.stream]) == 1


async def test_an_entry_left_by_a_dead_consumer_is_reclaimed(kit: BusKit) -> None:
    doomed_bus, survivor_bus = await kit.bus(), await kit.bus()
    started = asyncio.Event()

    async def hangs(envelope: events_pb2.EventEnvelope) -> None:
        started.set()
        await asyncio.Event().wait()  # the consumer dies while handling: never acks

    await doomed_bus.publish(sent := session_completed(kit))
    async with running(doomed_bus.consumer("notification", [kit.stream], hangs, kit.store)):
        await asyncio.wait_for(started.wait(), 5)
    assert await survivor_bus.backlog("notification", [kit.stream]) == 1  # still pending for the dead one
    survivor = Recorder()
    async with running(survivor_bus.consumer("notification", [kit.stream], survivor, kit.store)):
        await eventually(lambda: survivor.seen, what="the reclaimed event")
        await eventually(lambda: drained(survivor_bus, "notification", [kit.stream]), what="the ack")
    assert survivor.ids == [sent.event_id]


async def test_a_redelivered_event_id_is_handled_once(kit: BusKit) -> None:
    bus = await kit.bus()
    sent = session_completed(kit)
    handler = Recorder()
    async with running(bus.consumer("analytics", [kit.stream], handler, kit.store)):
        await bus.publish(sent)
        await bus.publish(sent)  # the producer published the same fact twice
        await eventually(lambda: drained(bus, "analytics", [kit.stream]), what="both acks")
    assert handler.ids == [sent.event_id]
    duplicates = bus.metrics.registry.get_sample_value(
        "events_consumed_total", {"group": "analytics", "stream": kit.stream, "outcome": "duplicate"}
    )
    assert duplicates == 1


async def test_an_unknown_payload_is_acknowledged_without_calling_the_handler(kit: BusKit) -> None:
    bus = await kit.bus()
    newer = events_pb2.EventEnvelope(
        event_id=str(uuid.uuid4()), event_type="fittracker.events.v1.SomethingNew", producer=kit.producer,
        user="users/u1", schema_version=1,
    )
    handler = Recorder()
    async with running(bus.consumer("analytics", [kit.stream], handler, kit.store)):
        await bus.publish(newer)
        await bus.publish(known := session_completed(kit))
        await eventually(lambda: handler.seen, what="the known event")
        await eventually(lambda: drained(bus, "analytics", [kit.stream]), what="both acks")
    assert handler.ids == [known.event_id]


async def test_the_consumer_continues_the_producers_trace(kit: BusKit) -> None:
    bus = await kit.bus()
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("RegisterUser") as producer_span:
        sent = session_completed(kit)
    producer = producer_span.get_span_context()
    assert sent.traceparent.startswith(f"00-{producer.trace_id:032x}-{producer.span_id:016x}-")
    seen_trace: list[int] = []

    async def handler(envelope: events_pb2.EventEnvelope) -> None:
        seen_trace.append(trace.get_current_span().get_span_context().trace_id)

    await bus.publish(sent)
    async with running(bus.consumer("analytics", [kit.stream], handler, kit.store)):
        await eventually(lambda: seen_trace, what="the handler")
    assert seen_trace == [producer.trace_id]
