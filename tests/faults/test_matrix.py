"""The fault matrix: one real failure per row, injected while users train through the edge.

Each row runs a bounded load (``tools.userload``: a few virtual users, a few seconds), injects
its fault, lets the stack recover, then reads every user's data back: acknowledged sets and
completions must all be there, completed sessions must be consistent, and analytics must count
every completed session exactly once. A row reports sent, failed, retried (by the edge) and lost.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis
from fittracker.ai.v1 import ai_pb2, ai_service_pb2, ai_service_pb2_grpc

from tests.faults.conftest import GENEROUS, MATRIX, SERVICE_ENV, FaultStack
from tests.servers import RunningServer, start_ferretdb
from tools.devstack import Stack
from tools.faults import hang, resume
from tools.userload import PASSWORD, DataCheck, Edge, UserLoad, check_data, edge_retries

pytestmark = [pytest.mark.edge, pytest.mark.redis, pytest.mark.timeout(240)]


class Row:
    """One row: a load on ``stack`` that a test injects its fault into, then the figures."""

    def __init__(self, stack: Stack, fault: str, *, users: int = 4, seed: int = 10, **load: Any) -> None:
        """Register the load's users (before any fault)."""
        self.stack, self.fault = stack, fault
        self.load = UserLoad(stack.host, stack.edge_port, users=users, seed=seed, **load)
        self.load.setup()
        self._retries = edge_retries(stack.admin_get, stack.services)
        self._refused = edge_retries(stack.admin_get, stack.services, "upstream_rq_retry_overflow")

    def run(self, script: Callable[[UserLoad], None]) -> None:
        """Start the load, run ``script`` (the fault, with its waits), stop the load."""
        self.load.start()
        try:
            script(self.load)
        finally:
            self.load.stop()

    def finish(self, check: DataCheck, **extra: Any) -> dict[str, Any]:
        """The row's figures, added to the matrix."""
        totals = self.load.totals()
        row = {"fault": self.fault, "sent": totals["sent"], "failed": totals["failed"],
               "retried": edge_retries(self.stack.admin_get, self.stack.services) - self._retries
               + self.load.client_retries,
               "lost": check.lost, "p99_ms": totals["p99_ms"], "failed_by_status": totals["failed_by_status"],
               "retries_refused_by_budget": edge_retries(self.stack.admin_get, self.stack.services,
                                                         "upstream_rq_retry_overflow") - self._refused,
               "data": check.as_dict(), **extra}
        MATRIX.append(row)
        return row


def pause(load: UserLoad, seconds: float) -> None:
    """Let the load run on for ``seconds``."""
    time.sleep(seconds)


def assert_nothing_lost(check: DataCheck) -> None:
    """Every acknowledged write is there, consistent, and counted once by analytics."""
    assert check.lost == 0, check.problems
    assert check.counted_twice == 0, check.problems
    assert check.inconsistent == 0, check.problems
    assert check.sets_acknowledged > 0, "the load acknowledged no write: nothing was tested"


# --- Redis ------------------------------------------------------------------------------------


def test_redis_killed_and_restarted(faults: FaultStack) -> None:
    """Cache reads fall back to the store, writes succeed, events wait in the outbox, limits fail open."""
    stack = faults.stack
    row = Row(stack, "Redis SIGKILLed for 4 s, restarted")
    logins: list[int] = []

    def script(load: UserLoad) -> None:
        pause(load, 2.0)
        faults.redis.kill()
        pause(load, 1.0)
        # Failed-login counters live in Redis: with it gone they fail open (counters.py says why).
        edge = Edge(stack.host, stack.edge_port, 10.0)
        logins.append(edge.call("POST", "/v1/auth:login", {"email": load.ledgers[0].email, "password": PASSWORD})[0])
        logins.append(edge.call("POST", "/v1/auth:login", {"email": load.ledgers[0].email, "password": "wrong"})[0])
        edge.close()
        pause(load, 3.0)
        faults.redis.restart()
        pause(load, 3.0)

    row.run(script)
    check = check_data(stack.host, stack.edge_port, row.load.ledgers)
    figures = row.finish(check)
    assert logins == [200, 401], "sign-in must keep working, and a wrong password still be refused"
    assert figures["failed"] == 0, row.load.failures()
    assert_nothing_lost(check)


# --- a hung replica ---------------------------------------------------------------------------


