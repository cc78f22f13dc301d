"""Benchmarks: what each layer costs, as ratios measured in one run, against the targets.

``python tools/bench.py`` (``make bench``) measures, on this machine, in one run:

- the runtime's ceiling: an empty RPC (user GetJwks: public, no I/O) on the shared runtime with
  every interceptor on (``python -m services.user``) against the same handler on a bare
  ``grpc.aio`` server (``tools/bench_servers.py bare``): the runtime's overhead;
- a read (user GetUser; ``--read workout`` for GetSession) against the empty RPC on the same
  runtime: the handler's cost;
- the same read through the Envoy edge against straight to the replica: the edge's cost; and the
  JSON route against native gRPC through the edge, both with h2load: the transcoder's cost;
- the thread-pool peer (``grpc.server(ThreadPoolExecutor)``, ``bench_servers.py sync``) against
  ours on the empty RPC;
- two SO_REUSEPORT workers (``FITTRACKER_WORKERS=2``) against one;
- the cache: L1 hit, Redis hit and miss latencies, and cache operations per second from one
  Python process with pipelining against ``redis-benchmark`` on the same Redis;
- p50/p95/p99 of each gRPC path at a fixed offered load of 70 % of its measured maximum.

Each path's maximum is ghz with no rate limit at a fixed concurrency after a warm-up; ghz runs on
the same cores as the servers, so every figure is "what this machine does with the load generator
on it": compare figures within one run (the ratios), not across machines. The report, JSON and
HTML (``bench.json``, ``bench.html``), goes to ``ghz-loadtests/reports/<timestamp>-bench/`` and
``ghz-loadtests/reports/latest-bench/``, with ghz's own JSON/HTML per run under ``ghz/``.

``--quick`` shortens every phase to about a second: it checks that the bench works, it measures
nothing reliable.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from fittracker.user.v1 import user_service_pb2, user_service_pb2_grpc
from fittracker.workout.v1 import workout_pb2, workout_service_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protovalidate import Validator

from services.runtime.auth import Principal, load_or_create_signing_key
from services.runtime.cache import Cache, CacheMetrics, ProtoCodec
from services.runtime.revocation import Revocations
from services.runtime.validation import RequestValidator
from tools.bench_common import (
    PROTOSET,
    ROOT,
    BenchError,
    LoadResult,
    Progress,
    RedisServer,
    esc,
    free_port,
    ghz_html,
    ghz_report_binary,
    git_commit,
    html_page,
    html_table,
    machine,
    new_run_dir,
    publish_report,
    require_ghz,
    run_bounded,
    run_ghz,
    run_h2load,
    svg_bars,
    write_json,
)
from tools.bench_servers import ABLATIONS
from tools.devstack import Stack
from tools.envoy_config import Limit
from tools.loadtest import quiet_stack
from tools.loadtest_seed import ADMIN_EMAIL, Seeder, SeedResult

REPORTS = ROOT / "ghz-loadtests" / "reports"
EMPTY_CALL = "fittracker.user.v1.UserService/GetJwks"
#: Share of a path's measured maximum offered when its latency percentiles are measured.
LOAD_SHARE = 0.7
#: In-flight calls during the maximum-throughput phases, spread over this many HTTP/2 connections
#: (several, so that SO_REUSEPORT can spread them over workers: the kernel balances connections).
CONCURRENCY = 32
CONNECTIONS = 4
SYNC_THREADS = 16
BENCH_USERS = 100


@dataclass(frozen=True)
class Timing:
    """How long each phase runs."""

    warmup: float
    measure: float
    cache_ops: int

    @classmethod
    def of(cls, quick: bool) -> Timing:
        """Full: 2 s warm-up, 10 s per measurement. Quick: a second each, to check the wiring."""
        return cls(0.5, 1.5, 2_000) if quick else cls(2.0, 10.0, 20_000)


@dataclass(frozen=True)
class ReadPath:
    """The read the bench measures: which service serves it, its call, how to address a record."""

    service: str
    call: str
    data_set: str
    #: The JSON route of one record (for h2load against the edge).
    json_path: Callable[[Mapping[str, Any]], str]
    #: The serialized request for one record (for h2load's native gRPC body).
    grpc_request: Callable[[Mapping[str, Any]], bytes]


READS = {
    "user": ReadPath(
        "user", "fittracker.user.v1.UserService/GetUser", "user-names",
        lambda record: f"/v1/{record['name']}",
        lambda record: user_service_pb2.GetUserRequest(name=record["name"]).SerializeToString(),
    ),
    "workout": ReadPath(
        "workout", "fittracker.workout.v1.WorkoutService/GetSession", "session-names",
        lambda record: f"/v1/{record['name']}",
        lambda record: workout_service_pb2.GetSessionRequest(name=record["name"]).SerializeToString(),
    ),
}


@dataclass
class Figure:
    """One path's measurements: its maximum throughput and its latencies at 70 % of it."""

    name: str
    label: str
    tool: str
    peak: LoadResult | None = None
    at_load: LoadResult | None = None
    offered_rps: float = 0.0
    files: list[str] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name, "label": self.label, "tool": self.tool,
            "max": self.peak.as_dict() if self.peak else None,
            "at_load": self.at_load.as_dict() if self.at_load else None,
            "offered_rps": self.offered_rps, "files": self.files, "error": self.error,
        }


