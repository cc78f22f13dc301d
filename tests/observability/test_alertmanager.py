"""The Alertmanager config: amtool's check, its routing, and a real Alertmanager paging the stand-in."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tools.observe import ALERTMANAGER_CONFIG, BIN, Observability, Ports

DELIVERY_SECONDS = 30.0


def amtool(*args: str) -> str:
    done = subprocess.run([str(BIN / "amtool"), *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_amtool_accepts_the_config() -> None:
    assert "SUCCESS" in amtool("check-config", str(ALERTMANAGER_CONFIG))


@pytest.mark.parametrize(("labels", "receiver"), [
    (["severity=page", "service=user", "alertname=FitTrackerReplicaDown"], "pagerduty"),
    (["severity=page", "service=ai", "alertname=FitTrackerAvailabilityBudgetBurnFast"], "pagerduty"),
    (["severity=ticket", "service=analytics", "alertname=FitTrackerDeadLettersGrowing"], "tickets"),
    (["alertname=SomethingUnlabelled"], "tickets"),
])
def test_pages_go_to_pagerduty_and_the_rest_to_tickets(labels: list[str], receiver: str) -> None:
    assert amtool("config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels).strip() == receiver


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observability]:
    """A real Alertmanager on the committed config, paging a local stand-in; no Prometheus."""
    observability = Observability(tmp_path_factory.mktemp("am"), lambda line: None, ports=Ports.free())
    try:
        observability.start_alerting()
        yield observability
    finally:
        observability.stop()


def post_alerts(observability: Observability, alerts: list[dict[str, Any]]) -> None:
    now = datetime.now(UTC).isoformat()
    body = json.dumps([{**a, "startsAt": now} for a in alerts]).encode()
    url = f"{observability.alertmanager_url}/api/v2/alerts"
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")  # noqa: S310 - loopback URL
    with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310 - loopback URL
        assert reply.status == 200


def wait_for_page(observability: Observability, alertname: str) -> dict[str, Any]:
    assert observability.pager is not None
    deadline = time.monotonic() + DELIVERY_SECONDS
    while time.monotonic() < deadline:
        for event in observability.pager.received():
            if alertname in event["body"]["payload"]["summary"]:
                return dict(event["body"])
        time.sleep(0.2)
    raise AssertionError(f"no page for {alertname}; got {observability.pager.received()}")


def test_a_firing_page_reaches_pagerduty_with_the_events_api_v2_payload(alertmanager: Observability) -> None:
    post_alerts(alertmanager, [{
        "labels": {"alertname": "FitTrackerAvailabilityBudgetBurnFast", "severity": "page", "slo": "availability",
                   "service": "ai", "grpc_method": "RecommendNextWorkout"},
        "annotations": {"summary": "ai/RecommendNextWorkout burns its 99.99 % availability budget fast",
                        "description": "Server faults are 2% of calls."},
    }])
    event = wait_for_page(alertmanager, "FitTrackerAvailabilityBudgetBurnFast")
    assert event["routing_key"] == alertmanager.routing_key
    assert event["event_action"] == "trigger"
    assert len(event["dedup_key"]) == 64  # Alertmanager's hash of the group key
    payload = event["payload"]
    assert payload["severity"] == "critical"
    assert payload["summary"].startswith("[FIRING:1] FitTrackerAvailabilityBudgetBurnFast")
    assert payload["custom_details"]["summary"] == "ai/RecommendNextWorkout burns its 99.99 % availability budget fast"
    assert payload["custom_details"]["service"] == "ai"
    assert payload["custom_details"]["firing"] == 1  # Alertmanager sends a template that renders a number as one
    assert event["client"] == "FitTracker Alertmanager"


def test_a_dead_service_pages_once_not_for_each_replica(alertmanager: Observability) -> None:
    post_alerts(alertmanager, [
        {"labels": {"alertname": "FitTrackerServiceDown", "severity": "page", "service": "notification"}},
        {"labels": {"alertname": "FitTrackerReplicaDown", "severity": "page", "service": "notification",
                    "instance": "127.0.0.1:51054"}},
    ])
    wait_for_page(alertmanager, "FitTrackerServiceDown")
    url = f"{alertmanager.alertmanager_url}/api/v2/alerts?filter=alertname%3D%22FitTrackerReplicaDown%22"
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback URL
        replica = json.load(reply)
    assert [a["status"]["state"] for a in replica] == ["suppressed"]
    assert replica[0]["status"]["inhibitedBy"]
    assert not any("FitTrackerReplicaDown" in e["body"]["payload"]["summary"]
                   for e in (alertmanager.pager.received() if alertmanager.pager else []))

