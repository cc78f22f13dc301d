"""A second process on an EmbeddedBus file, for ``test_embedded_multiprocess``.

``python -m tests.events.embedded_child EVENTS_FILE STORE_FILE GROUP PRODUCER COUNT``: consumes
PRODUCER's stream in GROUP (printing ``handled <event id>`` per event), publishes COUNT events of
its own (then prints ``published``), and runs until SIGTERM. Its dedupe store is its own file, so
an entry delivered to both processes would show up as handled twice.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from fittracker.events.v1 import events_pb2

from services.runtime.events import EmbeddedBus, make_envelope, stream_of
from services.runtime.storage import EmbeddedStore
from tests.events.conftest import FAST


async def main(events_file: Path, store_file: Path, group: str, producer: str, count: int) -> None:
    bus = EmbeddedBus(events_file, tuning=FAST)
    store = EmbeddedStore(store_file)

    async def handle(envelope: events_pb2.EventEnvelope) -> None:
        await asyncio.sleep(0.005)  # simulated work, so the other process takes its share
        print(f"handled {envelope.event_id}", flush=True)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    consumer = asyncio.create_task(bus.consumer(group, [stream_of(producer)], handle, store)())
    for n in range(count):
        await bus.publish(make_envelope(producer, f"child{n}", events_pb2.UserRegistered(display_name="child")))
    print("published", flush=True)
    await stop.wait()
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    await bus.close()
    await store.close()


if __name__ == "__main__":
    events, store_path, group_name, producer_name, how_many = sys.argv[1:6]
    asyncio.run(main(Path(events), Path(store_path), group_name, producer_name, int(how_many)))