@dataclass
class Ratio:
    """A ratio of two figures, the target it is held against, and what limits it."""

    name: str
    value: float | None
    target: str
    met: bool | None
    numerator: str
    denominator: str
    limits: str


# --------------------------------------------------------------------------------------------
# Processes under test


class Server:
    """A server process on a port, with its output in a file or discarded."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], port: int, log: Path | None,
                 *, health: bool) -> None:
        """Describe it; ``start()`` runs it. ``health``: it serves grpc.health.v1 (else it serves GetJwks)."""
        self.name, self.argv, self.env, self.port, self.log = name, list(argv), dict(env), port, log
        self.health = health
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        """Start it and wait until it answers: SERVING to a health check, or a GetJwks reply."""
        output = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=output, start_new_session=True)
        finally:
            if not isinstance(output, int):
                output.close()
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            while True:
                if self.process.poll() is not None:
                    raise BenchError(f"{self.name} exited with {self.process.returncode} before serving"
                                     f"{'; see ' + str(self.log) if self.log else ' (rerun with --keep-logs)'}")
                try:
                    if self._answers(channel):
                        return self
                    time.sleep(0.05)
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise BenchError(f"{self.name} did not answer GetJwks within {timeout:.0f}s") from None
                    time.sleep(0.05)

    def _answers(self, channel: grpc.Channel) -> bool:
        if self.health:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        user_service_pb2_grpc.UserServiceStub(channel).GetJwks(user_service_pb2.GetJwksRequest(), timeout=0.5)
        return True

    def stop(self) -> None:
        """SIGTERM its process group (a supervisor and its workers), SIGKILL after 15 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Server:
        """Start it."""
        return self.start()

    def __exit__(self, *_: object) -> None:
        """Stop it."""
        self.stop()


# --------------------------------------------------------------------------------------------
# The bench


