"""Property-based fuzzing of every request type of every service: no input gets a 5xx or a hang.

For each RPC, found by walking the generated descriptors (a new RPC is fuzzed without touching
this file), Hypothesis builds requests from the descriptor (fuzz_strategies) and sends each one

* as JSON through the real edge, on the RPC's google.api.http route, and
* as native gRPC straight to one of the service's replicas,

signed in as a registered user so that calls get past authentication. Every call has a deadline.
The property: never INTERNAL, UNKNOWN or DATA_LOSS, never HTTP 500/502/503/504, never a timeout
(server streams excepted: they stay open by design), and every replica still SERVING afterwards.

``FITTRACKER_FUZZ_EXAMPLES`` sets the examples per RPC and protocol: a few in ``make test``, many
in ``make fuzz``. Each RPC's tally is printed as it finishes.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from tests.edge.conftest import Edge
from tests.edge.fuzz_strategies import messages
from tools.devstack import Stack

pytestmark = pytest.mark.edge

GENERATED = Path(__file__).resolve().parents[2] / "clients" / "python" / "generated"
EXAMPLES = int(os.environ.get("FITTRACKER_FUZZ_EXAMPLES", "4"))
DEADLINE = 10.0
#: A server stream answering for this long has not hung: it is open, as a subscription should be.
STREAM_LOOK = 1.0
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
HTTP_SERVER_FAULTS = {500, 502, 503, 504}
#: Calls that end the caller's session or account: the fuzzer signs in afresh after each.
ENDS_SESSION = {"Logout", "DeleteUser", "RefreshToken", "UpdateUser"}


@dataclass(frozen=True)
class Rpc:
    """One RPC of one service."""

    service: str  # the domain, "workout"
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def input_type(self) -> Descriptor:
        return self.method.input_type

    @property
    def http(self) -> http_pb2.HttpRule | None:
        options: Any = self.method.GetOptions()  # MethodOptions; the stubs type extensions narrowly
        if not options.HasExtension(annotations_pb2.http):
            return None
        rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
        return rule

    def __str__(self) -> str:
        return f"{self.method.containing_service.name}.{self.method.name}"


def every_rpc() -> list[Rpc]:
    """Every RPC of every generated fittracker service."""
    found: list[Rpc] = []
    for path in sorted(GENERATED.glob("fittracker/*/v1/*_service_pb2.py")):
        module = importlib.import_module(".".join(path.relative_to(GENERATED).with_suffix("").parts))
        for service in module.DESCRIPTOR.services_by_name.values():
            found += [Rpc(path.parts[-3], method) for method in service.methods]
    return found


RPCS = every_rpc()


@dataclass
class Tally:
    """What the fuzzer sent and what came back, per protocol."""

    sent: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, protocol: str, outcome: str) -> None:
        with self.lock:
            self.sent[protocol] += 1
            self.outcomes[f"{protocol} {outcome}"] += 1


@dataclass
class Caller:
    """The signed-in user the fuzzer calls as; signs in again when a call ended the session."""

    edge: Edge
    token: str = ""

    def renew(self) -> None:
        self.token = self.edge.register().access_token


def say(config: pytest.Config, line: str) -> None:
    """Print ``line`` on the terminal now, past pytest's output capture (progress of long runs)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(line)


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    counts = Tally()
    yield counts
    say(request.config, f"fuzz: {sum(counts.sent.values())} requests {dict(counts.sent)}, "
                        f"{EXAMPLES} examples per RPC and protocol")
    for outcome, number in sorted(counts.outcomes.items()):
        say(request.config, f"fuzz:   {outcome}: {number}")


@pytest.fixture(scope="module")
def caller(edge: Edge) -> Caller:
    signed_in = Caller(edge)
    signed_in.renew()
    return signed_in


