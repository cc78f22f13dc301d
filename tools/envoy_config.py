"""Render the Envoy edge bootstrap from the contracts and a small topology.

One source of truth: the descriptor set (``envoy/generated/fittracker.binpb``, written by
``tools/gen.py``) says which gRPC services exist, their full names and which methods stream; the
topology says where each domain's replicas listen. Everything else in the config follows from
those two and a handful of edge options (ports, CORS origins, limits).

``python tools/envoy_config.py`` rewrites ``envoy/generated/envoy.yaml`` for the default local
topology (every domain of the descriptor, ``DEFAULT_REPLICAS`` replicas on the port scheme of
``replica_port``); ``--check`` fails when that committed file is stale; the other flags render a
config for any ports and paths into any file, which is what ``tools/devstack.py`` and the edge
tests do.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple
from urllib.parse import urlsplit

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = Path("envoy/generated/fittracker.binpb")
OUTPUT = Path("envoy/generated/envoy.yaml")

#: The port replica 0 of each domain listens on; the same map as services.runtime.settings.
BASE_PORTS: dict[str, int] = {"user": 50051, "workout": 50052, "ai": 50053, "notification": 50054, "analytics": 50055}
#: Replica i of a domain listens on its base port + i * REPLICA_PORT_STRIDE (50051, 50061, ...),
#: so replica 0 keeps the documented default port and the domains never collide below 10 replicas.
REPLICA_PORT_STRIDE = 10
DEFAULT_REPLICAS = 2

#: Methods callable without an access token. Must equal the union of the services' own
#: ``PUBLIC_METHODS`` (tests/edge checks it), since services enforce the same rule behind the edge.
PUBLIC_METHODS = (
    "/fittracker.user.v1.UserService/Register",
    "/fittracker.user.v1.UserService/Login",
    "/fittracker.user.v1.UserService/RefreshToken",
    "/fittracker.user.v1.UserService/GetJwks",
)
JWT_ISSUER = "https://auth.fittracker.app"
JWT_AUDIENCE = "fittracker-api"
#: Headers the edge sets from a verified token; removed from every incoming request first so
#: that a client can never forge them on a route where the token is optional.
JWT_PAYLOAD_HEADER = "x-jwt-payload"
USER_ID_HEADER = "x-user-id"
#: The client's address as the edge determined it (the socket peer, or the trusted hop of
#: X-Forwarded-For behind a load balancer); services count login failures per this address.
CLIENT_ADDRESS_HEADER = "x-fittracker-client-address"
#: Browser origins allowed when none are configured: local development servers only (webpack's
#: and Vite's default ports). A deployment sets its own in CORS_ORIGINS_ENV or with --cors-origin.
DEFAULT_CORS_ORIGINS = ("http://localhost:3000", "http://localhost:5173")
#: Comma-separated allowed origins, exactly as browsers send them (``https://app.example``), or
#: ``none`` when no browser app may call the API.
CORS_ORIGINS_ENV = "FITTRACKER_EDGE_CORS_ORIGINS"
#: A cluster without endpoints: allowed preflights are routed to it only because the CORS filter
#: answers on forwarding routes alone; it answers every one of them, and were one ever to get past
#: it, it would still find no service here.
PREFLIGHT_CLUSTER = "cors-preflight"
MIB = 1024 * 1024
#: Open server streams (Subscribe) one replica is sized for (tools/stream_scale.py measures it). A
#: stream holds a request slot for as long as it is open, so streams get a circuit-breaker budget
#: of their own (routing priority HIGH) instead of starving the unary calls' 256 slots.
STREAMS_PER_REPLICA = 10_000

#: JSON reads a CDN (and the apps' HTTP caches) may keep, with their Cache-Control. Each gets a
#: strong ETag and answers If-None-Match with 304 (envoy/lua/etag.lua). The catalog is the same for
#: every member and not secret, so ``public`` lets shared caches store it although the request
#: carries a token (RFC 9111 section 3.5); a CDN in front must still demand a token if the catalog
#: is to stay members-only. Nothing per-user belongs here.
#: ``s-maxage`` is what the CDN keeps a copy for; ``max-age`` what an app's own cache does.
CACHE_POLICIES: dict[str, str] = {
    "/fittracker.workout.v1.WorkoutService/ListExercises":
        "public, max-age=60, s-maxage=300, stale-while-revalidate=60",
    "/fittracker.workout.v1.WorkoutService/GetExercise":
        "public, max-age=60, s-maxage=300, stale-while-revalidate=60",
    # Short: a rotated key must reach verifiers soon (Envoy itself reads the file at start).
    "/fittracker.user.v1.UserService/GetJwks": "public, max-age=300, s-maxage=300",
}
#: Every other JSON read answers for one caller (their profile, sessions, stats): no cache may keep it.
PER_USER_POLICY = "private, no-store"
#: A cacheable reply varies with the request's Origin: the CORS filter echoes it in
#: Access-Control-Allow-Origin, and one origin's copy would be refused by a browser on another.
CACHE_VARY = "Origin"
#: The Lua source of the ETag filter (hand-written; Envoy reads it at start).
ETAG_LUA = Path("envoy/lua/etag.lua")
#: Response header a cacheable route adds so that the Lua filter hashes its body (and removes it).
ETAG_MARKER = "x-fittracker-etag"
#: Descriptor keys the client quotas use, locally and in the rate-limit service's config.
IP_DESCRIPTOR = "remote_address"
USER_DESCRIPTOR = "user_id"
RATE_LIMIT_DOMAIN = "fittracker-edge"
#: Cluster of the global rate-limit service (envoyproxy/ratelimit), when one is configured.
RATE_LIMIT_CLUSTER = "ratelimit"

_PACKAGE = re.compile(r"^fittracker\.([a-z][a-z0-9_]*)\.(v\d+)$")


# --------------------------------------------------------------------------------------------
# Inputs: the services of the descriptor set, the topology, the edge options.


@dataclass(frozen=True)
class Method:
    """One RPC of a gRPC service."""

    name: str
    client_streaming: bool
    server_streaming: bool
    #: Mapped to HTTP GET: no side effects (AIP-131/132), so safe to retry even after it was sent.
    read_only: bool = False


@dataclass(frozen=True)
class GrpcService:
    """A gRPC service of the contracts and the domain (process) that serves it."""

    full_name: str
    domain: str
    methods: tuple[Method, ...]

    @property
    def prefix(self) -> str:
        """The HTTP/2 path prefix of its methods, e.g. ``/fittracker.user.v1.UserService/``."""
        return f"/{self.full_name}/"

    @property
    def version(self) -> str:
        """The major version of its package, e.g. ``v1``."""
        match = _PACKAGE.match(self.full_name.rpartition(".")[0])
        return match.group(2) if match else ""

    def cluster(self, topology: Mapping[str, object]) -> str | None:
        """The cluster that serves it: ``<domain>-<version>`` if the topology names one, else ``<domain>``.

        So a v2 runs in the v1 processes by default, or in a deployment of its own when the
        topology lists one (``user-v2=host:port``); None when the topology serves neither.
        """
        for name in (f"{self.domain}-{self.version}", self.domain):
            if name in topology:
                return name
        return None


class Address(NamedTuple):
    """A replica's host and port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``host:port``."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


#: Where each domain's replicas listen, e.g. {"user": (Address("127.0.0.1", 50051), ...)}.
Topology = Mapping[str, Sequence[Address]]