class Bench:
    """Runs every measurement of one bench run and keeps the figures."""

    def __init__(self, args: argparse.Namespace, run_dir: Path, progress: Progress) -> None:
        """Prepare the data directory and the environment every server under test gets."""
        self.args = args
        self.run_dir = run_dir
        self.progress = progress
        self.timing = Timing.of(args.quick)
        self.read = READS[args.read]
        self.data_dir = Path(tempfile.mkdtemp(prefix="fittracker-bench-"))
        self.keys_dir = self.data_dir / "keys"
        self.figures: dict[str, Figure] = {}
        self.cache: dict[str, Any] = {}
        self.per_call: dict[str, float] = {}
        self.validation: dict[str, dict[str, float]] = {}
        self.seed: SeedResult | None = None
        self.converter = None if args.no_ghz_html else ghz_report_binary(progress.note)
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python" / "generated")]),
            "FITTRACKER_HOST": "127.0.0.1",
            "FITTRACKER_DATA_DIR": str(self.data_dir),
            "FITTRACKER_JWT_KEYS_DIR": str(self.keys_dir),
            "FITTRACKER_ADMIN_EMAILS": ADMIN_EMAIL,
            "FITTRACKER_ACCESS_TOKEN_TTL_SECONDS": "3600",
            # Seeding registers accounts; no measured path hashes a password.
            "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
            "FITTRACKER_ARGON2_TIME_COST": "1",
            # Production's level: a JSON log line per call is part of what the runtime costs.
            "FITTRACKER_LOG_LEVEL": args.service_log_level,
        }

    # --- servers -------------------------------------------------------------------------------

    def service(self, service: str, workers: int = 1) -> Server:
        """``python -m services.<service>`` with ``workers`` SO_REUSEPORT workers on a free port."""
        port = free_port()
        env = {**self.env, "FITTRACKER_PORT": str(port), "FITTRACKER_WORKERS": str(workers)}
        return Server(f"{service} ({workers} worker{'s' if workers > 1 else ''})",
                      [sys.executable, "-m", f"services.{service}"], env, port, self._log(f"{service}-w{workers}"),
                      health=True)

    def reference(self, mode: str) -> Server:
        """A reference server of tools/bench_servers.py."""
        port = free_port()
        env = {**self.env, "FITTRACKER_PORT": str(port)}
        return Server(f"{mode} server", [sys.executable, "-m", "tools.bench_servers", mode, "--port", str(port),
                                         "--threads", str(SYNC_THREADS)], env, port, self._log(mode), health=False)

    def ablated(self, concern: str) -> Server:
        """The user service on the runtime with ``concern`` turned off (tools/bench_servers.py ablate)."""
        port = free_port()
        env = {**self.env, "FITTRACKER_PORT": str(port)}
        return Server(f"runtime without {concern}",
                      [sys.executable, "-m", "tools.bench_servers", "ablate", "--port", str(port),
                       "--without", concern], env, port, self._log(f"without-{concern}"), health=True)

    def _log(self, name: str) -> Path | None:
        if not self.args.keep_logs:
            return None
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        return self.run_dir / "logs" / f"{name}.log"

    # --- measurements --------------------------------------------------------------------------

    def ghz(self, name: str, label: str, host: str, call: str, *, data_file: str = "", token: str = "") -> Figure:
        """Warm up, measure the maximum, then the latencies at 70 % of it."""
        figure = Figure(name, label, "ghz")
        self.figures[name] = figure
        config: dict[str, Any] = {
            "call": call, "protoset": str(PROTOSET), "insecure": True, "host": host,
            "concurrency": CONCURRENCY, "connections": CONNECTIONS, "timeout": "5s",
            # In-flight calls cut off when a phase ends are not errors any client saw.
            "duration-stop": "ignore",
        }
        if data_file:
            config["data-file"] = data_file
        else:
            config["data"] = {}
        if token:
            config["metadata"] = {"authorization": f"Bearer {token}"}
        try:
            self._phase(f"{name}: warm-up", {**config, "duration": f"{self.timing.warmup}s"}, f"{name}.warmup")
            figure.peak = self._phase(f"{name}: max", {**config, "duration": f"{self.timing.measure}s"},
                                      f"{name}.max", figure)
            if figure.peak.rps <= 0 or figure.peak.error_rate() > 0.01:
                figure.error = f"max phase errors: {figure.peak.codes}"
                return figure
            figure.offered_rps = round(LOAD_SHARE * figure.peak.rps)
            figure.at_load = self._phase(
                f"{name}: at {LOAD_SHARE:.0%}",
                {**config, "duration": f"{self.timing.measure}s", "rps": figure.offered_rps}, f"{name}.at70", figure,
            )
        except BenchError as error:
            figure.error = str(error)
            self.progress.note(f"  {name}: {error}")
        return figure

    def _phase(self, label: str, config: Mapping[str, Any], file_name: str, figure: Figure | None = None) -> LoadResult:
        self.progress.start(f"  {label:<44}", float(str(config["duration"]).removesuffix("s")))
        result, json_path = run_ghz({**config, "name": file_name}, self.run_dir / "ghz", file_name,
                                    progress=self.progress)
        if figure is not None:
            figure.files.append(str(json_path.relative_to(self.run_dir)))
            html_path = ghz_html(self.converter, json_path)
            if html_path:
                figure.files.append(str(html_path.relative_to(self.run_dir)))
        else:
            json_path.unlink(missing_ok=True)
        p99 = f"{result.p99_ms:.2f} ms" if result.p99_ms is not None else "n/a"
        self.progress.done(f"{result.rps:9.1f} rps  p99 {p99}  {result.codes}")
        return result

    def h2load(self, name: str, label: str, url: str, headers: Mapping[str, str], body: bytes | None = None) -> Figure:
        """Maximum throughput of an HTTP route with h2load (same in-flight count as the ghz phases)."""
        figure = Figure(name, label, "h2load")
        self.figures[name] = figure
        clients, streams = CONNECTIONS, CONCURRENCY // CONNECTIONS
        extra: list[str] = []
        if body is not None:
            body_path = self.run_dir / "h2load" / f"{name}.body"
            body_path.parent.mkdir(parents=True, exist_ok=True)
            body_path.write_bytes(body)
            extra = ["-d", str(body_path)]
        try:
            self.progress.start(f"  {name}: max{'':<36}", self.timing.measure + 1)
            figure.peak = run_h2load(url, headers=headers, seconds=self.timing.measure, clients=clients,
                                     streams=streams, progress=self.progress, extra=extra)
            self.progress.done(f"{figure.peak.rps:9.1f} rps  mean {figure.peak.mean_ms or 0:.2f} ms  "
                               f"{figure.peak.codes}")
        except BenchError as error:
            figure.error = str(error)
            self.progress.done(f"ERROR {error}")
        return figure

    # --- sections ------------------------------------------------------------------------------

    def run(self) -> None:
        """Every section, in an order that reuses started servers."""
        load_or_create_signing_key(self.keys_dir, allow_create=True)
        read = self.read
        self.progress.note(f"[bench] runtime, 1 worker (+ seeding {BENCH_USERS} accounts)")
        with self.service("user") as user:
            readers = [user] if read.service == "user" else [user, self.service(read.service).start()]
            try:
                addresses = {"user": user.address, read.service: readers[-1].address}
                self.seed = asyncio.run(_seed(Seeder(addresses, self.run_dir / "seed", self.progress.note),
                                              BENCH_USERS))
                self.ghz("empty.runtime", "empty RPC, shared runtime, 1 worker", user.address, EMPTY_CALL)
                self.ghz("read.runtime", f"{read.call.split('/')[-1]}, shared runtime, 1 worker",
                         readers[-1].address, read.call, data_file=self._data_file(), token=self.seed.admin_token)
            finally:
                for server in readers[1:]:
                    server.stop()
        self.progress.note("[bench] bare grpc.aio server (no interceptors)")
        with self.reference("bare") as bare:
            self.ghz("empty.bare", "empty RPC, bare grpc.aio server", bare.address, EMPTY_CALL)
        for concern in ABLATIONS:
            self.progress.note(f"[bench] ablation: the runtime without {concern}")
            with self.ablated(concern) as ablated:
                self.ghz(f"empty.without.{concern}", f"empty RPC, shared runtime without {concern}",
                         ablated.address, EMPTY_CALL)
        self.progress.note(f"[bench] thread-pool peer (grpc.server + ThreadPoolExecutor({SYNC_THREADS}))")
        with self.reference("sync") as sync:
            self.ghz("empty.sync", "empty RPC, sync thread-pool server", sync.address, EMPTY_CALL)
        self.progress.note("[bench] runtime, 2 SO_REUSEPORT workers")
        with self.service(read.service, workers=2) as pair:
            if read.service == "user":
                self.ghz("empty.runtime.w2", "empty RPC, shared runtime, 2 workers", pair.address, EMPTY_CALL)
            self.ghz("read.runtime.w2", f"{read.call.split('/')[-1]}, shared runtime, 2 workers", pair.address,
                     read.call, data_file=self._data_file(), token=self._token())
        self.edge_section()
        self.progress.note("[bench] cache")
        self.cache = asyncio.run(cache_bench(self.run_dir, self.timing, self.progress))
        self.per_call = session_check_cost(self.progress)
        self.validation = validation_cost(self.progress)

    def edge_section(self) -> None:
        """The read through Envoy against the same replica directly; JSON against gRPC at the edge."""
        read = self.read
        services = sorted({"user", read.service})
        self.progress.note(f"[bench] Envoy edge in front of 1 replica of {', '.join(services)}")
        env = {k: v for k, v in self.env.items() if k.startswith("FITTRACKER_") and k not in (
            "FITTRACKER_DATA_DIR", "FITTRACKER_JWT_KEYS_DIR", "FITTRACKER_HOST")}
        limit = Limit(1_000_000)
        stack = quiet_stack(
            Stack(self.data_dir, services=services, replicas=1, use_free_ports=True, service_env=env,
                  rate_limit_rps=limit.requests, ip_limit=limit, user_limit=limit, sink=self.progress.note),
            self.run_dir / "logs" if self.args.keep_logs else None, keep_access_log=False,
        )
        stack.start(timeout=60)
        try:
            replica = str(stack.replica(read.service, 0).address)
            name = read.call.split("/")[-1]
            self.ghz("read.direct", f"{name}, straight to the replica", replica, read.call,
                     data_file=self._data_file(), token=self._token())
            self.ghz("read.edge", f"{name}, native gRPC through Envoy", stack.edge_target, read.call,
                     data_file=self._data_file(), token=self._token())
            record = json.loads(Path(self._data_file()).read_text())[0]
            auth = {"authorization": f"Bearer {self._token()}"}
            self.h2load("json.edge", f"{name}, JSON through Envoy (h2load)",
                        f"{stack.edge_url}{read.json_path(record)}", auth)
            message = read.grpc_request(record)
            frame = b"\x00" + len(message).to_bytes(4, "big") + message
            self.h2load("grpc.edge", f"{name}, native gRPC through Envoy (h2load)",
                        f"{stack.edge_url}/{read.call}",
                        {**auth, "content-type": "application/grpc", "te": "trailers"}, body=frame)
        finally:
            stack.stop()

    def _data_file(self) -> str:
        assert self.seed is not None
        return str(self.seed.files[self.read.data_set])

    def _token(self) -> str:
        assert self.seed is not None
        return self.seed.admin_token

    def close(self) -> None:
        """Remove the data directory."""
        shutil.rmtree(self.data_dir, ignore_errors=True)