@pytest.fixture(scope="module")
def replica_channels(stack: Stack) -> Iterator[dict[str, grpc.Channel]]:
    """A channel to the first replica of each service."""
    channels = {}
    for service in stack.services:
        address = stack.replica(service, 0).address
        channels[service] = grpc.insecure_channel(
            f"{address.host}:{address.port}", options=[("grpc.max_send_message_length", 64 << 20)])
    yield channels
    for channel in channels.values():
        channel.close()


def settings_for_fuzz() -> settings:
    return settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=False, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
    )


# --- native gRPC to a replica --------------------------------------------------------------


def grpc_call(channel: grpc.Channel, rpc: Rpc, request: Message, token: str) -> grpc.StatusCode:
    """Send ``request`` and return the status it ended with (OK for a stream still open)."""
    metadata = (("authorization", f"Bearer {token}"),)
    payload = request.SerializeToString()
    method = rpc.method
    # Untyped multicallables: the requests are raw bytes, already serialized.
    open_channel: Any = channel
    try:
        if method.server_streaming and method.client_streaming:
            for _ in open_channel.stream_stream(rpc.path)(iter([payload]), metadata=metadata, timeout=STREAM_LOOK):
                pass
        elif method.server_streaming:
            for _ in open_channel.unary_stream(rpc.path)(payload, metadata=metadata, timeout=STREAM_LOOK):
                pass
        elif method.client_streaming:
            open_channel.stream_unary(rpc.path)(iter([payload]), metadata=metadata, timeout=DEADLINE)
        else:
            open_channel.unary_unary(rpc.path)(payload, metadata=metadata, timeout=DEADLINE)
    except grpc.RpcError as error:
        failed: Any = error  # a grpc.Call too
        code: grpc.StatusCode = failed.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
            return grpc.StatusCode.OK  # still streaming when we stopped looking
        assert code not in SERVER_FAULTS, f"{rpc} answered {code.name}: {failed.details()}\n{request}"
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc} hung past {DEADLINE}s\n{request}"
        return code
    return grpc.StatusCode.OK


# --- JSON through the edge -----------------------------------------------------------------


def json_request(rpc: Rpc, request: Message) -> tuple[str, str, bytes | None] | None:
    """(verb, path with query, body) of ``request`` on the RPC's HTTP route; None if JSON cannot carry it."""
    rule = rpc.http
    assert rule is not None
    verb = rule.WhichOneof("pattern")
    assert verb is not None and verb != "custom"
    template = getattr(rule, verb)
    try:
        values = json_format.MessageToDict(request, preserving_proto_field_name=True)
    except (json_format.Error, ValueError, TypeError):
        return None  # times outside RFC 3339's range have no JSON form; gRPC sends them
    path = template
    for variable in _variables(template):
        value = _pop(values, variable)
        if not isinstance(value, str) or not value:
            value = "x"  # the route needs a segment; the transcoder and validation judge it
        path = path.replace(_template_variable(template, variable), quote(value, safe="/"))
    body: Any = None
    if rule.body == "*":
        body, values = values, {}
    elif rule.body:
        body = values.pop(rule.body, {})
    query = "&".join(f"{quote(k)}={quote(v)}" for k, v in _flatten(values))
    encoded = None if body is None else json.dumps(body).encode()
    return verb.upper(), path + ("?" + query if query else ""), encoded


def _variables(template: str) -> list[str]:
    names, depth, start = [], 0, 0
    for index, char in enumerate(template):
        if char == "{":
            depth, start = depth + 1, index + 1
        elif char == "}":
            depth -= 1
            names.append(template[start:index].split("=", maxsplit=1)[0])
    return names


def _template_variable(template: str, name: str) -> str:
    start = template.index("{" + name)
    return template[start:template.index("}", start) + 1]


def _pop(values: dict[str, Any], dotted: str) -> Any:
    *parents, last = dotted.split(".")
    for part in parents:
        values = values.get(part) or {}
        if not isinstance(values, dict):
            return None
    return values.pop(last, None)


