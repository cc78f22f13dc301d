"""The TypeScript gRPC-Web client (clients/typescript): it typechecks, and it works against the edge.

The smoke script (clients/typescript/scripts/smoke.ts, compiled by tsc) registers, reads the
caller, lists exercises, opens the Subscribe stream and provokes an INVALID_ARGUMENT, all over
gRPC-Web through the real Envoy; it prints one JSON object that the test checks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """user, workout and notification (one replica each) behind the real Envoy, on free ports."""
    logs: list[str] = []
    running = Stack(
        tmp_path_factory.mktemp("ts-client-stack"),
        services=["user", "workout", "notification"],
        replicas=1,
        use_free_ports=True,
        service_env=SERVICE_ENV,
        sink=logs.append,
    )
    running.start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


def test_client_typechecks(node_modules: None) -> None:
    result = tsc("--noEmit")
    assert result.returncode == 0, result.stdout + result.stderr


def test_smoke_script_against_the_edge(node_modules: None, stack: Stack) -> None:
    built = tsc()
    assert built.returncode == 0, built.stdout + built.stderr
    script = TS_CLIENT / "dist" / "scripts" / "smoke.js"
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