def validation_cost(progress: Progress) -> dict[str, dict[str, float]]:
    """The contracts' rules per valid message: protovalidate-python (the oracle) vs the compiled checks."""
    progress.note("[bench] request validation: protovalidate vs the compiled rules")
    messages = {
        "user GetUserRequest": user_service_pb2.GetUserRequest(name="users/u123"),
        "user RegisterRequest": user_service_pb2.RegisterRequest(
            email="someone@example.com", password="correct horse battery", display_name="Sam",  # noqa: S106
            request_id="0123456789abcdef"),
        "workout LogSetRequest": workout_service_pb2.LogSetRequest(
            parent="users/u1/sessions/s1", request_id="0123456789abcdef",
            set=workout_pb2.WorkoutSet(exercise="exercises/bench_press", set_type=workout_pb2.SET_TYPE_WORKING,
                                       reps=8, weight_kg=80, rpe=8.5, notes="felt strong")),
    }
    oracle, compiled = Validator(), RequestValidator()  # type: ignore[no-untyped-call]  # protovalidate is unannotated
    found: dict[str, dict[str, float]] = {}
    for name, message in messages.items():
        old_runs, new_runs = 10, 20_000
        old = min(timeit.repeat(partial(oracle.collect_violations, message), number=old_runs, repeat=2)) / old_runs
        new = min(timeit.repeat(partial(compiled.check, message), number=new_runs, repeat=2)) / new_runs
        found[name] = {"protovalidate_us": old * 1e6, "compiled_us": new * 1e6}
        progress.note(f"  {name:24} protovalidate {old * 1e6:9.1f} µs   compiled {new * 1e6:6.2f} µs   "
                      f"x{old / new:,.0f}")
    return found


#: Revoked sessions in the view the per-call check is timed against: a busy quarter-hour's logouts.
REVOKED_SESSIONS = 100_000


class _NoLog:
    """A revocation log that is never read: the timing below is of the in-memory check alone."""

    async def ensure(self) -> None:
        """Nothing to prepare."""

    async def add(self, key: str, revoked_at: float, keep_seconds: float) -> None:
        """Nothing is stored."""

    async def since(self, after: float) -> list[tuple[str, float]]:
        """Nothing was revoked elsewhere."""
        return []