@dataclass(frozen=True)
class Limit:
    """A client quota: ``requests`` per ``window``, with bursts of up to ``burst`` saved up.

    Locally it is a token bucket (``burst`` tokens, ``requests`` added each window); the global
    rate-limit service counts ``requests`` per fixed window and has no burst.
    """

    requests: int
    window: str = "second"
    burst: int = 0

    WINDOWS: ClassVar[dict[str, int]] = {"second": 1, "minute": 60}

    def __post_init__(self) -> None:
        """Refuse limits Envoy would refuse, naming the problem."""
        if self.requests < 1 or self.burst < 0 or self.window not in self.WINDOWS:
            raise ValueError(f"bad limit {self.requests}/{self.window} burst {self.burst}")

    @property
    def bucket(self) -> int:
        """Tokens the local bucket holds when full."""
        return max(self.burst, self.requests)

    @classmethod
    def parse(cls, text: str) -> Limit | None:
        """``"100/s"``, ``"100/s,200"`` (burst 200), ``"6000/m"``; ``"0"`` or ``"off"`` is no limit."""
        spec = text.strip().lower()
        if spec in {"0", "off", ""}:
            return None
        rate, _, burst = spec.partition(",")
        count, _, unit = rate.partition("/")
        window = {"s": "second", "m": "minute", "": "second"}.get(unit)
        if window is None or not count.isdigit() or (burst and not burst.isdigit()):
            raise ValueError(f"expected REQUESTS/s or REQUESTS/m, optionally ,BURST; got {text!r}")
        return cls(int(count), window, int(burst or 0))

    def __str__(self) -> str:
        """The form ``parse`` reads."""
        return f"{self.requests}/{self.window[0]}" + (f",{self.burst}" if self.burst else "")


@dataclass(frozen=True)
class EdgeOptions:
    """Everything about the edge that is not derived from the contracts or the topology."""

    listen_address: str = "127.0.0.1"
    listen_port: int = 8080
    admin_port: int = 9901
    #: Paths as Envoy will open them: relative ones resolve against Envoy's working directory.
    descriptor_path: str = str(DESCRIPTOR)
    etag_lua_path: str = str(ETAG_LUA)
    jwks_path: str = ".data/keys/jwks.json"
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    max_request_bytes: int = 1 * MIB
    #: Requests per second the whole edge admits before answering 429; 0 turns the limit off.
    rate_limit_rps: int = 5000
    #: Per client address. Carriers put many phones behind one address (CGNAT), so this stops
    #: floods rather than people: well above what one person does.
    ip_limit: Limit | None = Limit(100, "second", burst=200)
    #: Per signed-in user (the token's subject): an app opening fires ~10 calls at once, and no
    #: person sustains 20 calls a second.
    user_limit: Limit | None = Limit(20, "second", burst=40)
    #: The global rate-limit service ("host:port", envoyproxy/ratelimit over Redis). When set, the
    #: quotas above are counted there, shared by every edge instance; otherwise each Envoy counts
    #: on its own (N edges admit N times the quota).
    rate_limit_service: str = ""
    #: OTLP gRPC collector ("host:port") for the edge's spans; empty keeps them unexported.
    otlp_endpoint: str = ""
    #: Proxies in front of the edge that each append the address they saw to X-Forwarded-For (the
    #: Istio ingress gateway in a cluster): the client address is that many entries from the right.
    #: 0 locally, where clients connect straight to the edge.
    xff_num_trusted_hops: int = 0
    extra_clusters: Mapping[str, Sequence[Address]] = field(default_factory=dict)


def _http_verb(method: descriptor_pb2.MethodDescriptorProto) -> str | None:
    """The verb of the method's google.api.http rule (``get``, ``post``, ...), None without one."""
    # googleapis-common-protos' stub types the extension as a plain FieldDescriptor.
    rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]  # type: ignore[index]
    verb: str | None = rule.WhichOneof("pattern")
    return verb


def read_services(descriptor_path: Path) -> list[GrpcService]:
    """The FitTracker gRPC services of a descriptor set, sorted by full name."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    found: list[GrpcService] = []
    for proto in files.file:
        match = _PACKAGE.match(proto.package)
        if match is None:
            continue
        for service in proto.service:
            methods = tuple(
                Method(m.name, m.client_streaming, m.server_streaming, read_only=_http_verb(m) == "get")
                for m in service.method
            )
            found.append(GrpcService(f"{proto.package}.{service.name}", match.group(1), methods))
    return sorted(found, key=lambda s: s.full_name)


def replica_port(domain: str, replica: int) -> int:
    """The local port of ``domain``'s replica number ``replica`` (see REPLICA_PORT_STRIDE)."""
    return BASE_PORTS[domain] + REPLICA_PORT_STRIDE * replica


def default_topology(domains: Iterable[str], replicas: int = DEFAULT_REPLICAS, host: str = "127.0.0.1") -> Topology:
    """Every domain with ``replicas`` local replicas on the documented port scheme."""
    return {d: tuple(Address(host, replica_port(d, i)) for i in range(replicas)) for d in sorted(set(domains))}


# --------------------------------------------------------------------------------------------
# A tiny YAML writer: PyYAML cannot write comments, and the config must explain its knobs.


@dataclass(frozen=True)
class Commented:
    """A value written with a ``# why`` line above its key (or list item)."""

    why: str
    value: Yaml


Yaml = None | bool | int | float | str | list["Yaml"] | dict[str, "Yaml"] | Commented


def why(reason: str, value: Yaml) -> Commented:
    """Attach a one-line reason to a config value."""
    return Commented(reason, value)


_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./:*-]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value: Yaml, *, flow: bool = False) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        plain = _PLAIN.match(value) and not value.endswith(":") and value.lower() not in _RESERVED
        # Inside {...} a colon is a separator to some parsers: quote such strings there.
        if plain and not (flow and ":" in value):
            return value
        # A JSON string is a valid YAML double-quoted scalar, escapes included.
        return json.dumps(value)
    raise TypeError(f"not a scalar: {value!r}")


#: Mappings and sequences whose one-line form fits in this many characters are written inline,
#: as in hand-written Envoy configs: ``socket_address: {address: 127.0.0.1, port_value: 8080}``.
_FLOW_WIDTH = 72


def _flow(value: Yaml) -> str | None:
    """The inline form of ``value``, or None when it is too long or carries comments."""
    if isinstance(value, Commented):
        return None
    if isinstance(value, dict):
        parts = [(_scalar(k, flow=True), _flow(v)) for k, v in value.items()]
        if any(v is None for _, v in parts):
            return None
        text = "{" + ", ".join(f"{k}: {v}" for k, v in parts) + "}"
    elif isinstance(value, list):
        items = [_flow(v) for v in value]
        if any(v is None for v in items):
            return None
        text = "[" + ", ".join(v for v in items if v is not None) + "]"
    else:
        return _scalar(value, flow=True)
    return text if len(text) <= _FLOW_WIDTH else None


def _entries(value: dict[str, Yaml] | list[Yaml]) -> list[tuple[str | None, Yaml]]:
    """(key, value) pairs of a mapping, (None, item) pairs of a sequence."""
    return list(value.items()) if isinstance(value, dict) else [(None, item) for item in value]