def test_replica_sigstopped_is_taken_out_and_comes_back(faults: FaultStack) -> None:
    """A hung user replica: reads move to the other one within the per-try timeout; SIGCONT brings it back."""
    stack = faults.stack
    victim = stack.replica("user", 1)
    stack.wait_hosts_healthy("user", 2, timeout=30)
    # Every user call of this load is a read (GetUser), which the edge may retry on another replica.
    row = Row(stack, "user replica SIGSTOPped for 5 s, SIGCONT", users=6, think=(0.02, 0.05))
    flags: set[str] = set()

    def script(load: UserLoad) -> None:
        pause(load, 1.5)
        hang(victim.child)
        try:
            deadline = time.monotonic() + 10
            while not flags and time.monotonic() < deadline:
                flags.update(stack.host_flags("user").get(str(victim.address), set()))
                time.sleep(0.1)
            pause(load, 1.0)
        finally:
            resume(victim.child)
        stack.wait_hosts_healthy("user", 2, timeout=30)
        pause(load, 1.0)

    row.run(script)
    check = check_data(stack.host, stack.edge_port, row.load.ledgers)
    figures = row.finish(check, victim_flags=sorted(flags))
    user_failures = [r for r in row.load.records if r.op == "get_user" and not r.ok]
    assert flags, "the edge never took the hung replica out"
    assert not user_failures, [f"{r.status} {r.error}" for r in user_failures[:5]]
    # The client's 5 s timeout is the bound: no call waited for the hung replica past it.
    assert figures["failed_by_status"].get("0", 0) == 0, row.load.failures()
    assert_nothing_lost(check)


# --- latency between services -----------------------------------------------------------------


def test_latency_between_ai_and_workout_degrades_ai_and_opens_its_breaker(faults: FaultStack) -> None:
    """2 s per hop between ai and workout: recommendations come back degraded within the deadline,
    the breaker stops calling workout, and with the latency gone they are whole again."""
    stack, proxy = faults.stack, faults.proxy
    load = UserLoad(stack.host, stack.edge_port, users=1)
    load.setup()
    token = load.ledgers[0].token
    answers: list[ai_pb2.Recommendation] = []
    failures: list[str] = []
    with grpc.insecure_channel(stack.edge_target) as channel:
        stub = ai_service_pb2_grpc.AiServiceStub(channel)

        def recommend(deadline: float = 5.0) -> ai_pb2.Recommendation | None:
            try:
                return stub.RecommendNextWorkout(
                    ai_service_pb2.RecommendNextWorkoutRequest(user="users/me"),
                    metadata=(("authorization", f"Bearer {token}"),), timeout=deadline)
            except grpc.RpcError as error:
                failures.append(f"{error.code()}: {error.details()}")
                return None

        baseline = recommend()
        assert baseline is not None and not baseline.degraded, failures
        proxy.delay = 2.0
        try:
            for _ in range(8):
                answer = recommend()
                if answer is not None:
                    answers.append(answer)
            # Ten calls' worth of failures opened the breakers of both ai replicas: calls now go
            # nowhere near the proxy, so no new connection or byte reaches workout for a while.
            before = proxy.chunks
            quick = recommend(deadline=1.0)
            opened = proxy.chunks == before
        finally:
            proxy.delay = 0.0
        recovered = _eventually(lambda: (r := recommend()) is not None and not r.degraded, 20.0)
    MATRIX.append({"fault": "2 s latency ai -> workout", "sent": 11 + len(answers), "failed": len(failures),
                   "retried": 0, "lost": 0, "p99_ms": 0, "degraded": sum(a.degraded for a in answers)})
    assert not failures, failures
    assert answers and all(a.degraded and a.degraded_reason for a in answers), answers
    assert quick is not None and quick.degraded
    assert opened, "ai still called workout through the slow link: no breaker opened"
    assert recovered, "recommendations stayed degraded after the latency was gone"


def _eventually(probe: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.5)
    return False


# --- a consumer killed mid-batch --------------------------------------------------------------


def test_event_consumer_sigkilled_mid_batch(faults: FaultStack) -> None:
    """SIGKILL an analytics replica while it holds pending events: they are reclaimed, applied once."""
    stack = faults.stack
    victim = stack.replica("analytics", 0)
    client = redis.Redis.from_url(faults.redis.url)
    row = Row(stack, "analytics consumer SIGKILLed mid-batch", users=8, think=(0.0, 0.01), recommend_every=0)
    caught: dict[str, int] = {}

    def held_by_victim() -> int:
        pid = victim.child.process.pid if victim.child.process else -1
        held = 0
        for stream in ("events.workout", "events.user"):
            try:
                summary = client.xpending(stream, "analytics")
            except redis.ResponseError:
                continue
            for consumer in summary.get("consumers") or []:
                if f"-{pid}-" in consumer["name"].decode():
                    held += int(consumer["pending"])
        return held

    def script(load: UserLoad) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pending = held_by_victim()
            if pending:
                victim.child.signal(signal.SIGKILL)
                caught["pending_at_kill"] = pending
                break
        pause(load, 1.0)
        victim.child.wait(5)
        stack.restart_replica(victim)
        pause(load, 1.0)

    try:
        row.run(script)
    finally:
        if not victim.child.running:
            stack.restart_replica(victim)
    check = check_data(stack.host, stack.edge_port, row.load.ledgers)
    row.finish(check, **caught)
    assert caught.get("pending_at_kill", 0) > 0, "the victim never held a pending event: nothing was tested"
    assert_nothing_lost(check)
    # The dead consumer's entries were claimed and acknowledged by the others: nothing waits.
    still = {s: client.xpending(s, "analytics")["pending"] for s in ("events.workout", "events.user")}
    client.close()
    assert not any(still.values()), f"entries still pending after the settle: {still}"