def session_check_cost(progress: Progress) -> dict[str, float]:
    """What ending sessions costs a call: the revocation lookup and the deadline budget.

    The budget wraps only handlers of calls without a deadline of their own (under the longest).
    """
    progress.note(f"[bench] per-call cost of session revocation ({REVOKED_SESSIONS:,} revoked sessions in view)")
    revocations = Revocations(_NoLog(), token_ttl_seconds=900, poll_seconds=1)

    async def fill() -> None:
        for i in range(REVOKED_SESSIONS):
            await revocations.revoke_session(f"s{i}")

    asyncio.run(fill())
    live = Principal(user_id="u", role="member", session_id="live-session", token_id="t1")  # noqa: S106  # noqa: S106 - an id
    rounds = 200_000
    started = time.perf_counter()
    for _ in range(rounds):
        revocations.is_revoked(live)
    check_ns = (time.perf_counter() - started) / rounds * 1e9

    async def budgets() -> tuple[float, float]:
        async def handler() -> None:
            return None

        n = 50_000
        t0 = time.perf_counter()
        for _ in range(n):
            await handler()
        bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n):
            async with asyncio.timeout(30):
                await handler()
        return bare / n * 1e9, (time.perf_counter() - t0) / n * 1e9

    bare_ns, budgeted_ns = asyncio.run(budgets())
    return {"revocation_check_ns": check_ns, "deadline_budget_ns": budgeted_ns - bare_ns}


async def _seed(seeder: Seeder, users: int) -> SeedResult:
    # One event loop for the seeder's channels from first call to close.
    try:
        return await seeder.seed(users)
    finally:
        await seeder.close()


# --------------------------------------------------------------------------------------------
# Cache