def _emit(value: dict[str, Yaml] | list[Yaml], indent: int, out: list[str], said: set[str]) -> None:
    """Append the block lines of a non-empty mapping or sequence at ``indent`` spaces.

    A reason is written at its first occurrence only (``said``): repeated knobs, such as every
    cluster's, are explained once.
    """
    pad = " " * indent
    for key, entry in _entries(value):
        item = entry
        if isinstance(item, Commented):
            if item.why not in said:
                out.append(f"{pad}# {item.why}")
                said.add(item.why)
            item = item.value
        lead = f"{pad}{_scalar(key)}:" if key is not None else f"{pad}-"
        inline = _flow(item) if isinstance(item, dict | list) else None
        if not isinstance(item, dict | list):
            out.append(f"{lead} {_scalar(item)}")
        elif inline is not None:
            out.append(f"{lead} {inline}")
        elif key is None and isinstance(item, dict):
            # "- first_key: ..." with the rest of the mapping aligned under first_key.
            nested: list[str] = []
            _emit(item, indent + 2, nested, said)
            first = next(i for i, line in enumerate(nested) if not line.lstrip().startswith("#"))
            out.extend(nested[:first])
            out.append(f"{pad}- {nested[first][indent + 2:]}")
            out.extend(nested[first + 1:])
        else:
            out.append(lead)
            _emit(item, indent + 2, out, said)


def to_yaml(document: dict[str, Yaml], header: str) -> str:
    """Write ``document`` as block YAML with its comments, ``header`` as the opening comment."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    said: set[str] = set()
    for key, value in document.items():
        out.append("")
        _emit({key: value}, 0, out, said)
    return "\n".join(out) + "\n"


def plain(value: Yaml) -> object:
    """``value`` without its comments: what a YAML parser reads back (used by the tests)."""
    if isinstance(value, Commented):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# The config, one builder per concern.

_TYPE = "type.googleapis.com/"


def _typed(type_name: str, **fields: Yaml) -> dict[str, Yaml]:
    return {"@type": _TYPE + type_name, **fields}


def _access_log() -> list[Yaml]:
    """JSON lines on stdout, one per request, joinable with the services' logs by trace id."""
    fields: dict[str, Yaml] = {
        "time": "%START_TIME%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        # Set when tracing is on (an OTLP collector is configured); traceparent when the client sent one.
        "trace_id": "%TRACE_ID%",
        "traceparent": "%REQ(TRACEPARENT)%",
        "method": "%REQ(:METHOD)%",
        # The path the client sent (the transcoder keeps it here after rewriting :path), without
        # the query: a client may put a credential there, and logs must never hold one.
        "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "grpc_method": "%REQ_WITHOUT_QUERY(:PATH)%",
        "content_type": "%REQ(CONTENT-TYPE)%",
        "protocol": "%PROTOCOL%",
        "status": "%RESPONSE_CODE%",
        "grpc_status": "%GRPC_STATUS_NUMBER%",
        "flags": "%RESPONSE_FLAGS%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "duration_ms": "%DURATION%",
        "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
        "user_id": f"%REQ({USER_ID_HEADER.upper()})%",
        "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
        "bytes_in": "%BYTES_RECEIVED%",
        "bytes_out": "%BYTES_SENT%",
        "user_agent": "%REQ(USER-AGENT)%",
    }
    return [{
        "name": "envoy.access_loggers.stdout",
        "filter": why("Load balancers' /healthz probes would drown the real traffic.", {"not_health_check_filter": {}}),
        "typed_config": _typed(
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            log_format={"json_format": fields, "formatters": [{
                "name": "envoy.formatter.req_without_query",
                "typed_config": _typed("envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"),
            }]},
        ),
    }]


#: google.rpc.Code of each HTTP status Envoy answers by itself (google/rpc/code.proto's mapping),
#: so JSON clients parse Envoy's errors exactly like the transcoded ones from the services.
_RPC_CODE_OF_HTTP_STATUS = {
    400: 3,   # INVALID_ARGUMENT: malformed JSON, unknown query parameter
    401: 16,  # UNAUTHENTICATED: missing or invalid token
    403: 7,   # PERMISSION_DENIED
    404: 5,   # NOT_FOUND: no such route or method
    405: 12,  # UNIMPLEMENTED: an OPTIONS that is not a CORS preflight
    413: 8,   # RESOURCE_EXHAUSTED: body over the limit, as gRPC reports an oversized message
    429: 8,   # RESOURCE_EXHAUSTED: edge rate limit
    500: 13,  # INTERNAL
    503: 14,  # UNAVAILABLE: no healthy replica, circuit breaker open
    504: 4,   # DEADLINE_EXCEEDED: upstream timeout
}


def _local_reply() -> dict[str, Yaml]:
    """Envoy's own error replies to JSON clients as a google.rpc.Status-shaped JSON body."""
    grpc_client: Yaml = {"and_filter": {"filters": [
        # gRPC, or gRPC-Web (whose content type grpc_web rewrote), and not a transcoded JSON call,
        {"header_filter": {"header": {"name": "content-type", "string_match": {"prefix": "application/grpc"}}}},
        # since the transcoder keeps the JSON path of the calls it rewrote here.
        {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True,
                                      "invert_match": True}}},
    ]}}

    def status_is(op: str, status: int) -> Yaml:
        # The API requires a runtime key; no runtime layer sets this one, so the default holds.
        return {"status_code_filter": {"comparison": {
            "op": op, "value": {"default_value": status, "runtime_key": "edge.local_reply.status"},
        }}}

    def body(code: int) -> dict[str, Yaml]:
        return {"json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%", "request_id": "%REQ(X-REQUEST-ID)%"}}

    as_is: Yaml = {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"}}
    def grpc_reply(status: int, grpc_status: int, message: str) -> Yaml:
        return {
            "filter": {"and_filter": {"filters": [grpc_client, status_is("EQ", status)]}},
            "status_code": 200,
            "headers_to_add": [
                {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for key, value in (("content-type", "application/grpc"), ("grpc-status", str(grpc_status)),
                                   ("grpc-message", message))
            ],
            "body_format_override": {"text_format_source": {"inline_string": ""}},
        }

    mappers: list[Yaml] = [
        why("First match wins. A quota reply to gRPC-Web is plain HTTP 429, which grpc_web would turn into "
            "UNAVAILABLE (retry now): make it the trailers-only gRPC reply native gRPC gets.",
            grpc_reply(429, 8, "rate limited")),
        why("A body over the buffer limit (413) would reach gRPC callers as UNKNOWN: RESOURCE_EXHAUSTED, as "
            "a replica reports an oversized message.",
            grpc_reply(413, 8, "request message larger than the edge accepts")),
        why("gRPC callers keep their reply as is (status in grpc-status, grpc-message).",
            {"filter": grpc_client, "body_format_override": as_is}),
    ]
    mappers += [
        {"filter": status_is("EQ", status), "body_format_override": body(code)}
        for status, code in _RPC_CODE_OF_HTTP_STATUS.items()
    ]
    mappers.append({"filter": status_is("GE", 400), "body_format_override": body(2)})  # UNKNOWN
    return {"mappers": mappers}


_DEFAULT_PORTS = {"http": 80, "https": 443}


def check_origin(text: str) -> str:
    """``text`` when it is an origin written as browsers send it in ``Origin``, else ValueError.

    The CORS filter and the preflight routes compare origins exactly, so a trailing slash, a
    default port or upper case would silently never match: refused here, with the right spelling.
    """
    origin = text.strip()
    parts = urlsplit(origin)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (parts.scheme not in _DEFAULT_PORTS or not parts.hostname or "*" in origin or port == -1
            or parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"bad CORS origin {text!r}: expected scheme://host[:port], e.g. https://app.example")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    written = f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, _DEFAULT_PORTS[parts.scheme]) else "")
    if origin != written:
        raise ValueError(f"CORS origin {text!r} is never what a browser sends: write {written!r}")
    return origin


