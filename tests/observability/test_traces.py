"""One request through the edge, one trace in Jaeger: edge -> ai -> workout and user, and events.

The test sends its own W3C traceparent (sampled) so it knows the trace id, then reads the trace
back from Jaeger's query API and the services' access-log lines.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
import uuid
from typing import Any

from tests.observability.conftest import Api, Lines
from tools.devstack import Stack
from tools.observe import Observability

#: Spans reach Jaeger after the exporters' batch delay (about 5 s in the SDK, 0.2 s in Jaeger).
TRACE_SECONDS = 30.0


def new_traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def jaeger_trace(observability: Observability, trace_id: str, services: set[str]) -> list[dict[str, Any]]:
    """The trace's spans once every one of ``services`` has reported at least one."""
    deadline = time.monotonic() + TRACE_SECONDS
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            url = f"{observability.jaeger_url}/api/traces/{trace_id}"
            with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback URL
                data = json.load(reply)["data"]
        except OSError:
            data = []
        if data:
            trace = data[0]
            seen = {process["serviceName"] for process in trace["processes"].values()}
            if services <= seen:
                for span in trace["spans"]:
                    span["service"] = trace["processes"][span["processID"]]["serviceName"]
                return list(trace["spans"])
        time.sleep(0.5)
    raise AssertionError(f"trace {trace_id} in Jaeger had spans of {sorted(seen)}, wanted {sorted(services)}")


def parent_of(span: dict[str, Any]) -> str | None:
    return next((ref["spanID"] for ref in span["references"] if ref["refType"] == "CHILD_OF"), None)


def test_recommend_next_workout_is_one_trace_across_edge_ai_workout_and_user(
    observed: tuple[Stack, Observability], lines: Lines
) -> None:
    stack, observability = observed
    api = Api(stack)
    api.sign_up(f"trace-{uuid.uuid4().hex[:8]}@fittracker.test")
    trace_id, traceparent = new_traceparent()
    status, body = api.call("POST", "/v1/users/me:recommendNextWorkout", {}, traceparent=traceparent)
    assert status == 200, body

    spans = jaeger_trace(observability, trace_id,
                         {"fittracker-edge", "fittracker-ai", "fittracker-workout", "fittracker-user"})
    assert {span["traceID"] for span in spans} == {trace_id}
    by_id = {span["spanID"]: span for span in spans}
    ai_server = next(s for s in spans if s["service"] == "fittracker-ai"
                     and "RecommendNextWorkout" in s["operationName"]
                     and any(t["key"] == "span.kind" and t["value"] == "server" for t in s["tags"]))
    # ai's server span hangs under the edge's span.
    assert by_id[parent_of(ai_server)]["service"] == "fittracker-edge"

    def ancestors(span: dict[str, Any]) -> list[str]:
        chain = []
        while (parent := parent_of(span)) in by_id:
            span = by_id[parent]
            chain.append(span["spanID"])
        return chain

    for callee in ("fittracker-workout", "fittracker-user"):
        servers = [s for s in spans if s["service"] == callee
                   and any(t["key"] == "span.kind" and t["value"] == "server" for t in s["tags"])]
        assert servers, f"no server span of {callee}"
        for server in servers:
            # Called by ai: the parent is ai's client span, itself under ai's server span.
            assert by_id[parent_of(server)]["service"] == "fittracker-ai"
            assert ai_server["spanID"] in ancestors(server)

    # Each service's access-log line of this call carries the same trace id.
    for prefix, method in (("ai-", "RecommendNextWorkout"), ("workout-", ""), ("user-", "")):
        logged = [line for line in lines.json_lines(prefix) if line.get("msg") == "rpc"
                  and line.get("trace_id") == trace_id and method in line.get("method", "")]
        assert logged, f"no access-log line of {prefix.rstrip('-')} with trace id {trace_id}"
        # ... and the span id of a span Jaeger holds for it (OpenTelemetry's log data model's fields).
        assert {line["span_id"] for line in logged} & set(by_id), logged


def test_the_events_of_complete_session_continue_its_trace(observed: tuple[Stack, Observability]) -> None:
    stack, observability = observed
    api = Api(stack)
    api.sign_up(f"events-{uuid.uuid4().hex[:8]}@fittracker.test")
    status, session = api.call("POST", "/v1/users/me/sessions:start", {"time_zone": "Europe/Paris"})
    assert status == 200, session
    status, body = api.call("POST", f"/v1/{session['name']}/sets", {
        "exercise": "exercises/barbell-back-squat", "set_type": "SET_TYPE_WORKING",
        "reps": 5, "weight_kg": 100, "rpe": 8})
    assert status == 200, body
    trace_id, traceparent = new_traceparent()
    status, body = api.call("POST", f"/v1/{session['name']}:complete", {}, traceparent=traceparent)
    assert status == 200, body

    spans = jaeger_trace(observability, trace_id, {"fittracker-edge", "fittracker-workout",
                                                   "fittracker-analytics", "fittracker-notification"})
    consumers = [s for s in spans if any(t["key"] == "span.kind" and t["value"] == "consumer" for t in s["tags"])]
    assert {s["service"] for s in consumers} >= {"fittracker-analytics", "fittracker-notification"}
