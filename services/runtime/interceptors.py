"""The server call pipeline: deadline check, authentication, validation, error mapping, metrics, logs.

One ``grpc.aio`` interceptor wraps each method's handler once (cached per method), so a call pays
for a few function calls rather than a chain of interceptor objects. The concerns stay separate
functions in this module; the order they run in is the order of ``_run_unary``.
Tracing runs before it, in OpenTelemetry's own interceptor, so every log line has a trace id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import grpc
import redis.exceptions
from google.protobuf.message import Message
from grpc_status import rpc_status
from opentelemetry import trace

from services.runtime import auth
from services.runtime.errors import DeadlineExceeded, DomainError, InvalidArgument, Unauthenticated, Unavailable
from services.runtime.observability import AccessLog, Metrics, monotonic
from services.runtime.revocation import Revocations
from services.runtime.storage import StoreTimeout, StoreUnavailable
from services.runtime.validation import RequestValidator

log = logging.getLogger("fittracker.rpc")

#: Seconds left before the current call's deadline (capped), for outgoing calls to inherit.
call_deadline: ContextVar[float | None] = ContextVar("call_deadline", default=None)

#: Services whose requests are not ours to authenticate or validate.
INFRASTRUCTURE_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
#: The concerns of the call pipeline, each of which the bench's ablation can turn off alone.
CONCERNS = ("auth", "validation", "metrics", "access_log", "deadline")
#: A call arriving with less time than this left cannot do useful work.
MIN_USEFUL_SECONDS = 0.002

Context = grpc.aio.ServicerContext[Any, Any]
Unary = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler


#: A dependency that could not be reached, so the call changed nothing: safe to retry (the edge does).
_DEPENDENCY_DOWN = (StoreUnavailable, redis.exceptions.ConnectionError)
#: A dependency that stopped answering mid-operation: the change may or may not have been made.
_DEPENDENCY_STALLED = (StoreTimeout, redis.exceptions.TimeoutError)


def _dependency_failure(error: BaseException) -> BaseException:
    """UNAVAILABLE for an unreachable store or Redis, DEADLINE_EXCEEDED for one that stalled mid-call.

    A stalled call's outcome is unknown, so it must not be retried blindly (the edge retries
    UNAVAILABLE even for writes). Other errors are returned as they are.
    """
    if isinstance(error, _DEPENDENCY_DOWN):
        return Unavailable(f"a backing service is unreachable now ({type(error).__name__}); try again shortly")
    if isinstance(error, _DEPENDENCY_STALLED):
        return DeadlineExceeded(f"a backing service stopped answering ({type(error).__name__}); the change "
                                "may or may not have been made: read it back before repeating it")
    return error


@dataclass
class MethodStats:
    """One method's metric series, looked up once when its handler is wrapped, not on every call."""

    service: str
    name: str
    in_flight: Any
    latency: Any
    metrics: Metrics
    handled: dict[grpc.StatusCode, Any] = field(default_factory=dict)

    def count(self, code: grpc.StatusCode) -> None:
        """Count one finished call with ``code``."""
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = self.metrics.handled.labels(self.service, self.name, code.name)
        child.inc()


