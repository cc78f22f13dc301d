"""API versions side by side: a v2 of a service next to its v1, each routed by its own path prefix.

The v2 here is synthetic: a FileDescriptorProto built in the test (package fittracker.user.v2, one
GetUser mapped to GET /v2/{name=users/*}) added to the committed descriptor set. The generator must
route it by gRPC path prefix, transcode it, and send it to the v1 processes by default or to a
cluster of its own when the topology lists ``user-v2``; then a real Envoy proves it, in front of
two recording gRPC servers that stand for the two deployments.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.runtime.auth import JWKS_FILE, load_or_create_signing_key
from tests.edge.conftest import Edge, LogLines, sign_token
from tools import envoy_config
from tools.devstack import EnvoyEdge
from tools.envoy_config import Address, EdgeOptions

pytestmark = pytest.mark.edge

V1_PREFIX = "/fittracker.user.v1.UserService/"
V2_PREFIX = "/fittracker.user.v2.UserService/"


def user_v2_file() -> descriptor_pb2.FileDescriptorProto:
    """fittracker/user/v2/user_service.proto: a UserService with GetUser, as a v2 would add it."""
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    proto = descriptor_pb2.FileDescriptorProto(
        name="fittracker/user/v2/user_service.proto", package="fittracker.user.v2", syntax="proto3",
        dependency=["google/api/annotations.proto"])
    user = proto.message_type.add(name="User")
    user.field.add(name="name", number=1, type=string, label=optional, json_name="name")
    user.field.add(name="display_name", number=2, type=string, label=optional, json_name="displayName")
    request = proto.message_type.add(name="GetUserRequest")
    request.field.add(name="name", number=1, type=string, label=optional, json_name="name")
    method = proto.service.add(name="UserService").method.add(
        name="GetUser", input_type=".fittracker.user.v2.GetUserRequest", output_type=".fittracker.user.v2.User")
    # googleapis-common-protos' stub types the extension as a plain FieldDescriptor.
    rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]  # type: ignore[index]
    rule.get = "/v2/{name=users/*}"
    return proto


@pytest.fixture(scope="module")
def descriptor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed descriptor set plus the synthetic v2 file."""
    files = descriptor_pb2.FileDescriptorSet.FromString(
        (envoy_config.ROOT / envoy_config.DESCRIPTOR).read_bytes())
    files.file.append(user_v2_file())
    path = tmp_path_factory.mktemp("v2") / "with-v2.binpb"
    path.write_bytes(files.SerializeToString())
    return path


def _config(descriptor: Path, topology: envoy_config.Topology) -> Any:
    services = envoy_config.read_services(descriptor)
    return envoy_config.plain(envoy_config.build_config(services, topology, EdgeOptions()))


def _routes_by_prefix(config: Any) -> dict[str, str]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {r["match"]["prefix"]: r["route"]["cluster"]
            for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if "prefix" in r["match"] and "route" in r}


def _service_clusters(config: Any) -> list[str]:
    """The clusters that hold replicas (not the empty one allowed CORS preflights are routed to)."""
    return [c["name"] for c in config["static_resources"]["clusters"] if c["name"] != envoy_config.PREFLIGHT_CLUSTER]


def test_a_v2_runs_in_the_v1_processes_by_default(descriptor: Path) -> None:
    config = _config(descriptor, {"user": (Address("127.0.0.1", 1),)})

    routes = _routes_by_prefix(config)
    assert routes[V1_PREFIX] == routes[V2_PREFIX] == "user"
    assert _service_clusters(config) == ["user"]


def test_a_v2_deployed_on_its_own_gets_its_own_cluster(descriptor: Path) -> None:
    config = _config(descriptor, {"user": (Address("127.0.0.1", 1),), "user-v2": (Address("127.0.0.1", 2),)})

    routes = _routes_by_prefix(config)
    assert (routes[V1_PREFIX], routes[V2_PREFIX]) == ("user", "user-v2")
    assert set(_service_clusters(config)) == {"user", "user-v2"}
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    transcoder = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.grpc_json_transcoder")
    assert {"fittracker.user.v1.UserService", "fittracker.user.v2.UserService"} <= set(
        transcoder["typed_config"]["services"])
    health_filter = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.health_check")
    assert set(health_filter["typed_config"]["cluster_min_healthy_percentages"]) == {"user", "user-v2"}


