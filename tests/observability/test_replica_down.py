"""A replica killed under load: Prometheus raises FitTrackerReplicaDown within its `for:` window and
Alertmanager delivers it to the local stand-in for PagerDuty's Events API v2.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.observability.conftest import Api
from tools.devstack import Stack
from tools.observe import Observability

#: The alert's `for:` (30 s) + a scrape and an evaluation (1 s each here) + the page route's
#: group_wait (5 s) + slack for two busy cores.
PAGE_SECONDS = 60.0


def firing_alerts(observability: Observability, name: str) -> list[dict[str, Any]]:
    query = urllib.parse.quote(f'ALERTS{{alertname="{name}",alertstate="firing"}}')
    url = f"{observability.prometheus_url}/api/v1/query?query={query}"
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback URL
        return list(json.load(reply)["data"]["result"])


@pytest.mark.paging
def test_a_killed_replica_pages_through_alertmanager(observed: tuple[Stack, Observability]) -> None:
    stack, observability = observed
    assert observability.pager is not None
    victim = stack.replica("workout", 1)
    assert victim.metrics_address is not None
    stop = threading.Event()
    answered: list[int] = []

    api = Api(stack)
    api.sign_up(f"load-{time.time_ns()}@fittracker.test")

    def load() -> None:
        # Catalog reads through the edge for as long as the test runs: the kill happens under load.
        while not stop.is_set():
            answered.append(api.call("GET", "/v1/auth/jwks")[0])
            answered.append(api.call("GET", "/v1/exercises?page_size=5")[0])
            time.sleep(0.02)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        time.sleep(2)  # a few scrapes with both replicas up, under load
        assert not firing_alerts(observability, "FitTrackerReplicaDown")
        victim.child.signal(signal.SIGKILL)
        deadline = time.monotonic() + PAGE_SECONDS
        pages: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not pages:
            pages = [e for e in observability.pager.received()
                     if "FitTrackerReplicaDown" in json.dumps(e["body"])]
            time.sleep(0.5)
        assert pages, f"no page within {PAGE_SECONDS:.0f}s; the pager got {observability.pager.received()}"
        firing = firing_alerts(observability, "FitTrackerReplicaDown")
    finally:
        stop.set()
        loader.join(timeout=20)
    assert [a["metric"]["instance"] for a in firing] == [str(victim.metrics_address)]
    assert firing[0]["metric"]["service"] == "workout"
    event = pages[0]["body"]
    assert pages[0]["path"] == "/v2/enqueue"
    assert event["routing_key"] == observability.routing_key
    assert event["event_action"] == "trigger"
    assert event["dedup_key"]
    assert event["payload"]["severity"] == "critical"
    assert "FitTrackerReplicaDown" in event["payload"]["summary"]
    assert event["payload"]["custom_details"]["summary"] == f"workout replica {victim.metrics_address} is down"
    assert event["payload"]["custom_details"]["service"] == "workout"
    # The other replica carried the load: the edge kept answering (retries cover calls cut by the kill).
    codes = {code: answered.count(code) for code in set(answered)}
    assert answered and codes.get(200, 0) >= 0.99 * len(answered), codes
    stack.restart_replica(victim)
