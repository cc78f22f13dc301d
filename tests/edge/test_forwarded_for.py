"""The client address behind trusted proxies: X-Forwarded-For is believed exactly as far as it is trusted.

In a cluster the edge sits behind the Istio ingress gateway, which appends the address it saw to
X-Forwarded-For; the edge's config then says ``--xff-num-trusted-hops 1``, and the address it settles
on is what its per-address quota counts and its access log calls ``client``. The real Envoy runs here
with no service behind it (the call fails upstream, which is logged all the same); each call is found
in the access log by the request id the edge returns.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.auth import load_or_create_signing_key
from tools import envoy_config
from tools.devstack import EnvoyEdge

pytestmark = pytest.mark.edge


class LoggedEdge:
    """An Envoy edge and the lines it printed."""

    def __init__(self, root: Path, hops: int) -> None:
        """Render a config with ``hops`` trusted proxies into ``root``; ``start`` runs it."""
        keys = root / "keys"
        load_or_create_signing_key(keys, allow_create=True)
        config = root / "envoy.yaml"
        envoy_config.main([
            "--output", str(config), "--listen-port", "0", "--admin-port", "0", "--keys-dir", str(keys),
            "--descriptor-path", str(envoy_config.ROOT / envoy_config.DESCRIPTOR),
            "--upstream", "user=127.0.0.1:1", "--xff-num-trusted-hops", str(hops),
        ])
        self.lines: list[str] = []
        self.edge = EnvoyEdge(f"edge-xff{hops}", config, root, sink=self.lines.append)

    def client_of(self, forwarded_for: str | None) -> str:
        """The address the edge logged as the client of one call carrying ``forwarded_for``."""
        connection = http.client.HTTPConnection(self.edge.host, self.edge.edge_port, timeout=10)
        try:
            headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
            connection.request("GET", "/v1/auth/jwks", headers=headers)
            response = connection.getresponse()
            response.read()
            request_id = response.headers["x-request-id"]
        finally:
            connection.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in list(self.lines):
                _, _, text = line.partition("] ")
                if request_id in text and text.startswith("{"):
                    client: str = json.loads(text)["client"]
                    return client
            time.sleep(0.05)  # poll interval: Envoy flushes its access log every 100 ms here
        raise AssertionError(f"no access-log line for request {request_id} within 10 s")


def _running(root: Path, hops: int) -> Iterator[LoggedEdge]:
    logged = LoggedEdge(root, hops)
    logged.edge.start()
    try:
        logged.edge.wait_ready(time.monotonic() + 30)
        yield logged
    finally:
        logged.edge.stop()


@pytest.fixture(scope="module")
def behind_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedEdge]:
    """The edge as configured in the cluster: one trusted proxy in front."""
    yield from _running(tmp_path_factory.mktemp("xff1"), hops=1)


@pytest.fixture(scope="module")
def facing_clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedEdge]:
    """The edge as run locally: clients connect to it directly."""
    yield from _running(tmp_path_factory.mktemp("xff0"), hops=0)


def test_behind_the_gateway_the_client_is_the_address_the_gateway_appended(behind_gateway: LoggedEdge) -> None:
    assert behind_gateway.client_of("203.0.113.7") == "203.0.113.7"


def test_behind_the_gateway_entries_the_client_wrote_are_not_believed(behind_gateway: LoggedEdge) -> None:
    # The gateway appends what it saw last; anything to the left of it came from the client.
    assert behind_gateway.client_of("192.0.2.1, 203.0.113.7") == "203.0.113.7"


def test_behind_the_gateway_a_call_without_the_header_is_its_own_peer(behind_gateway: LoggedEdge) -> None:
    assert behind_gateway.client_of(None) == "127.0.0.1"


def test_facing_clients_a_forwarded_address_changes_nothing(facing_clients: LoggedEdge) -> None:
    assert facing_clients.client_of("203.0.113.7") == "127.0.0.1"