async def cache_bench(run_dir: Path, timing: Timing, progress: Progress) -> dict[str, Any]:
    """Latencies of L1 hits, Redis hits and misses; pipelined throughput; redis-benchmark beside it."""
    server = RedisServer.start(run_dir / "redis")
    client = aioredis.Redis.from_url(server.url)
    try:
        metrics = CacheMetrics()
        value = user_service_pb2.GetJwksResponse()
        name = f"bench{uuid.uuid4().hex[:6]}"
        with_l1: Cache[user_service_pb2.GetJwksResponse] = Cache(
            name, ProtoCodec(user_service_pb2.GetJwksResponse), redis=client, metrics=metrics)
        redis_only: Cache[user_service_pb2.GetJwksResponse] = Cache(
            name + "r", ProtoCodec(user_service_pb2.GetJwksResponse), redis=client, metrics=metrics,
            l1_max_entries=0)
        await with_l1.start()
        await redis_only.start()

        async def load() -> user_service_pb2.GetJwksResponse:
            return value

        keys = [f"k{i}" for i in range(1000)]
        for key in keys:
            await with_l1.get_or_load(key, load)
            await redis_only.get_or_load(key, load)
        n = timing.cache_ops
        progress.note(f"  cache latencies ({n} L1 hits, {n // 4} Redis hits, {n // 10} misses, "
                      f"{n // 40} invalidations)")
        results: dict[str, Any] = {
            "l1_hit_us": await _latencies(n, lambda i: with_l1.get_or_load(keys[i % 1000], load)),
            "redis_hit_us": await _latencies(n // 4, lambda i: redis_only.get(keys[i % 1000])),
            "miss_us": await _latencies(n // 10, lambda i: redis_only.get_or_load(f"miss{i}", load)),
            "invalidate_us": await _latencies(n // 40, lambda i: with_l1.invalidate(keys[i % 1000])),
        }
        results["throughput"] = await _throughput(redis_only, with_l1, keys, load, timing, progress)
        await with_l1.close()
        await redis_only.close()
        results["redis_benchmark"] = redis_benchmark(server.port, timing, progress)
        return results
    finally:
        await client.aclose()
        server.stop()


async def _latencies(count: int, op: Callable[[int], Awaitable[object]]) -> dict[str, float]:
    """Per-operation latency percentiles in microseconds, one operation at a time."""
    samples = []
    clock = time.perf_counter_ns
    for i in range(count):
        started = clock()
        await op(i)
        samples.append((clock() - started) / 1000)
    samples.sort()
    return {
        "n": count,
        "p50": samples[len(samples) // 2],
        "p99": samples[int(len(samples) * 0.99)],
        "mean": statistics.fmean(samples),
    }


async def _throughput(redis_only: Cache[Any], with_l1: Cache[Any], keys: list[str],
                      load: Callable[[], Awaitable[Any]], timing: Timing, progress: Progress) -> dict[str, float]:
    """Cache lookups per second from this one process: pipelined, one at a time, and from L1."""
    seconds = max(1.0, timing.measure / 2)

    async def for_a_while(tasks: int, work: Callable[[], Awaitable[int]]) -> float:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                done += await work()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(tasks)))
        return done / (time.perf_counter() - started)

    batch = keys[:100]

    async def many() -> int:
        return len(await redis_only.get_many(batch))

    async def single() -> int:
        await redis_only.get(keys[0])
        return 1

    async def l1_hit() -> int:
        await with_l1.get_or_load(keys[0], load)
        return 1

    progress.note(f"  cache throughput ({seconds:.0f} s each: pipelined, one at a time, L1)")
    return {
        "pipelined_ops_per_s": await for_a_while(4, many),
        "pipeline_batch": len(batch),
        "unpipelined_ops_per_s": await for_a_while(32, single),
        "l1_hits_per_s": await for_a_while(1, l1_hit),
    }


def redis_benchmark(port: int, timing: Timing, progress: Progress) -> dict[str, Any]:
    """``redis-benchmark`` GET/SET on the same Redis: pipelined (-P 16) and not (-P 1), 50 clients."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"error": "redis-benchmark not found (make deps)"}
    requests = timing.cache_ops * 10
    found: dict[str, Any] = {"requests": requests, "clients": 50}
    for pipeline in (16, 1):
        progress.note(f"  redis-benchmark -t get,set -P {pipeline} -n {requests}")
        done = run_bounded([binary, "-h", "127.0.0.1", "-p", str(port), "-t", "get,set", "-n", str(requests),
                            "-c", "50", "-P", str(pipeline), "--csv"], limit_seconds=120)
        rows = list(csv.DictReader(io.StringIO(done.stdout)))
        found[f"P{pipeline}"] = {row["test"]: float(row["rps"]) for row in rows if row.get("rps")}
    return found


# --------------------------------------------------------------------------------------------
# Ratios and the report


def _rps(figures: Mapping[str, Figure], name: str) -> float | None:
    figure = figures.get(name)
    return figure.peak.rps if figure and figure.peak and figure.peak.rps > 0 else None


def ablation(figures: Mapping[str, Figure]) -> list[dict[str, Any]]:
    """What each concern costs: the share of the runtime's own cost that turning it off alone removes.

    ``cost`` is 1 - whole/without (the throughput the concern takes); the last row, the whole
    runtime against the bare server, is what all of them together take, to set the sum against.
    """
    whole, bare = _rps(figures, "empty.runtime"), _rps(figures, "empty.bare")
    rows: list[dict[str, Any]] = []
    for concern in ABLATIONS:
        without = _rps(figures, f"empty.without.{concern}")
        cost = 1 - whole / without if whole and without else None
        rows.append({"concern": concern, "rps_without": without, "cost": cost})
    costs = [r["cost"] for r in rows if r["cost"] is not None]
    rows.append({"concern": "sum of the above", "rps_without": None, "cost": sum(costs) if costs else None})
    rows.append({"concern": "whole runtime (vs bare grpc.aio)", "rps_without": bare,
                 "cost": 1 - whole / bare if whole and bare else None})
    return rows


def ratios(figures: Mapping[str, Figure], cache: Mapping[str, Any], read: ReadPath) -> list[Ratio]:
    """Each ratio the targets are stated in, from this run's figures."""
    shared = "ghz shares the 2 cores with the servers, so each maximum is with the load generator on it"

    def ratio(name: str, top: str, bottom: str, target: str, check: Callable[[float], bool], limits: str,
              transform: Callable[[float], float] = lambda x: x) -> Ratio:
        a, b = _rps(figures, top), _rps(figures, bottom)
        value = transform(a / b) if a and b else None
        return Ratio(name, value, target, check(value) if value is not None else None, top, bottom, limits)

    read_name = read.call.split("/")[-1]
    found = [
        ratio("runtime overhead (1 - runtime/bare, empty RPC)", "empty.runtime", "empty.bare", "< 15 %",
              lambda v: v < 0.15, f"{shared}; the runtime logs a JSON line per call at INFO (discarded to "
              "/dev/null here, the formatting is paid); tracing spans are created but not exported",
              transform=lambda x: 1 - x),
        ratio(f"read ({read_name}) / empty RPC, same runtime", "read.runtime", "empty.runtime", ">= 0.80",
              lambda v: v >= 0.8, f"{shared}; the read verifies an ES256 token per call (the empty RPC is "
              "public) and reads the embedded SQLite store: the cache is not wired into the service yet"),
        ratio("edge cost (1 - edge/direct, same replica)", "read.edge", "read.direct", "< 30 %",
              lambda v: v < 0.3, f"{shared}, and Envoy's own threads too; Envoy verifies the JWT and the "
              "service verifies it again", transform=lambda x: 1 - x),
        ratio("JSON transcoding / native gRPC at the edge (h2load)", "json.edge", "grpc.edge", "(reported)",
              lambda v: True, "both with h2load, one resource each; h2load counts HTTP 2xx (gRPC status is "
              "checked by the ghz runs)"),
        ratio("ours / thread-pool peer (empty RPC)", "empty.runtime", "empty.sync", ">= 2x",
              lambda v: v >= 2.0, f"{shared}; the peer runs no interceptors at all, ours runs all of them"),
        ratio("2 workers / 1 worker (empty RPC)", "empty.runtime.w2", "empty.runtime", "(reported; ideal 2x)",
              lambda v: True, f"{shared}: with 2 cores and ghz on them, 2 workers cannot reach 2x"),
        ratio(f"2 workers / 1 worker ({read_name})", "read.runtime.w2", "read.runtime", "(reported; ideal 2x)",
              lambda v: True, f"{shared}: with 2 cores and ghz on them, 2 workers cannot reach 2x"),
    ]
    throughput = cache.get("throughput", {})
    ops = throughput.get("pipelined_ops_per_s")
    bench_get = cache.get("redis_benchmark", {}).get("P16", {}).get("GET")
    found.append(Ratio("cache lookups/s, one Python process, pipelined (get_many)", ops, ">= 50,000/s",
                       ops >= 50_000 if ops else None, "cache.get_many", "",
                       f"batches of {throughput.get('pipeline_batch')} keys, L1 off, 4 concurrent batches; "
                       "the Redis server is on the same cores"))
    found.append(Ratio("cache pipelined / redis-benchmark GET -P 16", ops / bench_get if ops and bench_get else None,
                       "(reported)", None, "cache.get_many", "redis-benchmark",
                       "redis-benchmark is C with 50 connections; each cache lookup reads 2 keys (version and "
                       "value) in one MGET"))
    for name, figure in figures.items():
        if name.startswith("empty.without."):
            continue  # the ablation's runs measure cost, not a path anyone calls
        if figure.tool == "ghz" and figure.at_load is not None and figure.at_load.p99_ms is not None:
            p99 = figure.at_load.p99_ms
            found.append(Ratio(f"p99 at {LOAD_SHARE:.0%} of max: {name} ({figure.offered_rps:.0f} rps offered)", p99,
                               "< 100 ms", p99 < 100, name, "", "latency at a stated load, generator on the same "
                               "cores"))
    return found


def render(report: Mapping[str, Any], figures: Mapping[str, Figure], found: Sequence[Ratio]) -> str:
    """bench.html: the ratios against their targets, every figure, and bar charts; no scripts."""
    meta = report["meta"]
    parts = [
        f"<p>{esc(meta['started'])} &middot; commit <code>{esc(meta['commit'])}</code> &middot; "
        f"{esc(meta['machine']['cpus'])} CPUs, load average at start {esc(meta['machine']['loadavg_at_start'])}"
        f"{' &middot; <b>quick mode: not a measurement</b>' if meta['quick'] else ''}</p>",
        f"<p class=note>{esc(meta['method'])}</p>",
        "<h2>Ratios and targets</h2>",
    ]
    rows = []
    for r in found:
        verdict = "" if r.met is None else (
            "<span class=pass>met</span>" if r.met else "<span class=fail>missed</span>")
        if r.value is None:
            shown = "n/a"
        elif "p99" in r.name:
            shown = f"{r.value:.2f} ms"
        elif "/s" in r.target:
            shown = f"{r.value:,.0f}/s"
        elif "%" in r.target:
            shown = f"{r.value:.1%}"
        else:
            shown = f"{r.value:.2f}x"
        rows.append([r.name, shown, r.target, verdict, esc(r.limits)])
    parts.append(html_table(["figure", "value", "target", "", "what limits it"], rows, raw_columns=(3, 4)))
    parts.append("<h2>Paths</h2>")
    path_rows = []
    for figure in figures.values():
        peak, at = figure.peak, figure.at_load

        def ms(value: float | None) -> str:
            return f"{value:.2f}" if value is not None else ""

        links = " ".join(f'<a href="{esc(f)}">{esc(Path(f).name)}</a>' for f in figure.files if f.endswith(".html"))
        path_rows.append([
            figure.name, figure.label, figure.tool, f"{peak.rps:,.0f}" if peak else "",
            ms(peak.mean_ms if peak else None), f"{figure.offered_rps:,.0f}" if figure.offered_rps else "",
            ms(at.p50_ms if at else None), ms(at.p95_ms if at else None), ms(at.p99_ms if at else None),
            esc(figure.error) + links,
        ])
    parts.append(html_table(["path", "what", "tool", "max rps", "mean ms at max", f"offered rps ({LOAD_SHARE:.0%})",
                             "p50 ms", "p95 ms", "p99 ms", "notes / ghz"], path_rows, raw_columns=(9,)))
    parts.append(svg_bars("Maximum throughput (calls/s)",
                          [(f.name, f.peak.rps if f.peak else None) for f in figures.values()], "rps"))
    parts.append("<br>")
    parts.append(svg_bars(f"p99 at {LOAD_SHARE:.0%} of each path's maximum (ms)",
                          [(f.name, f.at_load.p99_ms if f.at_load else None) for f in figures.values()], "ms",
                          limit=100.0, limit_label="100 ms target"))
    cache = report.get("cache") or {}
    if cache:
        parts.append("<h2>Cache</h2>")
        latency_rows = [[label, f"{cache[key]['p50']:.1f}", f"{cache[key]['p99']:.1f}", f"{cache[key]['mean']:.1f}",
                         cache[key]["n"]]
                        for key, label in (("l1_hit_us", "L1 hit (get_or_load)"), ("redis_hit_us", "Redis hit (get)"),
                                           ("miss_us", "miss: Redis read + load + compare-and-set"),
                                           ("invalidate_us", "invalidate (INCR, DEL, PUBLISH, acks)"))
                        if key in cache]
        parts.append(html_table(["operation", "p50 µs", "p99 µs", "mean µs", "n"], latency_rows))
        throughput = cache.get("throughput", {})
        bench = cache.get("redis_benchmark", {})
        bars = [
            ("cache get_many, pipelined", throughput.get("pipelined_ops_per_s")),
            ("cache get, one at a time (32 tasks)", throughput.get("unpipelined_ops_per_s")),
            ("cache L1 hits, one task", throughput.get("l1_hits_per_s")),
            ("redis-benchmark GET -P 16", bench.get("P16", {}).get("GET")),
            ("redis-benchmark GET -P 1", bench.get("P1", {}).get("GET")),
        ]
        parts.append(svg_bars("Cache operations per second", bars, "ops/s", limit=50_000.0,
                              limit_label="50,000/s target"))
    per_call = report.get("per_call") or {}
    if per_call:
        parts.append("<h2>Per-call cost of ending sessions</h2>")
        parts.append(html_table(["what", "ns per call"], [
            [f"revocation lookup ({REVOKED_SESSIONS:,} revoked sessions in view)",
             f"{per_call['revocation_check_ns']:.0f}"],
            ["deadline budget around a unary handler (asyncio.timeout)", f"{per_call['deadline_budget_ns']:.0f}"],
        ]))
    ablated: list[dict[str, Any]] = report.get("ablation") or []
    if ablated:
        parts.append("<h2>Ablation: what each concern costs (empty RPC, turned off alone)</h2>")
        parts.append(html_table(["concern", "rps without it", "share of throughput it takes"], [
            [r["concern"], "" if r["rps_without"] is None else f"{r['rps_without']:,.0f}",
             "n/a" if r["cost"] is None else f"{r['cost']:.1%}"] for r in ablated
        ]))
    validation = report.get("validation") or {}
    if validation:
        parts.append("<h2>Request validation per valid message</h2>")
        parts.append(html_table(["message", "protovalidate µs", "compiled µs", "speed-up"], [
            [name, f"{v['protovalidate_us']:.1f}", f"{v['compiled_us']:.2f}",
             f"x{v['protovalidate_us'] / v['compiled_us']:,.0f}"]
            for name, v in validation.items()
        ]))
    return html_page("FitTracker bench", "\n".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make bench``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about a second per phase: checks the wiring only")
    parser.add_argument("--read", choices=sorted(READS), default="user",
                        help="which read to measure: user GetUser (default) or workout GetSession")
    parser.add_argument("--service-log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="the services' log level (INFO, production's, by default)")
    parser.add_argument("--keep-logs", action="store_true", help="write the servers' output to logs/")
    parser.add_argument("--no-ghz-html", action="store_true", help="skip ghz's own HTML pages")
    parser.add_argument("--report-dir", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    try:
        require_ghz()
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    if args.read != "user" and not (ROOT / "services" / args.read / "__main__.py").exists():
        print(f"bench: the {args.read} service does not exist yet", file=sys.stderr)
        return 2
    started = datetime.now(UTC)
    run_dir = new_run_dir(args.report_dir, f"{started:%Y%m%d-%H%M%S}-bench{'-quick' if args.quick else ''}")
    progress = Progress()
    timing = Timing.of(args.quick)
    progress.note(f"bench: {'quick' if args.quick else 'full'} run, report in {run_dir}")
    bench = Bench(args, run_dir, progress)
    code = 0
    try:
        bench.run()
    except (BenchError, OSError, RuntimeError, grpc.RpcError) as error:
        progress.note(f"bench: stopped: {error}")
        code = 2
    except KeyboardInterrupt:
        progress.note("bench: interrupted; writing what was measured")
        code = 2
    finally:
        bench.close()
    found = ratios(bench.figures, bench.cache, bench.read)
    meta = {
        "started": started.isoformat(timespec="seconds"), "commit": git_commit(), "machine": machine(),
        "quick": args.quick, "read": args.read, "timing": asdict(timing),
        "method": (f"Each gRPC path: ghz, {CONCURRENCY} calls in flight over {CONNECTIONS} connections, "
                   f"{timing.warmup:g} s warm-up, {timing.measure:g} s at no rate limit (max), then "
                   f"{timing.measure:g} s at {LOAD_SHARE:.0%} of that max (latencies). Servers: embedded store, "
                   f"log level {args.service_log_level} (output discarded unless --keep-logs), argon2 at test "
                   f"cost (no measured call hashes). The edge: Envoy with the stack's config, 1 replica, "
                   f"rate limits lifted (still evaluated), access log discarded."),
    }
    ablation_rows = ablation(bench.figures)
    report: dict[str, Any] = {
        "meta": meta,
        "ratios": [asdict(r) for r in found],
        "figures": {name: figure.as_dict() for name, figure in bench.figures.items()},
        "cache": bench.cache,
        "per_call": bench.per_call,
        "validation": bench.validation,
        "ablation": ablation_rows,
    }
    write_json(run_dir / "bench.json", report)
    (run_dir / "bench.html").write_text(render(report, bench.figures, found))
    publish_report(run_dir, args.report_dir / "latest-bench")
    for r in found:
        mark = "" if r.met is None else ("  met" if r.met else "  MISSED")
        value = "n/a" if r.value is None else f"{r.value:,.3f}"
        progress.note(f"{r.name:<78} {value:>12}  target {r.target}{mark}")
    for row in ablation_rows:
        cost = "n/a" if row["cost"] is None else f"{row['cost']:.1%}"
        progress.note(f"ablation: {row['concern']:<36} {cost:>8}")
    if bench.per_call:
        progress.note(f"per call: revocation lookup {bench.per_call['revocation_check_ns']:.0f} ns, "
                      f"deadline budget {bench.per_call['deadline_budget_ns']:.0f} ns")
    progress.note(f"report: {run_dir / 'bench.html'} (also {args.report_dir / 'latest-bench'})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