def parse_origins(text: str) -> tuple[str, ...]:
    """Comma-separated origins; ``none`` allows no browser origin at all."""
    if text.strip().lower() == "none":
        return ()
    origins = tuple(check_origin(o) for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError("no CORS origin given (write 'none' to allow no browser origin)")
    return origins


def configured_origins(flags: Sequence[tuple[str, ...]], env_value: str) -> tuple[str, ...]:
    """The --cors-origin flags when given, else CORS_ORIGINS_ENV's value when set, else the dev defaults."""
    if flags:
        return tuple(dict.fromkeys(origin for given in flags for origin in given))
    if env_value.strip():
        return parse_origins(env_value)
    return DEFAULT_CORS_ORIGINS


def origins_argument(text: str) -> tuple[str, ...]:
    """The type of --cors-origin: one origin, several separated by commas, or ``none``."""
    try:
        return parse_origins(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _cors_policy(origins: Sequence[str]) -> dict[str, Yaml]:
    return _typed(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=[{"exact": check_origin(o)} for o in origins],
        allow_methods="GET, POST, PUT, PATCH, DELETE, OPTIONS",
        allow_headers=(
            "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout, "
            "x-request-id, traceparent, tracestate, if-none-match"
        ),
        expose_headers=why(
            "gRPC-Web clients read the status, apps the quota and validators; browsers hide unlisted headers.",
            "grpc-status, grpc-message, grpc-status-details-bin, x-request-id, etag, retry-after, "
            "x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset",
        ),
        max_age="86400",
    )


def _jwt_filter(services: Sequence[GrpcService], jwks_path: str) -> dict[str, Yaml]:
    known = {f"{s.prefix}{m.name}" for s in services for m in s.methods}
    public = [p for p in PUBLIC_METHODS if p in known]
    provider = "fittracker"
    rules: list[Yaml] = [
        {
            "match": {"path": path},
            # Verified when present (a forged token still gets 401), allowed when absent.
            "requires": {"requires_any": {"requirements": [{"provider_name": provider}, {"allow_missing": {}}]}},
        }
        for path in public
    ]
    rules.append(why(
        "Everything else, unknown paths included, needs a valid token: secure by default.",
        {"match": {"prefix": "/"}, "requires": {"provider_name": provider}},
    ))
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": _typed(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers={provider: {
                "issuer": JWT_ISSUER,
                "audiences": [JWT_AUDIENCE],
                "local_jwks": why(
                    "Written by the user service before Envoy starts; read once, so a new key needs a restart.",
                    {"filename": jwks_path},
                ),
                "forward": why("Services verify the token again (defence in depth): pass it on.", True),
                "from_headers": why(
                    "Only the header: the default also takes ?access_token=, and URLs end up in logs and histories.",
                    [{"name": "authorization", "value_prefix": "Bearer "}],
                ),
                "forward_payload_header": JWT_PAYLOAD_HEADER,
                "claim_to_headers": [{"header_name": USER_ID_HEADER, "claim_name": "sub"}],
                "clock_skew_seconds": 30,
                "jwt_cache_config": {"jwt_cache_size": 1000},
            }},
            rules=rules,
            bypass_cors_preflight=why(
                "Browsers never send credentials on a preflight; no route takes an OPTIONS to a service.", True),
        ),
    }


