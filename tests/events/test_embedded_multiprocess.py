"""The embedded bus shared by two processes: one log, one group's work split without overlap."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from fittracker.events.v1 import events_pb2

from services.runtime.events import EmbeddedBus, make_envelope, stream_of
from services.runtime.storage import EmbeddedStore
from tests.events.conftest import FAST
from tests.events.support import Recorder, eventually, running
from tests.servers import REPO_ROOT

PER_PROCESS = 20


async def test_two_processes_share_one_embedded_bus(tmp_path: Path) -> None:
    events_file, producer = tmp_path / "events.sqlite3", "shared"
    bus = EmbeddedBus(events_file, tuning=FAST)
    store = EmbeddedStore(tmp_path / "parent-store.sqlite3")
    ours, everything = Recorder(work_seconds=0.005), Recorder()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.events.embedded_child", str(events_file), str(tmp_path / "child-store.sqlite3"),
        "workers", producer, str(PER_PROCESS),
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'clients/python/generated'}"},
    )
    assert child.stdout is not None
    child_lines: list[str] = []

    async def read_child() -> None:
        assert child.stdout is not None
        while line := await child.stdout.readline():
            child_lines.append(line.decode().strip())

    def child_handled() -> list[str]:
        return [line.split()[1] for line in child_lines if line.startswith("handled ")]

    reader = asyncio.create_task(read_child())
    try:
        async with running(
            bus.consumer("workers", [stream_of(producer)], ours, store),
            bus.consumer("audit", [stream_of(producer)], everything, store),
        ):
            for n in range(PER_PROCESS):
                await bus.publish(make_envelope(producer, f"parent{n}", events_pb2.UserRegistered()))
            await eventually(lambda: "published" in child_lines, within=15, what="the child's publishes")
            await eventually(lambda: len(ours.seen) + len(child_handled()) >= 2 * PER_PROCESS,
                             within=10, what="the group to handle every event")
            await eventually(lambda: len(everything.seen) == 2 * PER_PROCESS, what="the audit group")
            assert await bus.backlog("workers", [stream_of(producer)]) == 0
    finally:
        child.terminate()
        await asyncio.wait_for(child.wait(), 10)
        await reader
        await bus.close()
        await store.close()
    handled_here, handled_there = ours.ids, child_handled()
    assert handled_here and handled_there, "both processes should have taken part"
    assert not set(handled_here) & set(handled_there), "an entry was delivered to both processes"
    assert len(handled_here) + len(handled_there) == 2 * PER_PROCESS
    assert sorted(handled_here + handled_there) == sorted(everything.ids)
    users = {e.user.split("/")[1].rstrip("0123456789") for e in everything.seen}
    assert users == {"parent", "child"}  # the child's events reached this process's audit group
