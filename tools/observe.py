"""Observability beside the local stack: Prometheus, Alertmanager, Jaeger and a stand-in pager.

``make up OBSERVE=1`` (``tools/devstack.py --observe``) and tests/observability use this module.
Jaeger starts first, so the edge and every replica export spans to it over OTLP from their first
call; the stack then runs with a /metrics port per replica; Prometheus scrapes those, Envoy's
``/stats/prometheus`` and itself, evaluates the committed rules in ``observability/prometheus/rules``
and sends alerts to Alertmanager, which runs the committed ``observability/alertmanager/alertmanager.yml``
with two things changed: PagerDuty's Events API URL points at ``Pager``, a local HTTP peer that
records (and prints) each page, and the secret files are local ones. Nothing leaves the machine.

The binaries come from ``make deps`` (``.cache/bin``). Prometheus and Alertmanager are built
without their web UIs' assets (the module sources lack them): their HTTP APIs answer, the UI
pages do not. Jaeger's UI is likewise absent; its query API (``/api/traces``) answers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tools.devstack import ROOT, Child, LogSink, Stack, _http_get, _poll, free_ports
from tools.envoy_config import Address

OBSERVABILITY = ROOT / "observability"
BIN = ROOT / ".cache" / "bin"
RULE_FILES = sorted((OBSERVABILITY / "prometheus" / "rules").glob("*.yml"))
ALERTMANAGER_CONFIG = OBSERVABILITY / "alertmanager" / "alertmanager.yml"
JAEGER_CONFIG = OBSERVABILITY / "jaeger" / "jaeger.yaml"


@dataclass(frozen=True)
class Ports:
    """Where the observability processes listen."""

    prometheus: int = 9090
    alertmanager: int = 9093
    jaeger_query: int = 16686
    jaeger_query_grpc: int = 16685
    jaeger_otlp: int = 4317
    jaeger_health: int = 13133
    pager: int = 9095

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Ports:
        """Ports the kernel considers free now (tests)."""
        return cls(*free_ports(7, host))


def _binary(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"no {name} at {path}: run `make deps`")
    return str(path)


def prometheus_config(stack: Stack, alertmanager: Address, *, scrape_interval: str = "10s") -> dict[str, Any]:
    """The scrape, rule and alerting config for ``stack`` (every replica, the edge, Prometheus)."""
    replicas = [r for r in stack.replicas if r.metrics_address is not None]
    if not replicas:
        raise ValueError("the stack serves no metrics: build it with metrics=True")
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                   "external_labels": {"environment": "local"}},
        "rule_files": [str(path) for path in RULE_FILES],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [str(alertmanager)]}]}]},
        "scrape_configs": [
            {
                "job_name": "fittracker",
                "static_configs": [
                    {"targets": [str(r.metrics_address)], "labels": {"service": r.service, "replica": str(r.index)}}
                    for r in replicas
                ],
            },
            {
                "job_name": "fittracker-edge",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [f"{stack.host}:{stack.admin_port}"]}],
            },
        ],
    }


def alertmanager_config(pagerduty_url: str, secrets_dir: Path, routing_key: str) -> dict[str, Any]:
    """The committed Alertmanager config with PagerDuty at ``pagerduty_url`` and local secret files."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    secrets_dir.mkdir(parents=True, exist_ok=True)
    key_file = secrets_dir / "pagerduty-routing-key"
    key_file.write_text(routing_key)
    password_file = secrets_dir / "smtp-password"
    password_file.write_text("local")
    config["global"]["smtp_auth_password_file"] = str(password_file)
    for receiver in config["receivers"]:
        for pagerduty in receiver.get("pagerduty_configs", []):
            pagerduty["routing_key_file"] = str(key_file)
            pagerduty["url"] = pagerduty_url
    return config