def _http_filters(services: Sequence[GrpcService], clusters: Sequence[str], options: EdgeOptions) -> list[Yaml]:
    filters: list[Yaml] = [
        why("Answered by Envoy itself for load balancers; fails when a domain has no healthy replica.", {
            "name": "envoy.filters.http.health_check",
            "typed_config": _typed(
                "envoy.extensions.filters.http.health_check.v3.HealthCheck",
                pass_through_mode=False,
                headers=[{"name": ":path", "string_match": {"exact": "/healthz"}}],
                cluster_min_healthy_percentages={c: {"value": 1.0} for c in clusters},
            ),
        }),
        why("Identity and address headers come only from the edge itself, never from the client.", {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": _typed(
                "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                mutations={"request_mutations": [
                    {"remove": JWT_PAYLOAD_HEADER},
                    {"remove": USER_ID_HEADER},
                    why("Not X-Forwarded-For's first entry, which any client can write.", {"append": {
                        "header": {"key": CLIENT_ADDRESS_HEADER, "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }}),
                ]},
            ),
        }),
        why("Before the protocol filters, so preflights are answered for JSON and gRPC-Web paths alike.", {
            "name": "envoy.filters.http.cors",
            "typed_config": _typed("envoy.extensions.filters.http.cors.v3.Cors"),
        }),
        {
            "name": "envoy.filters.http.grpc_web",
            "typed_config": _typed("envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"),
        },
    ]
    if options.rate_limit_rps:
        filters.append(why("Edge-wide load shedding (429), after CORS and gRPC-Web so browsers can read it.", {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": _typed(
                "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                stat_prefix="edge_rate_limit",
                token_bucket={
                    "max_tokens": options.rate_limit_rps * 2,
                    "tokens_per_fill": options.rate_limit_rps // 10 or 1,
                    "fill_interval": "0.1s",
                },
                filter_enabled={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                filter_enforced={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            ),
        }))
    filters.append(why("Before the transcoder, so that on the way out it hashes the JSON body, not gRPC frames.", {
        "name": "envoy.filters.http.lua",
        "typed_config": _typed(
            "envoy.extensions.filters.http.lua.v3.Lua",
            stat_prefix="etag",
            default_source_code={"filename": options.etag_lua_path},
        ),
    }))
    filters += [
        why("Before jwt_authn: it rewrites /v1/... to /pkg.Service/Method, which the JWT rules match.", {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": _typed(
                "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                proto_descriptor=options.descriptor_path,
                services=[s.full_name for s in services],
                print_options={
                    "preserve_proto_field_names": True,
                    "always_print_primitive_fields": True,
                },
                convert_grpc_status=why("Errors become a google.rpc.Status JSON body with the right HTTP code.", True),
                auto_mapping=why("Only the routes declared with google.api.http are public JSON API.", False),
                request_validation_options=why(
                    "Strict: a typo'd parameter is a 400, not ignored (unknown body fields it cannot refuse).",
                    {"reject_unknown_method": True, "reject_unknown_query_parameters": True},
                ),
                max_request_body_size=options.max_request_bytes,
                max_response_body_size=why("The services' own message limit.", 4 * MIB),
            ),
        }),
        _jwt_filter(services, options.jwks_path),
        *_client_quotas(options),
        why("Caps gRPC and gRPC-Web bodies (413); streaming routes turn it off per route.", {
            "name": "envoy.filters.http.buffer",
            "typed_config": _typed(
                "envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=options.max_request_bytes
            ),
        }),
        why("After the buffer, which holds the whole body: a body that ends inside a message frame would "
            "leave the replica waiting for the rest until the deadline; refuse it at once.", {
                "name": GRPC_FRAMING_FILTER,
                "typed_config": _typed(
                    "envoy.extensions.filters.http.lua.v3.Lua",
                    stat_prefix="grpc_framing",
                    default_source_code={"inline_string": _GRPC_FRAMING_LUA},
                ),
            }),
        {
            "name": "envoy.filters.http.router",
            "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
        },
    ]
    return filters


GRPC_FRAMING_FILTER = "fittracker.grpc_framing"
#: Walks the length-prefixed frames of a buffered gRPC request (gRPC-Web is gRPC by now) and answers
#: INVALID_ARGUMENT when the last frame is cut short. Transcoded JSON calls were framed by Envoy.
_GRPC_FRAMING_LUA = """
function envoy_on_request(handle)
  local headers = handle:headers()
  local content_type = headers:get("content-type") or ""
  if content_type:sub(1, 16) ~= "application/grpc" or headers:get("x-envoy-original-path") ~= nil then
    return
  end
  local body = handle:body()
  local size = body and body:length() or 0
  local offset = 0
  while offset + 5 <= size do
    local b1, b2, b3, b4 = string.byte(body:getBytes(offset + 1, 4), 1, 4)
    offset = offset + 5 + ((b1 * 256 + b2) * 256 + b3) * 256 + b4
  end
  if offset ~= size then
    handle:respond({[":status"] = "200", ["content-type"] = "application/grpc", ["grpc-status"] = "3",
                    ["grpc-message"] = "request body ends inside a gRPC message frame"}, "")
  end
end
"""


def _quota_rules(options: EdgeOptions) -> list[Yaml]:
    """The descriptors a request produces: its address, and its user when the token named one."""
    rules: list[Yaml] = []
    if options.ip_limit is not None:
        rules.append({"actions": [{"remote_address": {}}]})
    if options.user_limit is not None:
        rules.append(why(
            "No descriptor without the header (anonymous calls): jwt_authn sets it from a verified token only.",
            {"actions": [{"request_headers": {"header_name": USER_ID_HEADER, "descriptor_key": USER_DESCRIPTOR}}]},
        ))
    return rules


def _bucket(limit: Limit) -> dict[str, Yaml]:
    return {"max_tokens": limit.bucket, "tokens_per_fill": limit.requests,
            "fill_interval": f"{Limit.WINDOWS[limit.window]}s"}


def _retry_after(options: EdgeOptions) -> int:
    limits = [limit for limit in (options.ip_limit, options.user_limit) if limit is not None]
    return max(math.ceil(Limit.WINDOWS[limit.window] / limit.requests) for limit in limits)


def _client_quotas(options: EdgeOptions) -> list[Yaml]:
    """Per-address and per-user quotas: 429 with x-ratelimit-* headers, RESOURCE_EXHAUSTED for gRPC.

    After jwt_authn, which sets the user header; one filter for both quotas, so that a response
    carries one set of x-ratelimit-* headers (two filters would each add theirs).
    """
    rules = _quota_rules(options)
    if not rules:
        return []
    common: dict[str, Yaml] = {
        "rate_limits": rules,
        "rate_limited_as_resource_exhausted": why(
            "gRPC's code for a quota; the default UNAVAILABLE would make clients retry at once.", True),
        "enable_x_ratelimit_headers": why("x-ratelimit-limit/-remaining/-reset (RFC draft 03) on every reply.",
                                          "DRAFT_VERSION_03"),
    }
    if options.rate_limit_service:
        return [why("Quotas counted by the rate-limit service, shared by every edge; fails open.", {
            "name": "envoy.filters.http.ratelimit",
            "typed_config": _typed(
                "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                domain=RATE_LIMIT_DOMAIN,
                stat_prefix="client_quotas",
                timeout=why("A slow limiter must not slow every call: past this the call passes.", "0.05s"),
                failure_mode_deny=why("Redis or the service down must not take the API down.", False),
                rate_limit_service={"grpc_service": {"envoy_grpc": {"cluster_name": RATE_LIMIT_CLUSTER}},
                                    "transport_api_version": "V3"},
                **common,
            ),
        })]
    descriptors: list[Yaml] = []
    if options.ip_limit is not None:
        descriptors.append({"entries": [{"key": IP_DESCRIPTOR}], "token_bucket": _bucket(options.ip_limit)})
    if options.user_limit is not None:
        descriptors.append({"entries": [{"key": USER_DESCRIPTOR}], "token_bucket": _bucket(options.user_limit)})
    return [why("Quotas counted in this Envoy: a valueless entry is a wildcard, one bucket per distinct value.", {
        "name": "client_quotas",
        "typed_config": _typed(
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            stat_prefix="client_quotas",
            filter_enabled={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            filter_enforced={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            descriptors=descriptors,
            max_dynamic_descriptors=why(
                "Buckets kept per wildcard (LRU); an evicted client starts again with a full bucket.", 65536),
            response_headers_to_add=[why(
                "On a 429: seconds until the slowest bucket has a token again (x-ratelimit-reset is exact).",
                {"header": {"key": "retry-after", "value": str(_retry_after(options))},
                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            )],
            **common,
        ),
    })]


def rate_limit_service_config(options: EdgeOptions) -> str:
    """The envoyproxy/ratelimit config (YAML) for the same quotas, counted per fixed window."""
    lines = ["# The edge's client quotas, generated by tools/envoy_config.py for envoyproxy/ratelimit.",
             f"domain: {RATE_LIMIT_DOMAIN}", "descriptors:"]
    for key, limit in ((IP_DESCRIPTOR, options.ip_limit), (USER_DESCRIPTOR, options.user_limit)):
        if limit is not None:
            # A key without a value: one counter per distinct value (per address, per user).
            lines += [f"  - key: {key}", "    rate_limit:",
                      f"      unit: {limit.window}", f"      requests_per_unit: {limit.requests}"]
    return "\n".join(lines) + "\n"


def _retry_policy(*, streaming: bool = False, read_only: bool = False) -> dict[str, Yaml]:
    policy: dict[str, Yaml] = {
        "retry_on": why(
            "Reads have no side effects: also retried when the replica died mid-call (reset).",
            "unavailable,connect-failure,reset-before-request,reset",
        ) if read_only else why(
            "Only failures where the call cannot have run: safe even for non-idempotent methods.",
            "unavailable,connect-failure,reset-before-request",
        ),
        "num_retries": 2,
        "retry_host_predicate": why("Retry on another replica than the one that failed.", [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
        }]),
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }
    if not streaming:
        # A per-try timeout would also cut a healthy stream, so only unary calls get one. A read
        # cut by it is retried on another replica ("reset" covers the timeout): a hung (SIGSTOPped,
        # deadlocked) replica then costs a read one second, not the caller's whole deadline.
        policy["per_try_timeout"] = why("Ten times the p99 target; then another replica.", "1s") if read_only else "10s"
    return policy


def _stream_duration(streaming: bool) -> dict[str, Yaml]:
    if streaming:
        # No default cap: a subscription lives as long as the client wants, or its grpc-timeout.
        return {"grpc_timeout_header_max": "3600s"}
    return {
        "max_stream_duration": "15s",
        "grpc_timeout_header_max": why("The services' longest deadline; a client's grpc-timeout wins below it.", "30s"),
    }


def _unary_route(cluster: str, *, read_only: bool = False) -> dict[str, Yaml]:
    return {
        "cluster": cluster,
        "timeout": why("Off: max_stream_duration below is the one deadline, so grpc-timeout is honoured.", "0s"),
        "max_stream_duration": _stream_duration(streaming=False),
        "retry_policy": _retry_policy(read_only=read_only),
    }


_GRPC_CONTENT: Yaml = {"name": "content-type", "string_match": {"prefix": "application/grpc"}}
#: Set by the transcoder on the calls it rewrote from JSON: tells a JSON GET from a gRPC(-Web) call.
_TRANSCODED: Yaml = {"name": "x-envoy-original-path", "present_match": True}


def _service_routes(service: GrpcService, cluster: str) -> list[Yaml]:
    """Routes of one gRPC service, most specific first; each version has its own path prefix."""
    routes: list[Yaml] = []
    for method in service.methods:
        if not (method.client_streaming or method.server_streaming):
            continue
        route: dict[str, Yaml] = {
            "cluster": cluster,
            "timeout": "0s",
            "max_stream_duration": _stream_duration(streaming=True),
            "priority": why("The cluster's HIGH circuit-breaker budget: STREAMS_PER_REPLICA open streams.", "HIGH"),
        }
        per_filter: dict[str, Yaml] = {}
        if method.client_streaming:
            # The request is a stream: buffering it whole would break it, and so would a retry.
            per_filter["envoy.filters.http.buffer"] = _typed(
                "envoy.extensions.filters.http.buffer.v3.BufferPerRoute", disabled=True
            )
            per_filter[GRPC_FRAMING_FILTER] = _typed("envoy.extensions.filters.http.lua.v3.LuaPerRoute", disabled=True)
        else:
            route["retry_policy"] = _retry_policy(streaming=True)
        entry: dict[str, Yaml] = {
            "name": f"{service.full_name}.{method.name}",
            "match": {"path": f"{service.prefix}{method.name}", "headers": [_GRPC_CONTENT]},
            "route": route,
        }
        if per_filter:
            entry["typed_per_filter_config"] = per_filter
        routes.append(why("Streaming: no overall timeout, only the client's grpc-timeout.", entry))
    unary_reads = [m.name for m in service.methods
                   if m.read_only and not (m.client_streaming or m.server_streaming)]
    for name in unary_reads:
        policy = CACHE_POLICIES.get(f"{service.prefix}{name}")
        if policy is not None:
            routes.append(why("Cacheable JSON read: the marker has the Lua filter add an ETag and answer 304.", {
                "name": f"{service.full_name}.{name}.json",
                "match": {"path": f"{service.prefix}{name}", "headers": [_GRPC_CONTENT, _TRANSCODED]},
                "route": _unary_route(cluster, read_only=True),
                "response_headers_to_add": [
                    {"header": {"key": "cache-control", "value": policy},
                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                    {"header": {"key": "vary", "value": CACHE_VARY},
                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                    {"header": {"key": ETAG_MARKER, "value": "sha256"}},
                ],
            }))
    per_user = [name for name in unary_reads if f"{service.prefix}{name}" not in CACHE_POLICIES]
    if per_user:
        routes.append(why("Per-user JSON reads: no shared or private cache may keep them.", {
            "name": f"{service.full_name}.reads.json",
            "match": {"safe_regex": {"regex": f"^{re.escape(service.prefix)}({'|'.join(per_user)})$"},
                      "headers": [_GRPC_CONTENT, _TRANSCODED]},
            "route": _unary_route(cluster, read_only=True),
            "response_headers_to_add": [
                {"header": {"key": "cache-control", "value": PER_USER_POLICY},
                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            ],
        }))
    if unary_reads:
        routes.append({
            "name": f"{service.full_name}.reads",
            "match": {"safe_regex": {"regex": f"^{re.escape(service.prefix)}({'|'.join(unary_reads)})$"},
                      "headers": [_GRPC_CONTENT]},
            "route": _unary_route(cluster, read_only=True),
        })
    routes.append({
        "name": service.full_name,
        "match": {"prefix": service.prefix, "headers": [_GRPC_CONTENT]},
        "route": _unary_route(cluster),
    })
    return routes


#: What the API answers to; OPTIONS is only ever a preflight, which the edge answers itself.
API_METHODS = "GET, POST, PUT, PATCH, DELETE"
_OPTIONS: Yaml = {"name": ":method", "string_match": {"exact": "OPTIONS"}}
#: Skipped on the OPTIONS routes: no API method is an OPTIONS, and the transcoder's 404 for one
#: would come before the token check that every non-preflight call gets.
_NO_TRANSCODER: dict[str, Yaml] = {"envoy.filters.http.grpc_json_transcoder": _typed(
    "envoy.config.route.v3.FilterConfig", disabled=True)}


def _options_routes(cors_origins: Sequence[str]) -> list[Yaml]:
    """OPTIONS never reaches a service, whatever its path, origin, content type or token.

    First in the table, ahead of the gRPC-Web routes that an OPTIONS with a gRPC-Web content type
    would otherwise match. A preflight from an allowed origin is answered by the CORS filter, which
    acts on forwarding routes only: its route forwards to PREFLIGHT_CLUSTER, which has no endpoint,
    and matches exactly what the filter answers (OPTIONS, a listed Origin, a non-empty
    Access-Control-Request-Method). A preflight from any other origin gets an empty 204 without
    CORS headers, which the browser reads as a refusal. Any other OPTIONS is an ordinary call
    (jwt_authn wants a token) that no method accepts: 405.
    """
    asked_method: Yaml = {"name": "access-control-request-method", "string_match": {"safe_regex": {"regex": ".+"}}}
    allowed: list[Yaml] = [
        {
            "name": f"cors-preflight {origin}",
            "match": {"prefix": "/", "headers": [
                _OPTIONS, {"name": "origin", "string_match": {"exact": origin}}, asked_method,
            ]},
            "route": {"cluster": PREFLIGHT_CLUSTER},
        }
        for origin in cors_origins
    ]
    return [
        *allowed,
        why("Preflights from origins not listed: no CORS headers, so the browser refuses the call.", {
            "name": "cors-preflight",
            "match": {"prefix": "/", "headers": [
                _OPTIONS,
                {"name": "origin", "present_match": True},
                {"name": "access-control-request-method", "present_match": True},
            ]},
            "direct_response": {"status": 204},
            "typed_per_filter_config": _NO_TRANSCODER,
        }),
        why("gRPC(-Web) gets UNIMPLEMENTED: without a body, grpc_web keeps it instead of deriving UNKNOWN from 405.", {
            "name": "options-grpc",
            "match": {"prefix": "/", "headers": [_OPTIONS, _GRPC_CONTENT]},
            "direct_response": {"status": 405},
            "response_headers_to_add": _headers(("allow", API_METHODS), ("grpc-status", "12"),
                                                ("grpc-message", "OPTIONS is not a gRPC method")),
            "typed_per_filter_config": _NO_TRANSCODER,
        }),
        {
            "name": "options",
            "match": {"prefix": "/", "headers": [_OPTIONS]},
            "direct_response": {"status": 405, "body": {"inline_string": "method not allowed"}},
            "response_headers_to_add": _headers(("allow", API_METHODS)),
            "typed_per_filter_config": _NO_TRANSCODER,
        },
    ]


def _headers(*pairs: tuple[str, str]) -> list[Yaml]:
    return [{"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in pairs]


def _routes(services: Sequence[GrpcService], topology: Topology, cors_origins: Sequence[str]) -> list[Yaml]:
    routes: list[Yaml] = _options_routes(cors_origins)
    for service in services:
        cluster = service.cluster(topology)
        if cluster is not None:
            routes += _service_routes(service, cluster)
    routes.append({"name": "not-found", "match": {"prefix": "/"},
                   "direct_response": {"status": 404, "body": {"inline_string": "no such route"}}})
    return routes


def _listener(services: Sequence[GrpcService], topology: Topology, options: EdgeOptions) -> dict[str, Yaml]:
    hcm = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="edge",
        codec_type=why("HTTP/1.1 for JSON and gRPC-Web from browsers, HTTP/2 (h2c) for native gRPC.", "AUTO"),
        generate_request_id=True,
        always_set_request_id_in_response=why("Clients quote it in bug reports; it keys the access log.", True),
        use_remote_address=why("The edge faces clients: trust no incoming X-Forwarded-For.", True),
        **({"xff_num_trusted_hops": why("Proxies in front append the client to X-Forwarded-For: trust that many.",
                                        options.xff_num_trusted_hops)} if options.xff_num_trusted_hops else {}),
        normalize_path=why("The JWT rules match on paths, so /a/../b must not sneak past them.", True),
        merge_slashes=True,
        path_with_escaped_slashes_action=why("No resource name holds an encoded slash.", "REJECT_REQUEST"),
        request_headers_timeout=why("Slow-loris guard.", "10s"),
        stream_idle_timeout=why("Streams silent this long are closed; subscriptions send keep-alives.", "300s"),
        common_http_protocol_options={"idle_timeout": "3600s", "headers_with_underscores_action": "REJECT_REQUEST"},
        http2_protocol_options={
            "max_concurrent_streams": 100,
            # Envoy's edge guidance: bounded windows keep one client from hogging memory.
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        **({"tracing": why("Only with a collector: Envoy's tracer cannot run without an exporter.",
                           _tracing(options))} if options.otlp_endpoint else {}),
        access_log=_access_log(),
        local_reply_config=_local_reply(),
        route_config={
            "name": "fittracker",
            "virtual_hosts": [{
                "name": "fittracker",
                "domains": ["*"],
                "typed_per_filter_config": {"envoy.filters.http.cors": _cors_policy(options.cors_origins)},
                "routes": _routes(services, topology, options.cors_origins),
            }],
        },
        http_filters=_http_filters(services, sorted(topology), options),
    )
    return {
        "name": "edge",
        "address": {"socket_address": {"address": options.listen_address, "port_value": options.listen_port}},
        "per_connection_buffer_limit_bytes": why("Envoy's edge guidance; filters that must buffer raise it.", 32768),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def _tracing(options: EdgeOptions) -> dict[str, Yaml]:
    """Spans to the collector, and W3C traceparent to the services so all logs share a trace id."""
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                service_name="fittracker-edge",
                grpc_service={"envoy_grpc": {"cluster_name": "otel-collector"}, "timeout": "1s"},
            ),
        },
    }


def _endpoints(name: str, replicas: Sequence[Address]) -> dict[str, Yaml]:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": a.host, "port_value": a.port}}}}
            for a in replicas
        ]}],
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _http2_options() -> dict[str, Yaml]:
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        explicit_http_config={"http2_protocol_options": {
            "connection_keepalive": why(
                "Finds dead connections; the services allow pings every 10 s.", {"interval": "30s", "timeout": "5s"}
            ),
        }},
    )}


def _cluster(domain: str, replicas: Sequence[Address]) -> dict[str, Yaml]:
    count = max(len(replicas), 1)
    return {
        "name": domain,
        "type": "STATIC" if all(_is_ip(a.host) for a in replicas) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": why(
            "Not LEAST_REQUEST: a crashed replica fails fast, looks idle, and would draw most calls (and "
            "their retries) until ejected; round robin plus previous_hosts retries always finds a live one.",
            "ROUND_ROBIN"),
        "typed_extension_protocol_options": _http2_options(),
        "load_assignment": _endpoints(domain, replicas),
        "health_checks": [{
            "timeout": "1s",
            "interval": "1s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "no_traffic_interval": why("Idle clusters too: a drain is noticed as fast as under traffic.", "1s"),
            "grpc_health_check": why("'' is the server's overall status: NOT_SERVING while it drains.",
                                     {"service_name": ""}),
        }],
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "interval": "5s",
            "base_ejection_time": "15s",
            "max_ejection_percent": why("Never eject the last healthy half: overload is not a fault.", 50),
        },
        "circuit_breakers": {"thresholds": [why(
            "Per replica, by Little's law: ~2500 calls/s x 100 ms target = 256 in flight; more only queues.",
            {
                "priority": "DEFAULT",
                "max_connections": 64 * count,
                "max_pending_requests": 128 * count,
                "max_requests": 256 * count,
                "retry_budget": why(
                    "Retries may add at most 20 % load, so they cannot snowball; at low traffic up to 10 at "
                    "once (a hung replica holds every call that reached it, and each needs its retry).",
                    {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 10}),
                "track_remaining": True,
            },
        ), why(
            "Streaming routes (priority HIGH): each open stream holds a slot for its whole life.",
            {
                "priority": "HIGH",
                "max_connections": 64 * count,
                "max_pending_requests": 128 * count,
                "max_requests": STREAMS_PER_REPLICA * count,
                "track_remaining": True,
            },
        )]},
    }


