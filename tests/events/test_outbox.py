"""The outbox: ordered, at-least-once relaying to each bus, surviving publish failures."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from fittracker.events.v1 import events_pb2

from services.runtime.events import EventBus, Handler, Job, Outbox, fact_id, make_envelope
from services.runtime.storage import DocumentStore
from tests.events.conftest import BusKit
from tests.events.support import Recorder, eventually, running


class FlakyBus:
    """Wraps a real bus: the first ``failures`` publishes raise, and every publish is counted."""

    def __init__(self, inner: EventBus, failures: int = 0) -> None:
        self.inner = inner
        self.failures = failures
        self.published: Counter[str] = Counter()

    async def publish(self, envelope: events_pb2.EventEnvelope) -> str:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("the bus is down")
        self.published[envelope.event_id] += 1
        return await self.inner.publish(envelope)

    def consumer(
        self, group: str, streams: Sequence[str], handler: Handler, store: DocumentStore, *, max_deliveries: int = 5
    ) -> Job:
        return self.inner.consumer(group, streams, handler, store, max_deliveries=max_deliveries)

    async def close(self) -> None:
        await self.inner.close()


def registered(kit: BusKit, n: int) -> events_pb2.EventEnvelope:
    return make_envelope(kit.producer, f"u{n}", events_pb2.UserRegistered(display_name=f"User {n}"))


async def test_the_relay_publishes_in_insertion_order(kit: BusKit) -> None:
    bus = await kit.bus()
    outbox = Outbox(kit.store, bus)
    await outbox.ensure()
    sent = [registered(kit, n) for n in range(10)]
    for envelope in sent[:5]:
        await outbox.add(envelope)  # added before the relay runs: found by its first look
    handler = Recorder()
    async with running(outbox.relay, bus.consumer("analytics", [kit.stream], handler, kit.store)):
        for envelope in sent[5:]:
            await outbox.add(envelope)  # added while it runs: wakes it
        await eventually(lambda: len(handler.seen) == 10, what="all events")
        await eventually(lambda: _no_unsent(outbox), what="all marked sent")
    assert handler.ids == [e.event_id for e in sent]
    assert all(e.HasField("publish_time") for e in handler.seen)


async def _no_unsent(outbox: Outbox) -> bool:
    return await outbox.unsent() == 0


async def test_the_relay_survives_publish_failures_and_keeps_order(kit: BusKit) -> None:
    flaky = FlakyBus(await kit.bus(), failures=3)
    outbox = Outbox(kit.store, flaky, retry_base_seconds=0.01, retry_max_seconds=0.05)
    await outbox.ensure()
    sent = [registered(kit, n) for n in range(4)]
    handler = Recorder()
    async with running(outbox.relay, flaky.consumer("analytics", [kit.stream], handler, kit.store)):
        for envelope in sent:
            await outbox.add(envelope)
        await eventually(lambda: len(handler.seen) == 4, what="all events")
    assert flaky.failures == 0
    assert handler.ids == [e.event_id for e in sent]
    assert set(flaky.published.values()) == {1}


async def test_adding_the_same_event_id_twice_publishes_once(kit: BusKit) -> None:
    counting = FlakyBus(await kit.bus())
    outbox = Outbox(kit.store, counting)
    await outbox.ensure()
    fact = fact_id("user.registered", "u7")
    first = make_envelope(kit.producer, "u7", events_pb2.UserRegistered(display_name="Ada"), event_id=fact)
    again = make_envelope(kit.producer, "u7", events_pb2.UserRegistered(display_name="Ada"), event_id=fact)
    assert await outbox.add(first) is True
    assert await outbox.add(again) is False
    async with running(outbox.relay):
        await eventually(lambda: _no_unsent(outbox), what="the relay")
        assert await outbox.add(first) is False  # still a no-op once sent
    assert counting.published == Counter({fact: 1})
