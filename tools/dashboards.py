"""Grafana dashboards as code: ``observability/dashboards/*.json`` from grafana-foundation-sdk builders.

``make gen`` writes them; ``--check`` (in ``make check-gen``) fails when a committed file differs
from what this module builds. tests/observability checks that every metric a panel queries is
exported on a live /metrics of the stack (the services' or the edge's).

Dashboards: an overview (rate, errors, p50/p95/p99 per service, SLO budget left), one per service
(per-method RED, in flight, replicas up), the edge (per upstream cluster: requests, 5xx, health,
retries, circuit breakers, rate limited), events (lag, dead letters, redeliveries) and the cache
(hit ratio by layer, invalidations). Per-route figures come from the services' per-method series:
every public method has exactly one HTTP route at the edge.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard, DataSourceRef

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "observability" / "dashboards"
SERVICES = ("user", "workout", "ai", "notification", "analytics")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Server faults, as the SLO counts them (observability/prometheus/rules/recording.yml).
FAULTS = 'grpc_code=~"UNKNOWN|DEADLINE_EXCEEDED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNIMPLEMENTED"'
OURS = 'grpc_service=~"fittracker\\\\..+"'


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    """A Prometheus range query."""
    return prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref).datasource(DATASOURCE)


def graph(title: str, unit: str, *targets: prometheus.Dataquery, width: int = 12) -> timeseries.Panel:
    """A time-series panel of ``targets``."""
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(width)
    for target in targets:
        panel = panel.with_target(target)
    return panel


def figure(title: str, unit: str, expr: str, width: int = 6) -> stat.Panel:
    """A single-value panel."""
    return stat.Panel().title(title).unit(unit).datasource(DATASOURCE).height(4).span(width).with_target(query(expr))


def board(uid: str, title: str, tags: Sequence[str]) -> dash.Dashboard:
    """A dashboard with the Prometheus data source as a variable, refreshing every 30 s."""
    return (
        dash.Dashboard(title).uid(uid).tags(["fittracker", *tags]).refresh("30s").time("now-1h", "now")
        .timezone("browser")
        .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )


def overview() -> dash.Dashboard:
    """Rate, errors and latency per service, and the SLO budget left."""
    return (
        board("fittracker-overview", "FitTracker / Overview", ["overview"])
        .with_row(dash.Row("Service level"))
        .with_panel(figure("Calls/s", "reqps", f"sum(rate(grpc_server_handled_total{{{OURS}}}[5m]))"))
        .with_panel(figure("Server faults", "percentunit",
                           f"sum(rate(grpc_server_handled_total{{{OURS},{FAULTS}}}[5m]))"
                           f" / sum(rate(grpc_server_handled_total{{{OURS}}}[5m]))"))
        .with_panel(figure(
            "Availability budget left (30 d, 99.99 %)", "percentunit",
            f"1 - (sum(increase(grpc_server_handled_total{{{OURS},{FAULTS}}}[30d]))"
            f" / sum(increase(grpc_server_handled_total{{{OURS}}}[30d]))) / 0.0001"))
        .with_panel(figure(
            "Latency budget left (30 d, 99 % < 100 ms)", "percentunit",
            f'1 - (1 - sum(increase(grpc_server_handling_seconds_bucket{{{OURS},le="0.1"}}[30d]))'
            f" / sum(increase(grpc_server_handling_seconds_count{{{OURS}}}[30d]))) / 0.01"))
        .with_row(dash.Row("Per service"))
        .with_panel(graph("Calls/s", "reqps",
                          query(f"sum by (service) (rate(grpc_server_handled_total{{{OURS}}}[5m]))", "{{service}}")))
        .with_panel(graph("Server faults/s", "reqps", query(
            f"sum by (service) (rate(grpc_server_handled_total{{{OURS},{FAULTS}}}[5m]))", "{{service}}")))
        .with_panel(graph("Latency p50 / p95 / p99", "s", *(
            query(f"histogram_quantile({q}, sum by (service, le) "
                  f"(rate(grpc_server_handling_seconds_bucket{{{OURS}}}[5m])))", f"{{{{service}}}} p{name}", ref)
            for q, name, ref in ((0.5, "50", "A"), (0.95, "95", "B"), (0.99, "99", "C"))), width=24))
        .with_panel(graph("Firing alerts", "short", query('sum by (alertname) (ALERTS{alertstate="firing"})',
                                                          "{{alertname}}")))
    )


def service(name: str) -> dash.Dashboard:
    """Per-method RED, calls in flight and replicas up for one service."""
    sel = f'service="{name}",{OURS}'
    return (
        board(f"fittracker-{name}", f"FitTracker / Service / {name}", ["service", name])
        .with_row(dash.Row("Per method"))
        .with_panel(graph("Calls/s by method", "reqps", query(
            f"sum by (grpc_method) (rate(grpc_server_handled_total{{{sel}}}[5m]))", "{{grpc_method}}")))
        .with_panel(graph("Calls/s by status", "reqps", query(
            f"sum by (grpc_code) (rate(grpc_server_handled_total{{{sel}}}[5m]))", "{{grpc_code}}")))
        .with_panel(graph("Server faults/s by method", "reqps", query(
            f"sum by (grpc_method) (rate(grpc_server_handled_total{{{sel},{FAULTS}}}[5m]))", "{{grpc_method}}")))
        .with_panel(graph("p99 by method", "s", query(
            f"histogram_quantile(0.99, sum by (grpc_method, le) "
            f"(rate(grpc_server_handling_seconds_bucket{{{sel}}}[5m])))", "{{grpc_method}}")))
        .with_row(dash.Row("Capacity"))
        .with_panel(graph("In flight", "short", query(
            f"sum by (instance) (grpc_server_in_flight{{{sel}}})", "{{instance}}")))
        .with_panel(graph("Replicas up", "short", query(f'sum(up{{job="fittracker",service="{name}"}})', "up")))
        .with_panel(graph("Revocation view age", "s", query(
            f'max by (instance) (fittracker_revocations_view_age_seconds{{service="{name}"}})', "{{instance}}")))
    )


def edge() -> dash.Dashboard:
    """The edge per upstream cluster: traffic, errors, health, retries, breakers, rate limits."""
    cluster = 'envoy_cluster_name=~"user|workout|ai|notification|analytics"'
    return (
        board("fittracker-edge", "FitTracker / Edge", ["edge"])
        .with_panel(graph("Requests/s by upstream", "reqps", query(
            f"sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_total{{{cluster}}}[5m]))",
            "{{envoy_cluster_name}}")))
        .with_panel(graph("Responses/s by class", "reqps", query(
            "sum by (envoy_response_code_class) "
            '(rate(envoy_http_downstream_rq_xx{envoy_http_conn_manager_prefix="edge"}[5m]))',
            "{{envoy_response_code_class}}xx")))
        .with_panel(graph("Upstream latency p99", "ms", query(
            f"histogram_quantile(0.99, sum by (envoy_cluster_name, le) "
            f"(rate(envoy_cluster_upstream_rq_time_bucket{{{cluster}}}[5m])))", "{{envoy_cluster_name}}")))
        .with_panel(graph("Healthy replicas", "short", query(
            f"sum by (envoy_cluster_name) (envoy_cluster_membership_healthy{{{cluster}}})", "{{envoy_cluster_name}}"),
            query(f"sum by (envoy_cluster_name) (envoy_cluster_outlier_detection_ejections_active{{{cluster}}})",
                  "{{envoy_cluster_name}} ejected", "B")))
        .with_panel(graph("Retries/s", "reqps", query(
            f"sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_retry{{{cluster}}}[5m]))",
            "{{envoy_cluster_name}}")))
        .with_panel(graph("Circuit breakers open / overflow", "short", query(
            f"sum by (envoy_cluster_name) (envoy_cluster_circuit_breakers_default_rq_open{{{cluster}}})",
            "{{envoy_cluster_name}} open"), query(
            f"sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_pending_overflow{{{cluster}}}[5m]))",
            "{{envoy_cluster_name}} overflow/s", "B")))
        .with_panel(graph("Rate limited/s (429)", "reqps", query(
            "sum by (envoy_local_http_ratelimit_prefix) (rate(envoy_http_local_rate_limit_rate_limited[5m]))",
            "{{envoy_local_http_ratelimit_prefix}}")))
        .with_panel(graph("Health check failures/s", "reqps", query(
            f"sum by (envoy_cluster_name) (rate(envoy_cluster_health_check_failure{{{cluster}}}[5m]))",
            "{{envoy_cluster_name}}")))
    )


def events() -> dash.Dashboard:
    """Domain events: published, consumed by outcome, lag, dead letters, redeliveries."""
    return (
        board("fittracker-events", "FitTracker / Events", ["events"])
        .with_panel(graph("Published/s by stream", "reqps", query(
            "sum by (stream) (rate(events_published_total[5m]))", "{{stream}}")))
        .with_panel(graph("Consumed/s by group and outcome", "reqps", query(
            "sum by (group, outcome) (rate(events_consumed_total[5m]))", "{{group}} {{outcome}}")))
        .with_panel(graph("Consumer lag", "short", query(
            "max by (group, stream) (events_consumer_lag)", "{{group}} on {{stream}}")))
        .with_panel(graph("Dead letters waiting", "short", query(
            "max by (stream) (events_dead_letters)", "{{stream}}.dead")))
        .with_panel(graph("Redeliveries/s (failed, will retry)", "reqps", query(
            'sum by (group, stream) (rate(events_consumed_total{outcome="failed"}[5m]))', "{{group}} {{stream}}")))
    )


def cache() -> dash.Dashboard:
    """The L1/L2 cache: hit ratio by layer, invalidations, unacknowledged invalidations."""
    return (
        board("fittracker-cache", "FitTracker / Cache", ["cache"])
        .with_panel(graph("Hit ratio by layer", "percentunit", query(
            'sum by (service, cache, layer) (rate(cache_lookups_total{result="hit"}[5m]))'
            " / sum by (service, cache, layer) (rate(cache_lookups_total[5m]))", "{{service}} {{cache}} {{layer}}")))
        .with_panel(graph("Overall hit ratio", "percentunit", query(
            'sum by (service, cache) (rate(cache_lookups_total{result="hit"}[5m]))'
            ' / sum by (service, cache) (rate(cache_lookups_total{layer="l1"}[5m]))', "{{service}} {{cache}}")))
        .with_panel(graph("Invalidations/s", "reqps", query(
            "sum by (service, cache) (rate(cache_invalidations_total[5m]))", "{{service}} {{cache}}")))
        .with_panel(graph("Invalidations not acknowledged in time/s", "reqps", query(
            "sum by (service, cache) (rate(cache_invalidation_ack_timeouts_total[5m]))", "{{service}} {{cache}}")))
    )


def dashboards() -> dict[str, Dashboard]:
    """Every dashboard by file name."""
    built = [overview(), *(service(name) for name in SERVICES), edge(), events(), cache()]
    return {f"{d.uid}.json": d for d in (b.build() for b in built) if d.uid}


def render(board_model: Dashboard) -> str:
    """The JSON Grafana imports, stable across runs."""
    return json.dumps(board_model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def queries(board_model: Dashboard) -> list[str]:
    """Every panel query expression of a dashboard (for the metric-name test)."""
    found: list[str] = []
    for panel in json.loads(render(board_model))["panels"]:
        found.extend(target["expr"] for target in panel.get("targets", []))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dashboards, or with --check fail when the committed ones differ."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    args = parser.parse_args(argv)
    wanted = {name: render(model) for name, model in dashboards().items()}
    if args.check:
        present = {path.name for path in OUT.glob("*.json")}
        stale = sorted(n for n, text in wanted.items() if not (OUT / n).exists() or (OUT / n).read_text() != text)
        extra = sorted(present - set(wanted))
        if stale or extra:
            print(f"dashboards stale: {stale + extra}; run `make gen`", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for path in OUT.glob("*.json"):
        if path.name not in wanted:
            path.unlink()
    for name, text in wanted.items():
        (OUT / name).write_text(text)
    print(f"==> {len(wanted)} dashboards in {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