def test_a_topology_cluster_no_service_maps_to_is_refused(descriptor: Path) -> None:
    services = envoy_config.read_services(descriptor)

    with pytest.raises(ValueError, match="user-v3"):
        envoy_config.build_config(services, {"user": (Address("127.0.0.1", 1),),
                                             "user-v3": (Address("127.0.0.1", 2),)}, EdgeOptions())


class Recorder(grpc.GenericRpcHandler):
    """A gRPC server's every call: records the method and answers an empty message."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        self.calls.append(handler_call_details.method)
        # Raw bytes in and out: an empty message parses as any response type.
        return grpc.unary_unary_rpc_method_handler(lambda _request, _context: b"")


def _serve(recorder: Recorder) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[recorder])
    checks = health.HealthServicer()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A signing key and its JWKS, as the user service writes them."""
    path = tmp_path_factory.mktemp("keys")
    load_or_create_signing_key(path, allow_create=True)
    return path


@pytest.fixture(scope="module")
def versions(descriptor: Path, keys_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Edge, Recorder, Recorder]]:
    """A real Envoy on the v1+v2 descriptor, in front of a v1 and a v2 deployment (recorders)."""
    work = tmp_path_factory.mktemp("versions")
    v1, v2 = Recorder(), Recorder()
    servers = [_serve(v1), _serve(v2)]
    edge: EnvoyEdge | None = None
    try:
        topology = {"user": (Address("127.0.0.1", servers[0][1]),), "user-v2": (Address("127.0.0.1", servers[1][1]),)}
        options = EdgeOptions(listen_port=0, admin_port=0, descriptor_path=str(descriptor),
                              etag_lua_path=str(envoy_config.ROOT / envoy_config.ETAG_LUA),
                              jwks_path=str(keys_dir / JWKS_FILE))
        config = work / "envoy.yaml"
        config.write_text(envoy_config.render(envoy_config.read_services(descriptor), topology, options))
        logs = LogLines()
        edge = EnvoyEdge("envoy-versions", config, work, logs.append)
        edge.start()
        edge.wait_ready(time.monotonic() + 30)
        edge.wait_hosts_healthy("user", 1)
        edge.wait_hosts_healthy("user-v2", 1)

        yield Edge(edge, logs), v1, v2
    finally:
        if edge is not None:
            edge.stop()
        for server, _ in servers:
            server.stop(grace=None)


def test_json_and_grpc_reach_the_version_they_name(versions: tuple[Edge, Recorder, Recorder], keys_dir: Path) -> None:
    edge, v1, v2 = versions
    token = sign_token(keys_dir, {"sub": "u1"})

    old = edge.json("GET", "/v1/auth/jwks")
    new = edge.json("GET", "/v2/users/me", token=token)
    with grpc.insecure_channel(edge.grpc_target) as channel:
        get_user: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"{V2_PREFIX}GetUser")
        get_jwks: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"{V1_PREFIX}GetJwks")
        get_user(b"", metadata=(("authorization", f"Bearer {token}"),), timeout=5)
        get_jwks(b"", timeout=5)

    assert (old.status, new.status) == (200, 200), (old.body, new.body)
    assert new.json() == {"name": "", "display_name": ""}  # v2's own message, transcoded
    assert [c for c in v1.calls if c.startswith("/fittracker")] == [f"{V1_PREFIX}GetJwks"] * 2
    assert [c for c in v2.calls if c.startswith("/fittracker")] == [f"{V2_PREFIX}GetUser"] * 2
    # v2 is not public: no token, no call.
    assert edge.json("GET", "/v2/users/me").status == 401