class CallPipeline(grpc.aio.ServerInterceptor):
    """Wraps every handler of a server with the cross-cutting concerns of a FitTracker call."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        verifier: auth.TokenVerifier,
        public_methods: Collection[str],
        revocations: Revocations | None = None,
        max_deadline_seconds: float,
        validator: RequestValidator | None = None,
        without: Collection[str] = (),
    ) -> None:
        """``public_methods`` are full method names ("/pkg.Service/Method") callable without a token.

        ``without`` turns concerns off (of ``CONCERNS``), only for the bench's ablation table, which
        measures what each one costs; a service always runs them all.
        """
        unknown = set(without) - set(CONCERNS)
        if unknown:
            raise ValueError(f"unknown concerns {sorted(unknown)}; known: {', '.join(CONCERNS)}")
        self._auth_on = "auth" not in without
        self._validation_on = "validation" not in without
        self._metrics_on = "metrics" not in without
        self._deadline_on = "deadline" not in without
        self._metrics = metrics
        self._verifier = verifier
        self._revocations = revocations
        self._public = frozenset(public_methods)
        self._max_deadline = max_deadline_seconds
        self._validator = validator or RequestValidator()
        self._access_log = AccessLog(log)
        self._access_log_on = "access_log" not in without
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """Return the cached wrapped handler of the called method."""
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None or method.startswith(INFRASTRUCTURE_PREFIXES):
                return handler
            wrapped = self._wrap(method, handler)
            self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        # grpc's type stubs describe sync handlers; an aio server registers coroutine functions
        # and async generators, hence the casts to the aio shapes below.
        service, _, name = method[1:].rpartition("/")
        stats = MethodStats(
            service, name,
            in_flight=self._metrics.in_flight.labels(service, name),
            latency=self._metrics.latency.labels(service, name),
            metrics=self._metrics,
        )
        public = method in self._public
        des, ser = _tolerant(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary is not None:
            inner = cast(Unary, handler.unary_unary)

            async def unary_unary(request: Message, context: Context) -> Any:
                return await self._run_unary(stats, public, inner, request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
        if handler.unary_stream is not None:
            inner_stream = cast(Streaming, handler.unary_stream)

            async def unary_stream(request: Message, context: Context) -> AsyncIterator[Any]:
                async for item in self._run_stream(stats, public, inner_stream, request, context, False):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
        if handler.stream_unary is not None:
            inner_su = cast(Unary, handler.stream_unary)

            async def stream_unary(requests: AsyncIterator[Message], context: Context) -> Any:
                return await self._run_unary(stats, public, inner_su, self._validated(requests), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
        inner_ss = cast(Streaming, handler.stream_stream)

        async def stream_stream(requests: AsyncIterator[Message], context: Context) -> AsyncIterator[Any]:
            async for item in self._run_stream(
                stats, public, inner_ss, self._validated(requests), context, True
            ):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)

    async def _run_unary(
        self, stats: MethodStats, public: bool, inner: Unary, request: Any, context: Context
    ) -> Any:
        started = monotonic()
        if self._metrics_on:
            stats.in_flight.inc()
        code = grpc.StatusCode.OK
        principal_token = deadline_token = None
        try:
            own_deadline = False
            deadline = self._max_deadline
            if self._deadline_on:
                own_deadline, deadline = self._check_deadline(context)
                deadline_token = call_deadline.set(deadline)
            if self._auth_on:
                principal_token = auth.set_principal(self._authenticate(context, public))
            if self._validation_on and not isinstance(request, AsyncIterator):  # streams: per message
                self._check_request(request)
            if own_deadline or not self._deadline_on:
                # gRPC itself cancels the handler at the client's deadline.
                return await inner(request, context)
            # No handler outlives the longest deadline either: the deletion saga's erasure delay
            # relies on every write that passed the token check ending by then. (asyncio.timeout
            # costs ~5 µs a call, so only calls without a shorter deadline of their own pay it.)
            budget = asyncio.timeout(deadline)
            try:
                async with budget:
                    return await inner(request, context)
            except TimeoutError:
                if budget.expired():
                    raise DeadlineExceeded("the call ran past its deadline") from None
                raise
        except BaseException as raised:
            error = _dependency_failure(raised)
            code = self._status_of(error, context)
            await self._abort(stats, error, context)
            raise
        finally:
            self._finish(stats, code, started)
            if principal_token is not None:
                auth.reset_principal(principal_token)
            if deadline_token is not None:
                call_deadline.reset(deadline_token)

    async def _run_stream(
        self,
        stats: MethodStats,
        public: bool,
        inner: Callable[[Any, Context], AsyncIterator[Any]],
        request: Any,
        context: Context,
        streamed_request: bool,
    ) -> AsyncIterator[Any]:
        started = monotonic()
        if self._metrics_on:
            stats.in_flight.inc()
        code = grpc.StatusCode.OK
        principal_token = None
        try:
            if self._deadline_on:
                self._check_deadline(context)
            if self._auth_on:
                principal_token = auth.set_principal(self._authenticate(context, public))
            if self._validation_on and not streamed_request:
                self._check_request(request)
            async for item in inner(request, context):
                yield item
        except BaseException as raised:
            error = _dependency_failure(raised)
            code = self._status_of(error, context)
            await self._abort(stats, error, context)
            raise
        finally:
            self._finish(stats, code, started)
            if principal_token is not None:
                # A stream the client cancelled is closed by grpc from another task (another
                # context), where the token cannot be reset; that context ends with the stream anyway.
                with contextlib.suppress(ValueError):
                    auth.reset_principal(principal_token)

    async def _validated(self, requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
        async for request in requests:
            self._check_request(request)
            yield request

    def _check_request(self, request: Any) -> None:
        if isinstance(request, Undecodable):
            raise InvalidArgument.field("request", f"is not a valid {request.type_name} in protobuf wire format")
        self._validator.check(request)

    def _check_deadline(self, context: Context) -> tuple[bool, float]:
        """(whether gRPC ends the call at its own deadline before ours, the time the call has)."""
        remaining = context.time_remaining()
        if remaining is None:
            return False, self._max_deadline
        if remaining < MIN_USEFUL_SECONDS:
            raise DeadlineExceeded("the call's deadline passed before it could be handled")
        if remaining < self._max_deadline:
            return True, remaining
        return False, self._max_deadline

    def _authenticate(self, context: Context, public: bool) -> auth.Principal | None:
        metadata = {k: v for k, v in context.invocation_metadata() or ()}
        token = auth.bearer_token(metadata)
        if token is None:
            if public:
                return None
            raise Unauthenticated("this method needs a bearer access token")
        principal = self._verifier.verify(token)
        if self._revocations is not None and self._revocations.is_revoked(principal):
            raise Unauthenticated("this session has ended; sign in again")
        return principal

    def _status_of(self, error: BaseException, context: Context) -> grpc.StatusCode:
        """The status code a call that raised ``error`` ends with."""
        if isinstance(error, DomainError):
            return error.code
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            # GeneratorExit: the client went away and gRPC closed our response stream.
            return grpc.StatusCode.CANCELLED
        if _is_abort(error):
            return context.code() or grpc.StatusCode.UNKNOWN
        return grpc.StatusCode.INTERNAL

    async def _abort(self, stats: MethodStats, error: BaseException, context: Context) -> None:
        """End the call with the status ``error`` maps to, unless gRPC already ended it."""
        if isinstance(error, DomainError):
            await context.abort_with_status(rpc_status.to_status(error.to_status()))
        if isinstance(error, asyncio.CancelledError | GeneratorExit) or _is_abort(error):
            return
        trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
        log.error(
            "unhandled error in %s/%s", stats.service, stats.name, exc_info=error,
            extra={"fields": {"method": f"{stats.service}/{stats.name}"}},
        )
        # Internals stay in the log; the client gets the trace id to quote.
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error; trace id {trace_id}")

    def _finish(self, stats: MethodStats, code: grpc.StatusCode, started: float) -> None:
        elapsed = monotonic() - started
        if self._metrics_on:
            stats.in_flight.dec()
            stats.count(code)
            stats.latency.observe(elapsed)
        if self._access_log_on and self._access_log.enabled:
            principal = auth.optional_principal()
            self._access_log.write(
                f"{stats.service}/{stats.name}", code.name, elapsed, principal.user_id if principal else None
            )


class Undecodable:
    """Stands in for a request whose bytes do not parse as its message type.

    gRPC would answer a deserializer's exception with UNKNOWN and the exception's class in the
    message; handing the pipeline this marker instead lets it answer INVALID_ARGUMENT, after
    authentication like any other bad request.
    """

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        """``type_name`` is the full name of the message type the bytes should have been."""
        self.type_name = type_name


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize``, returning an Undecodable for bytes that are not the request type."""
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)  # Request.FromString, bound to the message class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "request message"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # whatever the parser refuses is the caller's malformed request
            return Undecodable(type_name)

    return parse


def _is_abort(error: BaseException) -> bool:
    """Whether ``error`` is gRPC's own signal that the call was already ended with a status."""
    return type(error).__name__ == "AbortError" and type(error).__module__.startswith("grpc")
