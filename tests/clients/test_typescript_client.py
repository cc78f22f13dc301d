"""The TypeScript gRPC-Web client (clients/typescript): it typechecks, and it works against the edge.

The smoke script (clients/typescript/scripts/smoke.ts, compiled by tsc) registers, reads the
caller, lists exercises, opens the Subscribe stream and provokes an INVALID_ARGUMENT, all over
gRPC-Web through the real Envoy; it prints one JSON object that the test checks.

The browser test runs the same SDK in headless Chromium (Debian's, driven by playwright-core):
a page bundled by esbuild from clients/typescript/browser/ is served from two local origins, one
the edge allows and one it does not. From the first, a unary and a server-streaming call work;
from the second, the browser itself refuses the call after the edge's preflight answer.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tools import gen
from tools.devstack import Stack

ROOT = Path(__file__).resolve().parents[2]
TS_CLIENT = ROOT / "clients" / "typescript"
SERVICE_ENV = {
    "FITTRACKER_ENVIRONMENT": "test",
    "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
    "FITTRACKER_ARGON2_TIME_COST": "1",
    "FITTRACKER_GRACE_SECONDS": "1",
    "FITTRACKER_DRAIN_NOTICE_SECONDS": "1",
    "FITTRACKER_LOG_LEVEL": "WARNING",
}


def npx() -> str:
    """The npx of the Node installation (Node 20+ is a requirement of the TypeScript client)."""
    found = shutil.which("npx")
    assert found is not None, "npx not found: install Node 20+ to build the TypeScript client"
    return found


@pytest.fixture(scope="module")
def node_modules() -> None:
    """The locked npm packages, installed with `npm ci` when missing (as tools/gen.py does)."""
    gen.ensure_ts_plugin()


def tsc(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the locked TypeScript compiler on clients/typescript.

    From inside the package: npx elsewhere would not see its node_modules/.bin and, with
    --no-install, fail rather than fetch the unrelated "tsc" package from the registry.
    """
    return subprocess.run([npx(), "--no-install", "tsc", "-p", ".", *args],
                          cwd=TS_CLIENT, capture_output=True, text=True, timeout=120, check=False)


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without a log line per request."""

    def log_message(self, format: str, *args: Any) -> None:
        """Say nothing: pytest would show the lines only as noise."""


@dataclass
class PageOrigins:
    """The browser test page, served on two loopback ports: two origins."""

    allowed: str
    refused: str


@pytest.fixture(scope="module")
def page_origins(node_modules: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageOrigins]:
    """browser/index.html and its bundle, on an origin the stack allows and on one it does not."""
    site = tmp_path_factory.mktemp("browser-page")
    shutil.copy(TS_CLIENT / "browser" / "index.html", site / "index.html")
    bundled = subprocess.run(
        [npx(), "--no-install", "esbuild", "browser/page.ts", "--bundle", "--format=esm", "--target=es2022",
         "--log-level=warning", f"--outfile={site / 'page.js'}"],
        cwd=TS_CLIENT, capture_output=True, text=True, timeout=60, check=False)
    assert bundled.returncode == 0, bundled.stdout + bundled.stderr
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
               for _ in range(2)]
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    try:
        allowed, refused = (f"http://127.0.0.1:{server.server_address[1]}" for server in servers)
        yield PageOrigins(allowed, refused)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def stack_logs() -> list[str]:
    """Every line the stack's processes print (Envoy's access log among them)."""
    return []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, page_origins: PageOrigins,
          stack_logs: list[str]) -> Iterator[Stack]:
    """user, workout and notification (one replica each) behind the real Envoy, on free ports.

    The edge allows the test page's first origin only.
    """
    running = Stack(
        tmp_path_factory.mktemp("ts-client-stack"),
        services=["user", "workout", "notification"],
        replicas=1,
        use_free_ports=True,
        service_env=SERVICE_ENV,
        cors_origins=(page_origins.allowed,),
        sink=stack_logs.append,
    )
    running.start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


def test_client_typechecks(node_modules: None) -> None:
    result = tsc("--noEmit")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def dist(node_modules: None) -> Path:
    """The package compiled by tsc (src/, scripts/, browser/) into dist/."""
    built = tsc()
    assert built.returncode == 0, built.stdout + built.stderr
    return TS_CLIENT / "dist"


def test_smoke_script_against_the_edge(dist: Path, stack: Stack) -> None:
    script = dist / "scripts" / "smoke.js"
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run([node, str(script), f"http://{stack.host}:{stack.edge_port}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])

    assert out["ok"] is True
    assert out["registered"].startswith("users/")
    assert out["me"]["name"] == out["registered"]
    assert out["me"]["displayName"] == "Ada TS"
    assert out["me"]["email"].startswith("ts-")
    assert len(out["exercises"]) == 5
    assert all(name.startswith("exercises/") for name in out["exercises"])
    assert out["firstStreamMessage"] == "heartbeat"
    assert out["latestCursor"] == "0"
    assert out["invalidArgument"]["isConnectError"] is True
    assert out["invalidArgument"]["code"] == "invalid_argument"
    assert "email" in out["invalidArgument"]["message"]


def _access_log(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("[envoy] ")) for line in list(lines) if line.startswith("[envoy] {")]


def test_browser_calls_from_an_allowed_origin_and_is_refused_from_another(
    dist: Path, stack: Stack, page_origins: PageOrigins, stack_logs: list[str],
) -> None:
    chromium = shutil.which("chromium")
    assert chromium is not None, "chromium not found: `make deps` installs Debian's chromium"
    node = shutil.which("node")
    assert node is not None
    edge = f"http://{stack.host}:{stack.edge_port}"

    result = subprocess.run(
        [node, str(dist / "scripts" / "browser-smoke.js"), chromium, edge,
         f"{page_origins.allowed}/index.html", f"{page_origins.refused}/index.html"],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    allowed, refused = json.loads(result.stdout.strip().splitlines()[-1])["runs"]

    assert allowed["result"]["origin"] == page_origins.allowed
    assert allowed["result"]["ok"] is True, allowed
    assert allowed["result"]["registered"].startswith("users/")
    assert allowed["result"]["me"] == allowed["result"]["registered"]
    assert allowed["result"]["firstStreamMessage"] == "heartbeat"
    assert allowed["consoleErrors"] == []

    assert refused["result"]["origin"] == page_origins.refused
    assert refused["result"]["ok"] is False
    assert "registered" not in refused["result"]
    # fetch() rejects with a bare TypeError on a CORS refusal; the reason is only in the console.
    assert refused["result"]["error"]["name"] == "TypeError", refused
    refusals = [line for line in refused["consoleErrors"] if "blocked by CORS policy" in line]
    assert any(page_origins.refused in line for line in refusals), refused["consoleErrors"]

    # Both pages' preflights were answered by the edge itself; only the allowed page's calls went on.
    preflights = [e for e in _access_log(stack_logs) if e["method"] == "OPTIONS"]
    assert {(e["path"], e["status"]) for e in preflights} >= {
        ("/fittracker.user.v1.UserService/Register", 200),
        ("/fittracker.user.v1.UserService/Register", 204),
    }
    assert all(e["upstream_host"] in {None, "-"} for e in preflights), preflights
