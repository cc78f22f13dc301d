"""Every metric a dashboard panel queries is exported by the running stack, read from its live /metrics."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request

from tools import dashboards
from tools.devstack import ROOT, Stack
from tools.observe import Observability

#: Series Prometheus makes itself rather than scraping them.
PROMETHEUS_OWN = {"up", "ALERTS"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPS = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = {"by", "without", "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    bare = _GROUPS.sub(" ", _STRINGS.sub('""', expr))
    return {name for name in _NAME.findall(bare) if name not in _KEYWORDS and not name[0].isdigit()}


def exported(text: str) -> set[str]:
    """Metric names in a Prometheus text exposition, histograms expanded to their series."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind.strip() == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback URL
        return str(reply.read().decode())


def test_the_parser_finds_the_metric_names_of_a_query() -> None:
    expr = ('histogram_quantile(0.99, sum by (service, le) (rate(grpc_server_handling_seconds_bucket'
            '{grpc_service=~"fittracker\\\\..+", le="0.1"}[5m]))) / on (service) max(events_consumer_lag) > 0')
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "events_consumer_lag"}


def test_the_committed_dashboards_are_what_the_code_builds() -> None:
    done = subprocess.run([sys.executable, "tools/dashboards.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_every_panel_query_names_a_metric_the_stack_exports(observed: tuple[Stack, Observability]) -> None:
    stack, _ = observed
    # Envoy exports a cluster's latency histogram once it has timed a request.
    assert get(f"{stack.edge_url}/v1/auth/jwks")
    live: set[str] = set(PROMETHEUS_OWN)
    for replica in stack.replicas:
        if replica.child.running and replica.metrics_address is not None:
            live |= exported(get(f"http://{replica.metrics_address}/metrics"))
    live |= exported(get(f"http://{stack.host}:{stack.admin_port}/stats/prometheus"))
    missing: dict[str, set[str]] = {}
    for name, board in dashboards.dashboards().items():
        for expr in dashboards.queries(board):
            names = metric_names(expr)
            assert names, f"{name}: no metric in {expr}"
            if names - live:
                missing.setdefault(name, set()).update(names - live)
    assert not missing, f"queried but not exported: {missing}"
