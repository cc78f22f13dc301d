"""Bootstrap of a FitTracker service: one ``grpc.aio`` server per worker process.

A service module supplies a ``build`` coroutine that turns settings and shared resources into a
``ServiceDefinition``; this module does the rest: health and reflection, the interceptors, the
port (SO_REUSEPORT, so several workers share it), signals, and a graceful drain: health turns
NOT_SERVING first so load balancers stop sending, then in-flight calls get ``grace_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from prometheus_client import Gauge

from services.runtime.interceptors import CallPipeline
from services.runtime.observability import configure_logging, configure_tracing
from services.runtime.resources import Resources
from services.runtime.settings import ServiceName, Settings, SettingsError

log = logging.getLogger("fittracker.server")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
S = TypeVar("S")


@dataclass
class ServiceDefinition:
    """What a domain service hands the runtime."""

    #: Full names of the gRPC services served, e.g. "fittracker.user.v1.UserService".
    service_names: Sequence[str]
    #: Adds the servicers to a server (the generated ``add_*Servicer_to_server`` calls).
    register: Callable[[grpc.aio.Server], None]
    #: Full method names callable without a token.
    public_methods: Collection[str] = ()
    #: Long-running tasks started with the server (event consumers, outbox relays).
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()
    #: Called on shutdown after the server stopped, before shared resources close.
    close: Callable[[], Awaitable[None]] | None = None
    #: Called as draining starts (health already NOT_SERVING), e.g. to end long-lived streams so
    #: their clients reconnect to another replica instead of waiting out the grace period.
    on_drain: Callable[[], Awaitable[None]] | None = None


    @classmethod
    def serving(
        cls,
        servicer: S,
        add_to_server: Callable[[S, grpc.aio.Server], None],
        service_name: str,
        *,
        public_methods: Collection[str] = (),
        background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
        close: Callable[[], Awaitable[None]] | None = None,
        on_drain: Callable[[], Awaitable[None]] | None = None,
    ) -> ServiceDefinition:
        """The definition of one servicer, added by its generated ``add_*Servicer_to_server``."""
        return cls(
            service_names=[service_name],
            register=lambda server: add_to_server(servicer, server),
            public_methods=public_methods,
            background=background,
            close=close,
            on_drain=on_drain,
        )


Builder = Callable[[Settings, Resources], Awaitable[ServiceDefinition]]


@dataclass
class RunningService:
    """A started server, its port, and what it needs to stop cleanly."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    definition: ServiceDefinition
    resources: Resources
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float, drain_notice: float = 0.0) -> None:
        """Drain: NOT_SERVING, wait ``drain_notice``, refuse new calls, give in-flight ones ``grace``."""
        await self.health.enter_graceful_shutdown()
        if self.definition.on_drain is not None:
            await self.definition.on_drain()
        if drain_notice:
            await asyncio.sleep(drain_notice)
        await self.server.stop(grace)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.definition.close is not None:
            await self.definition.close()
        await self.resources.close()


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """OpenTelemetry's server interceptor (W3C trace context, a span per call), except on health checks.

    Its aio wrapper expects streaming handlers to be async generators; the health service's Watch
    writes with ``context.write()`` instead and would fail. Probes are not worth a span anyway. The
    check is a string prefix: the package's own filters cost more per call than the span itself.
    """

    def __init__(self) -> None:
        """Wrap the instrumentation package's interceptor."""
        # The instrumentation package leaves this factory unannotated; it returns an aio interceptor.
        self._traced: grpc.aio.ServerInterceptor = aio_server_interceptor()  # type: ignore[no-untyped-call]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Trace the call unless it is a health check."""
        if handler_call_details.method.startswith("/grpc.health."):
            return await continuation(handler_call_details)
        return await self._traced.intercept_service(continuation, handler_call_details)