def _preflight_cluster() -> dict[str, Yaml]:
    return {
        "name": PREFLIGHT_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": PREFLIGHT_CLUSTER, "endpoints": []},
    }


def _otel_cluster(endpoint: Address) -> dict[str, Yaml]:
    return {
        "name": "otel-collector",
        "type": "STATIC" if _is_ip(endpoint.host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2_options(),
        "load_assignment": _endpoints("otel-collector", [endpoint]),
    }


def _rate_limit_cluster(endpoint: Address) -> dict[str, Yaml]:
    return {
        "name": RATE_LIMIT_CLUSTER,
        "type": "STATIC" if _is_ip(endpoint.host) else "STRICT_DNS",
        "connect_timeout": "0.25s",
        "typed_extension_protocol_options": _http2_options(),
        "load_assignment": _endpoints(RATE_LIMIT_CLUSTER, [endpoint]),
    }


def build_config(services: Sequence[GrpcService], topology: Topology, options: EdgeOptions) -> dict[str, Yaml]:
    """The bootstrap for ``services`` whose cluster is in ``topology``; the others are left out.

    Topology keys are clusters: a domain (``user``), or a domain and major version (``user-v2``)
    for a version deployed on its own; see ``GrpcService.cluster``.
    """
    served = [s for s in services if s.cluster(topology) is not None]
    if not served:
        raise ValueError("the topology names no domain of the descriptor set")
    used = {s.cluster(topology) for s in served}
    unknown = sorted(set(topology) - used)
    if unknown:
        raise ValueError(f"the topology names clusters no service of the descriptor set maps to: {unknown}")
    clusters: list[Yaml] = [_cluster(name, topology[name]) for name in sorted(topology)]
    if options.cors_origins:
        clusters.append(why("Never reached: see PREFLIGHT_CLUSTER.", _preflight_cluster()))
    if options.otlp_endpoint:
        clusters.append(_otel_cluster(Address.parse(options.otlp_endpoint)))
    if options.rate_limit_service:
        clusters.append(_rate_limit_cluster(Address.parse(options.rate_limit_service)))
    return {
        "node": {"id": "fittracker-edge", "cluster": "fittracker-edge"},
        "admin": why("Stats, /ready and /clusters; loopback only, it can also stop Envoy.", {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": options.admin_port}},
        }),
        "static_resources": {
            "listeners": [why("One port for JSON, gRPC-Web and native gRPC.", _listener(served, topology, options))],
            "clusters": clusters,
        },
        "layered_runtime": why(
            "oghttp2 for HTTP/2: with nghttp2, grpc-go clients that cancel streams (ghz after a "
            "stream's first message) hit 'codec_error:The_user_callback_function_failed' now and "
            "then, and the connection's other calls end UNAVAILABLE; oghttp2 gave 0 in 14,986.",
            {"layers": [{"name": "static", "static_layer": {"envoy.reloadable_features.http2_use_oghttp2": True}}]},
        ),
        "overload_manager": why("Caps open client connections, as Envoy's edge guidance asks.", {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": _typed(
                    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    max_active_downstream_connections=50000,
                ),
            }],
        }),
    }


