"""Start real servers for tests: Redis (Debian's ``redis-server``) and FerretDB (MongoDB wire protocol).

Each server listens on a free loopback port with its files in a temporary directory, and is ready
when it answers a ping. A missing binary fails with the command that installs it (``make deps``);
nothing here skips silently.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pymongo

from tools.devstack import free_ports

REPO_ROOT = Path(__file__).resolve().parent.parent
FERRETDB_BIN = REPO_ROOT / ".cache" / "bin" / "ferretdb"
#: How long a server may take to answer its first ping.
READY_TIMEOUT_SECONDS = 20.0
#: Free-port races (another process taking the port between our probe and the server's bind) are retried.
_START_ATTEMPTS = 3
_POLL_INTERVAL_SECONDS = 0.02


class ServerStartError(RuntimeError):
    """A test server is missing or did not become ready."""


@dataclass
class RunningServer:
    """A started server process; ``stop()`` ends it."""

    name: str
    process: subprocess.Popen[bytes]
    host: str
    port: int
    url: str
    log_path: Path
    #: The argv it was started with, to start it again on the same port and files.
    argv: tuple[str, ...] = ()
    ready: Callable[[str], bool] | None = None

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown work, no flush) and reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        """Start the stopped server again with the same argv (same port, same files); wait until ready."""
        if self.process.poll() is None:
            raise ServerStartError(f"{self.name} still runs; stop or kill it first")
        assert self.ready is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(self.argv), cwd=self.log_path.parent, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not self.ready(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServerStartError(f"{self.name} did not come back on port {self.port}:\n{self.log_tail()}")
            time.sleep(_POLL_INTERVAL_SECONDS)  # polling interval between readiness probes

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server and wait for it, killing it if it does not exit in ``timeout``."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, below the ephemeral range (the fault tests restart servers on
    their port, and an outgoing connection must not take it meanwhile)."""
    return free_ports(1, host)[0]


def _require(binary: Path | str, what: str) -> str:
    found = shutil.which(str(binary))
    if found is None:
        raise ServerStartError(f"{what} not found at {binary}: run `make deps` (tools/install_deps.sh) first")
    return found


def _start(
    name: str,
    workdir: Path,
    command: Callable[[int], Sequence[str]],
    url: Callable[[int], str],
    ready: Callable[[str], bool],
) -> RunningServer:
    """Start ``command(port)`` on a free port and wait until ``ready(url)``; retry if the port was taken."""
    workdir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for attempt in range(_START_ATTEMPTS):
        port = free_port()
        log_path = workdir / f"{name}.{attempt}.log"
        with log_path.open("wb") as log:
            # The argv is built here from fixed flags and a binary we located; no shell, no outside input.
            process = subprocess.Popen(
                list(command(port)),
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = RunningServer(name, process, "127.0.0.1", port, url(port), log_path, tuple(command(port)), ready)
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if ready(server.url):
                return server
            time.sleep(
                _POLL_INTERVAL_SECONDS
            )  # polling interval between readiness probes, not a wait for readiness
        server.stop()
        tail = server.log_tail()
        failures.append(f"attempt {attempt + 1} (port {port}, exit code {process.returncode}):\n{tail}")
        if "address already in use" not in tail.lower():
            break
    raise ServerStartError(
        f"{name} did not start (it must answer a ping within {READY_TIMEOUT_SECONDS:.0f}s); log tail:\n"
        + "\n".join(failures)
    )


def _redis_ready(url: str) -> bool:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _mongo_ready(url: str) -> bool:
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        url, serverSelectionTimeoutMS=250, connectTimeoutMS=250
    )
    try:
        client.admin.command("ping")
        return True
    except pymongo.errors.PyMongoError:
        return False
    finally:
        client.close()


def start_redis(tmpdir: Path, *, durable: bool = False) -> RunningServer:
    """Start ``redis-server`` on a free loopback port in ``tmpdir``; without persistence unless ``durable``.

    ``durable`` is how the events' Redis runs in production: an append-only file synced before
    each reply (``appendfsync always``), so a killed and restarted Redis keeps every stream entry
    it acknowledged.
    """
    binary = _require("redis-server", "redis-server")

    def command(port: int) -> list[str]:
        return [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if durable else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(tmpdir),
            "--daemonize",
            "no",
        ]

    return _start("redis", tmpdir, command, lambda port: f"redis://127.0.0.1:{port}/0", _redis_ready)


def start_ferretdb(tmpdir: Path) -> RunningServer:
    """Start FerretDB (SQLite backend, files in ``tmpdir``) on a free loopback port."""
    binary = _require(FERRETDB_BIN, "FerretDB")
    data_dir = tmpdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    def command(port: int) -> list[str]:
        return [
            binary,
            "--handler=sqlite",
            f"--sqlite-url=file:{data_dir}/",
            f"--listen-addr=127.0.0.1:{port}",
            "--telemetry=disable",
            f"--state-dir={tmpdir}",
            # Its debug HTTP listener defaults to the fixed port 8088; "-" turns it off.
            "--debug-addr=-",
            "--log-level=WARN",
        ]

    return _start("ferretdb", tmpdir, command, lambda port: f"mongodb://127.0.0.1:{port}/", _mongo_ready)


def _http_ready(url: str) -> bool:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1) as sock:
            sock.sendall(b"HEAD / HTTP/1.1\r\nHost: ready\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.1 ")
    except OSError:
        return False


def start_varnish(tmpdir: Path, vcl: str) -> RunningServer:
    """Start Debian's ``varnishd`` in the foreground on a free loopback port with ``vcl``.

    ``-j none``: no privilege separation, so it runs as whoever starts it (root in CI) without the
    packaged service's users and directories; ``-n`` keeps its working files in ``tmpdir``.
    """
    binary = _require(shutil.which("varnishd") or "/usr/sbin/varnishd", "varnishd (Debian package varnish)")
    tmpdir.mkdir(parents=True, exist_ok=True)
    vcl_path = tmpdir / "cdn.vcl"
    vcl_path.write_text(vcl)

    def command(port: int) -> list[str]:
        return [
            binary, "-F", "-j", "none",
            "-n", str(tmpdir / "instance"),
            "-a", f"127.0.0.1:{port}",
            "-f", str(vcl_path),
            "-s", "malloc,64m",
            # The management interface on a free port of its own, loopback only.
            "-T", "127.0.0.1:0",
        ]

    return _start("varnish", tmpdir, command, lambda port: f"http://127.0.0.1:{port}", _http_ready)