async def start_service(
    settings: Settings, build: Builder, resources: Resources | None = None, *, without: Collection[str] = ()
) -> RunningService:
    """Build and start a service on ``settings.host:listen_port`` (port 0 picks a free one).

    ``without`` turns concerns off ("tracing" or one of the pipeline's ``CONCERNS``) for the bench's
    ablation table only.
    """
    resources = resources or await Resources.open(settings)
    loop = asyncio.get_running_loop()
    # A leak of tasks (streams, consumers, retries never awaited) shows here first: make soak reads it.
    Gauge("asyncio_tasks", "Tasks alive on the service's event loop.", registry=resources.metrics.registry
          ).set_function(lambda: len(asyncio.all_tasks(loop)))
    definition = await build(settings, resources)
    pipeline = CallPipeline(
        metrics=resources.metrics,
        verifier=resources.verifier,
        revocations=resources.revocations,
        public_methods=definition.public_methods,
        max_deadline_seconds=settings.max_deadline_seconds,
        without=[c for c in without if c != "tracing"],
    )
    server = grpc.aio.server(
        interceptors=[pipeline] if "tracing" in without else [TracingInterceptor(), pipeline],
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Lets idle edge connections stay open; clients pinging more often than this are refused.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    definition.register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*definition.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.listen_port}")
    await server.start()
    for name in ("", *definition.service_names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningService(server, port, health, definition, resources)
    jobs = [resources.revocations.poll, *definition.background]
    running.tasks = [asyncio.create_task(job(), name=f"background-{i}") for i, job in enumerate(jobs)]
    return running


async def _serve_until_signalled(settings: Settings, build: Builder) -> None:
    # Handlers first: a SIGTERM that arrives while the service is still starting must stop it
    # cleanly once it is up, not kill the process half-way through opening its store.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_service(settings, build)
    log.info("serving", extra={"fields": {"address": f"{settings.host}:{running.port}"}})
    await stop.wait()
    log.info("draining", extra={"fields": {"grace_seconds": settings.grace_seconds}})
    await running.stop(settings.grace_seconds, drain_notice=settings.drain_notice_seconds)
    log.info("stopped")


def run_worker(settings: Settings, build: Builder, worker: int) -> None:
    """Run one worker process's server until SIGTERM/SIGINT."""
    configure_logging(settings, worker)
    configure_tracing(settings)
    asyncio.run(_serve_until_signalled(settings, build))


def run_service(service: ServiceName, build: Builder) -> None:
    """Entry point of ``python -m services.<name>``: one worker, or a supervisor of N workers."""
    try:
        settings = Settings.from_env(service)
    except SettingsError as error:
        print(f"fittracker-{service}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    workers = settings.workers or os.cpu_count() or 1
    if workers == 1 or "FITTRACKER_WORKER_INDEX" in os.environ:
        run_worker(settings, build, settings.worker_index)
        return
    _supervise(service, workers)


def _supervise(service: ServiceName, workers: int) -> None:
    """Start ``workers`` copies of this service on the same port and relay signals to them.

    Workers are fresh interpreters rather than forks: gRPC's core must not be forked once started.
    """
    children: list[subprocess.Popen[bytes]] = []
    relayed: list[int] = []

    def relay(signum: int, _frame: Any) -> None:
        relayed.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Handlers before the first worker exists, so no signal can leave a worker orphaned.
    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    for i in range(workers):
        if relayed:
            break
        children.append(
            subprocess.Popen(  # noqa: S603 - runs this same interpreter on our own module
                [sys.executable, "-m", f"services.{service}"],
                env={**os.environ, "FITTRACKER_WORKER_INDEX": str(i)},
            )
        )
    codes = [child.wait() for child in children]
    # A worker still importing when the stop signal came dies of it before its handlers exist:
    # that is the stop we asked for, not a failure.
    codes = [0 if relayed and code in (-signal.SIGTERM, -signal.SIGINT) else code for code in codes]
    raise SystemExit(max(codes, key=abs))
