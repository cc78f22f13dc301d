"""Logs, metrics and traces: set up once per process, used by the interceptors.

- Logs are JSON lines on stderr, each with the service, the worker and the trace id.
- Metrics are Prometheus series per method, served on an HTTP port per worker process.
- Traces use OpenTelemetry with W3C trace context; spans go to an OTLP collector when one is
  configured, and are still created (so ids propagate into logs and events) when none is.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.runtime.settings import Settings

# Buckets sized around the 100 ms response target: fine below it, coarse above.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the current trace id when a span is active."""

    def __init__(self, service: str, worker: int) -> None:
        """Stamp every line with ``service`` and ``worker``."""
        super().__init__()
        self._static = {"service": service, "worker": worker}

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as JSON."""
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self._static,
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            line["trace_id"] = format(span_context.trace_id, "032x")
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(settings: Settings, worker: int) -> None:
    """Send every logger's records to stderr as JSON lines at the configured level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(settings.service, worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


def configure_tracing(settings: Settings) -> None:
    """Install a tracer provider; export spans over OTLP when an endpoint is configured."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"fittracker-{settings.service}"}))
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,  # imported only when used: it pulls in a gRPC exporter stack
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    trace.set_tracer_provider(provider)


class Metrics:
    """The per-method RPC series of one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Register the series on ``registry`` (a private one in tests, the default in production)."""
        self.registry = registry or CollectorRegistry()
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed, by method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"], registry=self.registry,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds", "Time to handle an RPC, by method.",
            ["grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "grpc_server_in_flight", "RPCs being handled now, by method.",
            ["grpc_service", "grpc_method"], registry=self.registry,
        )

    def serve(self, port: int) -> None:
        """Expose ``/metrics`` on ``port`` (0 keeps them in-process only)."""
        if port:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)


def monotonic() -> float:
    """The clock used for call durations."""
    return time.perf_counter()