# --- the embedded store's process killed mid-write --------------------------------------------


def test_embedded_store_process_sigkilled_mid_write(faults: FaultStack) -> None:
    """SIGKILL a workout replica with writes in flight: the SQLite file passes integrity_check after
    the restart, and every write it acknowledged is there."""
    stack = faults.stack
    victim = stack.replica("workout", 0)
    row = Row(stack, "workout replica SIGKILLed mid-write (SQLite)", users=8, think=(0.0, 0.02),
              recommend_every=0)
    in_flight: list[int] = []

    def script(load: UserLoad) -> None:
        pause(load, 1.5)
        in_flight.append(load.in_flight)
        victim.child.signal(signal.SIGKILL)
        victim.child.wait(5)
        pause(load, 1.0)
        stack.restart_replica(victim)
        pause(load, 1.5)

    row.run(script)
    with sqlite3.connect(stack.data_dir / "workout.sqlite3") as db:
        integrity = db.execute("PRAGMA integrity_check").fetchall()
    check = check_data(stack.host, stack.edge_port, row.load.ledgers)
    row.finish(check, calls_in_flight_at_kill=in_flight[0], integrity=integrity[0][0])
    assert integrity == [("ok",)]
    assert in_flight[0] > 0, "no call was in flight at the kill"
    reads = ("get_user", "list_sessions", "get_stats")
    reads_failed = [r for r in row.load.records if r.op in reads and not r.ok]
    assert not reads_failed, [f"{r.op} {r.status} {r.error}" for r in reads_failed[:5]]
    assert_nothing_lost(check)


# --- the MongoDB-wire server killed mid-write ---------------------------------------------------


@pytest.fixture(scope="module")
def mongo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, RunningServer]]:
    """user and workout on FerretDB (one replica each) behind Envoy."""
    ferret = start_ferretdb(tmp_path_factory.mktemp("faults-ferretdb"))
    running = Stack(
        tmp_path_factory.mktemp("faults-mongo-stack"),
        services=["user", "workout"],
        replicas=1,
        use_free_ports=True,
        service_env={**SERVICE_ENV, "FITTRACKER_MONGO_URL": ferret.url},
        ip_limit=GENEROUS,
        user_limit=GENEROUS,
        sink=lambda line: None,
    )
    try:
        running.start(timeout=120)
        yield running, ferret
    finally:
        running.stop()
        ferret.stop()


@pytest.mark.mongo
def test_mongo_wire_server_killed_mid_write_and_restarted(mongo_stack: tuple[Stack, RunningServer]) -> None:
    """Callers get UNAVAILABLE (503) or a timeout (504), never a 500; nothing acknowledged is lost or
    half-written; the services serve again once the server is back, without being restarted."""
    stack, ferret = mongo_stack
    pids = {r.child.name: r.child.process.pid for r in stack.replicas if r.child.process}
    # The driver waits up to its 10 s operation timeout before it gives up: the client waits longer.
    row = Row(stack, "FerretDB SIGKILLed mid-write for 11 s, restarted", users=4, think=(0.0, 0.02),
              recommend_every=0, with_stats=False, timeout=20.0)
    phases: dict[str, float] = {}

    def script(load: UserLoad) -> None:
        pause(load, 1.5)
        phases["killed"] = time.monotonic() - load.started
        ferret.kill()
        # Longer than the driver's 10 s operation timeout, so that calls do give up.
        pause(load, 11.0)
        ferret.restart()
        phases["restarted"] = time.monotonic() - load.started
        pause(load, 7.0)

    row.run(script)
    check = check_data(stack.host, stack.edge_port, row.load.ledgers, analytics=False)
    figures = row.finish(check, **phases)
    statuses = figures["failed_by_status"]
    # 503 (UNAVAILABLE): the driver found no server within 3 s, nothing was sent. 504: the server
    # died during the call (outcome unknown), or the edge's per-try timeout cut it. Never a 500.
    assert set(statuses) <= {"503", "504"}, (statuses, row.load.failures())
    assert sum(statuses.values()) > 0, "no call failed while the database was down: nothing was tested"
    # Recovered on their own: the same processes answer every call of the last seconds.
    tail = row.load.totals(since=phases["restarted"] + 5.0)
    assert tail["sent"] > 0 and tail["failed"] == 0, row.load.failures()
    assert {r.child.name: r.child.process.pid for r in stack.replicas if r.child.process} == pids
    assert check.lost == 0 and check.inconsistent == 0, check.problems