HEADER = """\
Envoy edge of FitTracker. GENERATED by tools/envoy_config.py from envoy/generated/fittracker.binpb
and the default local topology; do not edit: run `python tools/envoy_config.py` instead.
Paths are relative: start Envoy from the repository root (`make up` renders its own copy)."""


def render(services: Sequence[GrpcService], topology: Topology, options: EdgeOptions) -> str:
    """The bootstrap YAML text."""
    return to_yaml(build_config(services, topology, options), HEADER)


# --------------------------------------------------------------------------------------------
# Command line.


def _parse_upstream(text: str) -> tuple[str, tuple[Address, ...]]:
    domain, sep, addresses = text.partition("=")
    if not sep or not addresses:
        raise argparse.ArgumentTypeError(f"expected domain=host:port[,host:port...], got {text!r}")
    try:
        return domain.strip(), tuple(Address.parse(a) for a in addresses.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_DEFAULT_IP = str(EdgeOptions.ip_limit)
_DEFAULT_USER = str(EdgeOptions.user_limit)


def _parse_limit(text: str) -> Limit | None:
    try:
        return Limit.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parse_hops(text: str) -> int:
    if not text.isdigit() or int(text) > 10:
        raise argparse.ArgumentTypeError(f"expected a number of proxies from 0 to 10, got {text!r}")
    return int(text)


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The command line; defaults come from ``env`` (FITTRACKER_* variables)."""

    def number(name: str, default: int) -> int:
        return int(env.get(name) or default)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the committed envoy.yaml is stale")
    parser.add_argument("--output", type=Path, default=ROOT / OUTPUT, help="where to write (- for stdout)")
    parser.add_argument("--descriptor", type=Path, default=ROOT / DESCRIPTOR, help="descriptor set to read")
    parser.add_argument("--descriptor-path", help="descriptor path written into the config (default: as read)")
    parser.add_argument("--listen-address", default=env.get("FITTRACKER_EDGE_ADDRESS", "127.0.0.1"))
    parser.add_argument("--listen-port", type=int, default=number("FITTRACKER_EDGE_PORT", 8080))
    parser.add_argument("--admin-port", type=int, default=number("FITTRACKER_EDGE_ADMIN_PORT", 9901))
    parser.add_argument("--data-dir", default=env.get("FITTRACKER_DATA_DIR", ".data"))
    parser.add_argument("--keys-dir", default=env.get("FITTRACKER_JWT_KEYS_DIR", ""),
                        help="JWKS directory (default <data-dir>/keys)")
    parser.add_argument("--replicas", type=int, default=number("FITTRACKER_REPLICAS", DEFAULT_REPLICAS),
                        help="replicas per domain for the default topology")
    parser.add_argument("--upstream", type=_parse_upstream, action="append", default=[], metavar="DOMAIN=H:P,...",
                        help="replicas of one domain (repeatable); when given, only these domains are served")
    parser.add_argument("--cors-origin", type=origins_argument, action="append", default=[],
                        metavar="ORIGIN[,ORIGIN...]|none",
                        help=f"allowed browser origin (repeatable; default ${CORS_ORIGINS_ENV}, "
                             f"else {','.join(DEFAULT_CORS_ORIGINS)})")
    parser.set_defaults(cors_origins_env=env.get(CORS_ORIGINS_ENV, ""))
    try:
        configured_origins([], parser.get_default("cors_origins_env"))
    except ValueError as error:
        parser.error(f"{CORS_ORIGINS_ENV}: {error}")
    parser.add_argument("--max-request-bytes", type=int, default=1 * MIB)
    parser.add_argument("--rate-limit-rps", type=int, default=number("FITTRACKER_EDGE_RATE_LIMIT_RPS", 5000),
                        help="requests per second the whole edge admits (load shedding); 0 is off")
    parser.add_argument("--ip-limit", type=_parse_limit, default=env.get("FITTRACKER_EDGE_IP_LIMIT", _DEFAULT_IP),
                        help=f"quota per client address, REQUESTS/s|m[,BURST] or off (default {_DEFAULT_IP})")
    parser.add_argument("--user-limit", type=_parse_limit,
                        default=env.get("FITTRACKER_EDGE_USER_LIMIT", _DEFAULT_USER),
                        help=f"quota per signed-in user, same form (default {_DEFAULT_USER})")
    parser.add_argument("--rate-limit-service", default=env.get("FITTRACKER_EDGE_RATE_LIMIT_SERVICE", ""),
                        metavar="HOST:PORT", help="count the quotas in this envoyproxy/ratelimit service")
    parser.add_argument("--rate-limit-service-config", type=Path, metavar="FILE",
                        help="also write that service's config for the quotas here")
    parser.add_argument("--otlp-endpoint", default=env.get("FITTRACKER_OTLP_ENDPOINT", ""))
    parser.add_argument("--xff-num-trusted-hops", type=_parse_hops,
                        default=number("FITTRACKER_EDGE_XFF_NUM_TRUSTED_HOPS", 0), metavar="N",
                        help="proxies in front of the edge (1 behind the Istio ingress gateway; default 0)")
    return parser


def options_from(args: argparse.Namespace) -> tuple[Topology, EdgeOptions, list[GrpcService]]:
    """Turn parsed arguments into the generator's inputs."""
    services = read_services(args.descriptor)
    topology: Topology = dict(args.upstream) or default_topology({s.domain for s in services}, args.replicas)
    keys_dir = args.keys_dir or os.path.join(args.data_dir, "keys")
    in_repo = args.descriptor.resolve() == (ROOT / DESCRIPTOR).resolve()
    descriptor_path = args.descriptor_path or (str(DESCRIPTOR) if in_repo else str(args.descriptor))
    options = EdgeOptions(
        listen_address=args.listen_address,
        listen_port=args.listen_port,
        admin_port=args.admin_port,
        descriptor_path=descriptor_path,
        # Relative like the descriptor's path (Envoy run from the repository root), else absolute.
        etag_lua_path=str(ETAG_LUA) if descriptor_path == str(DESCRIPTOR) else str(ROOT / ETAG_LUA),
        jwks_path=os.path.join(keys_dir, "jwks.json"),
        cors_origins=configured_origins(args.cors_origin, args.cors_origins_env),
        max_request_bytes=args.max_request_bytes,
        rate_limit_rps=args.rate_limit_rps,
        ip_limit=args.ip_limit,
        user_limit=args.user_limit,
        rate_limit_service=args.rate_limit_service,
        otlp_endpoint=args.otlp_endpoint,
        xff_num_trusted_hops=args.xff_num_trusted_hops,
    )
    return topology, options, services


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point: ``python tools/envoy_config.py [--check] [options]``; ``env`` defaults to the process's."""
    args = _parser(os.environ if env is None else env).parse_args(argv)
    if args.check:
        # The committed file is the default rendering, whatever the environment or other flags say.
        topology, options, services = options_from(_parser({}).parse_args([]))
        text = render(services, topology, options)
        committed = ROOT / OUTPUT
        if not committed.exists() or committed.read_text() != text:
            print(f"{OUTPUT} is stale; run `python tools/envoy_config.py` and commit it", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    topology, options, services = options_from(args)
    text = render(services, topology, options)
    if args.rate_limit_service_config is not None:
        args.rate_limit_service_config.parent.mkdir(parents=True, exist_ok=True)
        args.rate_limit_service_config.write_text(rate_limit_service_config(options))
    if str(args.output) == "-":
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