class Pager:
    """A local HTTP peer standing in for PagerDuty's Events API v2: records each event it is sent."""

    def __init__(self, host: str, port: int, sink: LogSink) -> None:
        """Listen on ``host:port`` once started."""
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        pager = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                try:
                    event = json.loads(body)
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                with pager._lock:
                    pager.events.append({"path": self.path, "body": event})
                sink(f"[pager] {event.get('event_action', '?')}: {event.get('payload', {}).get('summary', '')}")
                reply = json.dumps({"status": "success", "message": "Event processed",
                                    "dedup_key": event.get("dedup_key", "")}).encode()
                self.send_response(202)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the sink gets one line per event instead."""

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="pager", daemon=True)

    @property
    def url(self) -> str:
        """The Events API URL to give Alertmanager."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v2/enqueue"

    def received(self) -> list[dict[str, Any]]:
        """The events received so far (path and JSON body)."""
        with self._lock:
            return list(self.events)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Observability:
    """Jaeger, Prometheus, Alertmanager and the pager for one stack, in a work directory."""

    work_dir: Path
    sink: LogSink
    host: str = "127.0.0.1"
    ports: Ports = field(default_factory=Ports)
    scrape_interval: str = "10s"
    routing_key: str = "local-routing-key-0123456789abcdef"
    children: list[Child] = field(default_factory=list)
    pager: Pager | None = None

    @property
    def otlp_endpoint(self) -> str:
        """Where the stack sends spans: Jaeger's OTLP gRPC receiver."""
        return f"{self.host}:{self.ports.jaeger_otlp}"

    @property
    def prometheus_url(self) -> str:
        """Prometheus's base URL (its HTTP API under /api/v1)."""
        return f"http://{self.host}:{self.ports.prometheus}"

    @property
    def alertmanager_url(self) -> str:
        """Alertmanager's base URL (its HTTP API under /api/v2)."""
        return f"http://{self.host}:{self.ports.alertmanager}"

    @property
    def jaeger_url(self) -> str:
        """Jaeger's query base URL (its HTTP API under /api)."""
        return f"http://{self.host}:{self.ports.jaeger_query}"

    def start_tracing(self, timeout: float = 30.0) -> None:
        """Start Jaeger and wait until it is healthy; before the stack, so no span is lost."""
        env: Mapping[str, str] = {
            "JAEGER_QUERY_HTTP": f"{self.host}:{self.ports.jaeger_query}",
            "JAEGER_QUERY_GRPC": f"{self.host}:{self.ports.jaeger_query_grpc}",
            "JAEGER_OTLP_GRPC": self.otlp_endpoint,
            "JAEGER_HEALTH_HTTP": f"{self.host}:{self.ports.jaeger_health}",
        }
        jaeger = Child("jaeger", [_binary("jaeger"), "--config", f"file:{JAEGER_CONFIG}"],
                       {"PATH": "/usr/bin:/bin", **env}, self.work_dir, self.sink)
        self._start(jaeger, f"http://{self.host}:{self.ports.jaeger_health}/status", timeout)

    def start_monitoring(self, stack: Stack, timeout: float = 30.0) -> None:
        """Start the pager, Alertmanager and Prometheus for ``stack`` (which must be running)."""
        self.start_alerting(timeout)
        self.start_prometheus(stack, timeout)

    def start_alerting(self, timeout: float = 30.0) -> None:
        """Start the pager and an Alertmanager that pages it."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.pager = Pager(self.host, self.ports.pager, self.sink)
        self.pager.start()
        am_config = self.work_dir / "alertmanager.yml"
        am_config.write_text(yaml.safe_dump(
            alertmanager_config(self.pager.url, self.work_dir / "secrets", self.routing_key), sort_keys=False))
        alertmanager = Child("alertmanager", [
            _binary("alertmanager"), f"--config.file={am_config}",
            f"--storage.path={self.work_dir / 'alertmanager-data'}",
            f"--web.listen-address={self.host}:{self.ports.alertmanager}",
            "--cluster.listen-address=",  # one instance: no gossip port
            "--log.level=warn",
        ], {"PATH": "/usr/bin:/bin"}, self.work_dir, self.sink)
        self._start(alertmanager, f"{self.alertmanager_url}/-/ready", timeout)

    def start_prometheus(self, stack: Stack, timeout: float = 30.0) -> None:
        """Start Prometheus scraping ``stack`` and alerting to this Alertmanager."""
        prom_config = self.work_dir / "prometheus.yml"
        prom_config.write_text(yaml.safe_dump(prometheus_config(
            stack, Address(self.host, self.ports.alertmanager), scrape_interval=self.scrape_interval),
            sort_keys=False))
        prometheus = Child("prometheus", [
            _binary("prometheus"), f"--config.file={prom_config}",
            f"--storage.tsdb.path={self.work_dir / 'prometheus-data'}",
            f"--web.listen-address={self.host}:{self.ports.prometheus}",
            "--log.level=warn",
        ], {"PATH": "/usr/bin:/bin"}, self.work_dir, self.sink)
        self._start(prometheus, f"{self.prometheus_url}/-/ready", timeout)

    def _start(self, child: Child, ready_url: str, timeout: float) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        child.start()
        self.children.append(child)
        _poll(child, f"{child.name} ready", time.monotonic() + timeout, lambda: _http_get(ready_url, 1.0)[0] == 200)

    def usage(self) -> list[str]:
        """Where each part answers, with a query to try."""
        return [
            f"Observability: Prometheus {self.prometheus_url} (API: {self.prometheus_url}/api/v1/query?query=up), "
            f"Alertmanager {self.alertmanager_url} (API: {self.alertmanager_url}/api/v2/alerts), "
            f"Jaeger {self.jaeger_url} (API: {self.jaeger_url}/api/traces?service=fittracker-edge)",
            f"  pages go to a local stand-in for PagerDuty at {self.pager.url if self.pager else '-'}, "
            "printed here as [pager] lines",
        ]

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and the pager."""
        for child in reversed(self.children):
            child.signal(15)
        for child in reversed(self.children):
            if child.wait(10.0) is None:
                child.signal(9)
                child.wait(5.0)
        self.children.clear()
        if self.pager is not None:
            self.pager.stop()
            self.pager = None