def _flatten(values: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(values, dict):
        for key, value in values.items():
            yield from _flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    elif isinstance(values, list):
        for item in values:
            if not isinstance(item, dict | list):  # the transcoder binds repeated scalars only
                yield from _flatten(item, prefix)
    elif isinstance(values, bool):
        yield prefix, "true" if values else "false"
    else:
        yield prefix, str(values)


def json_call(edge: Edge, rpc: Rpc, request: Message, token: str) -> int | None:
    """Send ``request`` as JSON through the edge; its HTTP status, or None when JSON cannot carry it."""
    shaped = json_request(rpc, request)
    if shaped is None:
        return None
    verb, path, body = shaped
    headers = {"authorization": f"Bearer {token}"}
    if body is not None:
        headers["content-type"] = "application/json"
    connection = HTTPConnection(edge.stack.host, edge.edge_port, timeout=DEADLINE)
    try:
        connection.request(verb, path, body=body, headers=headers)
        response = connection.getresponse()  # the status line and headers: a stream may stay open
        answer = b"" if rpc.method.server_streaming and response.status == 200 else response.read()
    except TimeoutError:
        pytest.fail(f"{rpc} over JSON hung past {DEADLINE}s: {verb} {path[:300]}")
    finally:
        connection.close()
    assert response.status not in HTTP_SERVER_FAULTS, (
        f"{rpc} over JSON answered {response.status}: {answer[:300]!r}\n{verb} {path[:500]}\n{(body or b'')[:500]!r}")
    return response.status


# --- the properties ------------------------------------------------------------------------


def fuzz_ids(rpc: Rpc) -> str:
    return str(rpc)


@pytest.mark.parametrize("rpc", RPCS, ids=fuzz_ids)
def test_no_grpc_request_gets_a_server_fault(
    rpc: Rpc, replica_channels: dict[str, grpc.Channel], caller: Caller, tally: Tally, pytestconfig: pytest.Config
) -> None:
    channel = replica_channels[rpc.service]

    @settings_for_fuzz()
    @given(request=messages(rpc.input_type))
    def property_holds(request: Message) -> None:
        code = grpc_call(channel, rpc, request, caller.token)
        tally.count("grpc", code.name)
        if rpc.method.name in ENDS_SESSION and code == grpc.StatusCode.OK:
            caller.renew()

    property_holds()
    if EXAMPLES > 20:
        say(pytestconfig, f"fuzz: {rpc} over gRPC: {tally.sent['grpc']} gRPC requests so far")


@pytest.mark.parametrize("rpc", [r for r in RPCS if r.http is not None], ids=fuzz_ids)
def test_no_json_request_gets_a_5xx(
    rpc: Rpc, edge: Edge, caller: Caller, tally: Tally, pytestconfig: pytest.Config
) -> None:
    @settings_for_fuzz()
    @given(request=messages(rpc.input_type))
    def property_holds(request: Message) -> None:
        status = json_call(edge, rpc, request, caller.token)
        tally.count("json", "not expressible in JSON" if status is None else str(status))
        if rpc.method.name in ENDS_SESSION and status == 200:
            caller.renew()

    property_holds()
    if EXAMPLES > 20:
        say(pytestconfig, f"fuzz: {rpc} over JSON: {tally.sent['json']} JSON requests so far")


def test_the_fuzzer_covers_every_rpc_and_the_stack_is_healthy_after(
    stack: Stack, edge: Edge, tally: Tally
) -> None:
    # Runs after the fuzz tests in this module (pytest keeps file order).
    assert len(RPCS) >= 40, [str(r) for r in RPCS]
    assert tally.sent["grpc"] >= len(RPCS), tally.sent
    for replica in stack.replicas:
        with grpc.insecure_channel(f"{replica.address.host}:{replica.address.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, replica
    keys = edge.json("GET", "/v1/auth/jwks")
    assert keys.status == 200, keys.body

