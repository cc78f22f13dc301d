"""Connection scale: open Subscribe streams by the thousand, then time one event to every stream.

Starts the user and notification services (one replica each, embedded store) and the edge,
registers USERS members and an admin, then, for each target (the notification replica straight,
then through the edge):

1. opens ``--streams`` Subscribe streams spread evenly over the members, on channels of at most
   STREAMS_PER_CHANNEL streams each (the edge allows 100 per HTTP/2 connection), and waits for
   every stream's first heartbeat;
2. reads the resident memory of the replica and of Envoy: the growth over the idle stack, divided
   by the streams, is the memory per stream;
3. sends one notification to every member (SendNotification, as the admin) and records, on every
   stream, the time from the send call to that notification's arrival; reports p50/p99/max.

    python tools/stream_scale.py --streams 2000     (make stream-scale STREAMS=2000)

Loopback only; every wait has a deadline. Writes ``ghz-loadtests/reports/latest-streams/streams.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from fittracker.notification.v1 import notification_pb2, notification_service_pb2, notification_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_common import write_json
from tools.devstack import Stack

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "ghz-loadtests" / "reports" / "latest-streams" / "streams.json"
USERS = 50
#: Streams per gRPC channel (one HTTP/2 connection): the edge's max_concurrent_streams is 100.
STREAMS_PER_CHANNEL = 100
ADMIN_EMAIL = "streams-admin@example.com"
PASSWORD = "stream-scale-password-42"  # noqa: S105 (throwaway accounts of a throwaway stack)
#: How long opening every stream, and delivering to every stream, may take before the run fails.
OPEN_DEADLINE_SECONDS = 120.0
DELIVERY_DEADLINE_SECONDS = 60.0
SERVICE_ENV = {"FITTRACKER_ENVIRONMENT": "test", "FITTRACKER_LOG_LEVEL": "WARNING",
               "FITTRACKER_ARGON2_MEMORY_KIB": "1024", "FITTRACKER_ARGON2_TIME_COST": "1",
               "FITTRACKER_ADMIN_EMAILS": ADMIN_EMAIL}


def quiet(line: str) -> None:
    """Keep the services' warnings and errors; drop the edge's access lines."""
    if not line.startswith("[envoy] {"):
        print(line, flush=True)


def register(base: str, email: str) -> tuple[str, str]:
    """Register through the edge's JSON API: (user name, access token)."""
    body = json.dumps({"email": email, "password": PASSWORD, "display_name": "Streamer"}).encode()
    request = urllib.request.Request(f"{base}/v1/users:register", data=body,  # noqa: S310 (loopback, built here)
                                     headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 (loopback, built here)
        answer = json.load(reply)
    return str(answer["user"]["name"]), str(answer["tokens"]["access_token"])


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (a service may run workers)."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for one in pids:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


class Streams:
    """Many Subscribe streams on a few channels, each recording when its notification arrives."""

    def __init__(self, target: str, members: list[tuple[str, str]], count: int) -> None:
        """Plan ``count`` streams to ``target``, spread over ``members``."""
        # A local subchannel pool each: channels to one target otherwise share one connection, and
        # with it the edge's limit of 100 streams.
        self.channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(-(-count // STREAMS_PER_CHANNEL))]
        self.plan = [(members[i % len(members)], self.channels[i // STREAMS_PER_CHANNEL]) for i in range(count)]
        self.opened = 0
        self.all_open = asyncio.Event()
        self.arrivals: dict[str, list[float]] = {}
        self.expected: dict[str, str] = {}
        self.received = 0
        self.all_delivered = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def run_one(self, member: tuple[str, str], channel: grpc.aio.Channel) -> None:
        """Hold one stream: count it open at its first message, note its notification's arrival."""
        name, token = member
        stub = notification_service_pb2_grpc.NotificationServiceStub(channel)
        call = stub.Subscribe(notification_service_pb2.SubscribeRequest(parent="users/me"),
                              metadata=(("authorization", f"Bearer {token}"),))
        first = True
        async for message in call:
            if first:
                first = False
                self.opened += 1
                if self.opened == len(self.plan):
                    self.all_open.set()
            if message.WhichOneof("event") == "notification" and message.notification.title == self.expected.get(name):
                self.arrivals.setdefault(name, []).append(time.perf_counter())
                self.received += 1
                if self.received == len(self.plan):
                    self.all_delivered.set()

    async def open(self) -> float:
        """Open every stream; the seconds it took."""
        began = time.perf_counter()
        self.tasks = [asyncio.create_task(self.run_one(m, c)) for m, c in self.plan]
        waiter = asyncio.create_task(self.all_open.wait())
        done, _ = await asyncio.wait([waiter, *self.tasks], timeout=OPEN_DEADLINE_SECONDS,
                                     return_when=asyncio.FIRST_COMPLETED)
        while waiter not in done:
            failed = [t for t in done if t is not waiter and t.exception() is not None]
            if failed:
                raise RuntimeError(f"a stream failed while opening: {failed[0].exception()}")
            if not done:
                raise RuntimeError(f"only {self.opened:,} of {len(self.plan):,} streams opened "
                                   f"within {OPEN_DEADLINE_SECONDS:.0f} s")
            done, _ = await asyncio.wait([waiter, *(t for t in self.tasks if not t.done())],
                                         timeout=OPEN_DEADLINE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        return time.perf_counter() - began

    async def close(self) -> None:
        """Cancel every stream and close the channels."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


async def deliver(streams: Streams, admin: str, target: str, members: list[tuple[str, str]],
                  per_member: int) -> dict[str, float]:
    """Send one notification per member; latency from each send call to each stream's receipt."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = notification_service_pb2_grpc.NotificationServiceStub(channel)
        sent: dict[str, float] = {}
        for name, _ in members:
            streams.expected[name] = f"scale {time.time_ns()}"

        async def send(name: str) -> None:
            sent[name] = time.perf_counter()
            await stub.SendNotification(
                notification_service_pb2.SendNotificationRequest(parent=name, title=streams.expected[name],
                                                                 body="One event to every stream.",
                                                                 category=notification_pb2.CATEGORY_SYSTEM),
                metadata=(("authorization", f"Bearer {admin}"),), timeout=30)

        await asyncio.gather(*(send(name) for name, _ in members))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(streams.all_delivered.wait(), DELIVERY_DEADLINE_SECONDS)
    latencies = [(at - sent[name]) * 1000 for name, times in streams.arrivals.items() for at in times]
    if len(latencies) < len(streams.plan) * per_member:
        raise RuntimeError(f"{len(latencies):,} of {len(streams.plan):,} streams got their notification "
                           f"within {DELIVERY_DEADLINE_SECONDS:.0f} s")
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50_ms": round(cuts[49], 1), "p99_ms": round(cuts[98], 1), "max_ms": round(max(latencies), 1)}


async def one_target(label: str, target: str, stack: Stack, pids: dict[str, int], admin: str,
                     members: list[tuple[str, str]], count: int) -> dict[str, Any]:
    """Open ``count`` streams to ``target``, weigh them, time a delivery to each, close them."""
    before = {name: rss_bytes(pid) for name, pid in pids.items()}
    streams = Streams(target, members, count)
    print(f"==> {label}: opening {count:,} streams over {len(streams.channels)} connections", flush=True)
    try:
        seconds = await streams.open()
        await asyncio.sleep(2)  # let allocations settle before weighing; not a synchronisation
        after = {name: rss_bytes(pid) for name, pid in pids.items()}
        print(f"    open in {seconds:.1f} s; timing one notification to each of {len(members)} members", flush=True)
        delivery = await deliver(streams, admin, target, members, 1)
    finally:
        await streams.close()
    per_stream = {name: round((after[name] - before[name]) / count) for name in pids}
    print(f"    memory per stream: {per_stream}; delivery {delivery}", flush=True)
    return {"streams": count, "open_seconds": round(seconds, 1), "rss_before": before, "rss_after": after,
            "bytes_per_stream": per_stream, "delivery": delivery}


async def measure(count: int, edge_count: int, users: int = USERS) -> dict[str, Any]:
    """Start the stack, run both targets, stop it."""
    with tempfile.TemporaryDirectory(prefix="stream-scale-") as scratch:
        stack = Stack(Path(scratch) / "stack", services=["user", "notification"], replicas=1,
                      use_free_ports=True, service_env=SERVICE_ENV, ip_limit=None, user_limit=None, sink=quiet)
        print("==> starting user, notification and the edge", flush=True)
        stack.start(timeout=90)
        try:
            base = f"http://{stack.host}:{stack.edge_port}"
            _, admin = register(base, ADMIN_EMAIL)
            members = [register(base, f"streamer{i}@example.com") for i in range(users)]
            replica = next(r for r in stack.replicas if r.service == "notification")
            processes = {"notification": replica.child.process, "envoy": stack.envoy.process}
            pids = {name: process.pid for name, process in processes.items() if process is not None}
            direct = f"{replica.address.host}:{replica.address.port}"
            results = {"replica": await one_target("straight to the replica", direct, stack, pids, admin,
                                                   members, count)}
            if edge_count:
                results["edge"] = await one_target("through the edge", stack.edge_target, stack, pids, admin,
                                                   members, edge_count)
            return {"members": users, **results}
        finally:
            stack.stop()


def main() -> None:
    """Measure and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000, help="streams straight to the replica")
    parser.add_argument("--edge-streams", type=int, default=2000, help="streams through the edge (0: skip)")
    parser.add_argument("--members", type=int, default=USERS, help="members the streams are spread over")
    args = parser.parse_args()
    report = asyncio.run(measure(args.streams, args.edge_streams, args.members))
    write_json(REPORT, report)
    print(f"==> report: {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
