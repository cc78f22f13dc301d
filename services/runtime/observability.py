"""Logs, metrics and traces: set up once per process, used by the interceptors.

- Logs are JSON lines on stderr, each with the service, the worker and the trace and span ids.
  ``trace_id``/``span_id`` are the OpenTelemetry log data model's names and hex formats, so a
  collector's JSON parser fills a record's TraceId and SpanId from them as they are (see
  observability/README.md for the mapping of the other fields and how lines ship).
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
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.runtime.settings import Settings

# Buckets sized around the 100 ms response target: fine below it, coarse above.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the current trace id when a span is active."""

    def __init__(self, service: str, worker: int) -> None:
        """Stamp every line with ``service`` and ``worker``."""
        super().__init__()
        self.static = {"service": service, "worker": worker}

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as JSON."""
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            line["trace_id"] = format(span_context.trace_id, "032x")
            line["span_id"] = format(span_context.span_id, "016x")
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class AccessLog:
    """One JSON line per RPC, written straight to the log's stream.

    Equivalent to a ``logger.info`` through ``JsonFormatter``, without building a LogRecord and
    walking the handler chain on every call: at thousands of calls a second that walk cost more
    than most handlers.
    """

    def __init__(self, logger: logging.Logger) -> None:
        """Write where ``logger``'s records would go, when it is enabled for INFO."""
        self._logger = logger

    @property
    def enabled(self) -> bool:
        """Whether access lines are wanted at the current level."""
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, method: str, code: str, elapsed: float, user: str | None) -> None:
        """Write the line for one finished call."""
        handlers = logging.getLogger().handlers
        if not handlers or not isinstance(handlers[0], logging.StreamHandler):
            self._logger.info("rpc", extra={"fields": {"method": method, "code": code,
                                                        "ms": round(elapsed * 1000, 3), "user": user}})
            return
        handler = handlers[0]
        formatter = handler.formatter
        line: dict[str, Any] = {
            "ts": round(time.time(), 3), "level": "info", "logger": self._logger.name, "msg": "rpc",
            **(formatter.static if isinstance(formatter, JsonFormatter) else {}),
            "method": method, "code": code, "ms": round(elapsed * 1000, 3), "user": user,
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            line["trace_id"] = format(span_context.trace_id, "032x")
            line["span_id"] = format(span_context.span_id, "016x")
        handler.stream.write(json.dumps(line) + "\n")


def configure_logging(settings: Settings, worker: int) -> None:
    """Send every logger's records to stderr as JSON lines at the configured level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(settings.service, worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


def configure_tracing(settings: Settings) -> None:
    """Install a tracer provider; export spans over OTLP when an endpoint is configured.

    Sampling follows the caller's decision (the edge's or a parent service's traceparent); calls
    that start a trace here are sampled at ``trace_sample_ratio``. Unsampled calls still get trace
    ids for their logs and propagate them, at a fraction of the cost of recording a span.
    """
    ratio = settings.trace_sample_ratio
    if ratio < 0:
        ratio = 1.0 if settings.otlp_endpoint else 0.0
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"fittracker-{settings.service}"}),
        sampler=ParentBased(TraceIdRatioBased(ratio)),
    )
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
