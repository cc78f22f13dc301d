"""The Envoy config generator: freshness of the committed file, Envoy's own validation, content."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.auth import load_or_create_signing_key
from tools import envoy_config
from tools.devstack import envoy_binary, present_services
from tools.envoy_config import Address, EdgeOptions

ROOT = envoy_config.ROOT


def validate(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate`` on ``config``."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "error", "--disable-hot-restart"],
        cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture(scope="module")
def services() -> list[envoy_config.GrpcService]:
    """The services of the committed descriptor set."""
    return envoy_config.read_services(ROOT / envoy_config.DESCRIPTOR)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keys directory with a signing key and its JWKS, as the user service writes them."""
    path = tmp_path_factory.mktemp("keys")
    load_or_create_signing_key(path, allow_create=True)
    return path


def test_committed_config_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "envoy_config.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert result.returncode == 0, result.stderr


def test_rendered_config_passes_envoy_validation(tmp_path: Path, keys_dir: Path) -> None:
    out = tmp_path / "envoy.yaml"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "envoy_config.py"), "--output", str(out),
         "--listen-port", "0", "--admin-port", "0", "--keys-dir", str(keys_dir),
         "--descriptor-path", str(ROOT / envoy_config.DESCRIPTOR),
         "--upstream", "user=127.0.0.1:1,127.0.0.1:2", "--cors-origin", "https://app.example",
         "--otlp-endpoint", "127.0.0.1:4317"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr

    validated = validate(out, tmp_path)

    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert "OK" in validated.stdout


def test_committed_config_passes_envoy_validation(tmp_path: Path, keys_dir: Path) -> None:
    # Its paths are relative to the repository root: give Envoy a root with the same layout.
    (tmp_path / "envoy").symlink_to(ROOT / "envoy")
    (tmp_path / ".data").mkdir()
    (tmp_path / ".data" / "keys").symlink_to(keys_dir)

    validated = validate(ROOT / envoy_config.OUTPUT, tmp_path)

    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_yaml_reads_back_as_the_built_config(services: list[envoy_config.GrpcService]) -> None:
    topology = envoy_config.default_topology({s.domain for s in services})
    options = EdgeOptions(cors_origins=("http://a.example", "https://b.example:8443"))

    text = envoy_config.render(services, topology, options)

    assert yaml.safe_load(text) == envoy_config.plain(envoy_config.build_config(services, topology, options))


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes: list[dict[str, Any]] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def _filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    found: dict[str, Any] = next(f for f in hcm["http_filters"] if f["name"] == name)
    return found


def test_every_service_has_a_route_and_its_domain_a_cluster(services: list[envoy_config.GrpcService]) -> None:
    topology = envoy_config.default_topology({s.domain for s in services}, replicas=3)
    config: Any = envoy_config.plain(envoy_config.build_config(services, topology, EdgeOptions()))

    prefixes = {r["match"].get("prefix"): r for r in _routes(config)}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for service in services:
        assert prefixes[service.prefix]["route"]["cluster"] == service.domain
        ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
                 for e in clusters[service.domain]["load_assignment"]["endpoints"][0]["lb_endpoints"]]
        assert ports == [envoy_config.replica_port(service.domain, i) for i in range(3)]
    transcoded = _filter(config, "envoy.filters.http.grpc_json_transcoder")["typed_config"]["services"]
    assert transcoded == [s.full_name for s in services]


def test_streaming_methods_get_unbounded_routes(services: list[envoy_config.GrpcService]) -> None:
    streaming = envoy_config.GrpcService(
        "fittracker.user.v1.StreamService", "user",
        (envoy_config.Method("Watch", client_streaming=False, server_streaming=True),
         envoy_config.Method("Upload", client_streaming=True, server_streaming=False)),
    )
    config: Any = envoy_config.plain(envoy_config.build_config(
        [*services, streaming], {"user": (Address("127.0.0.1", 1),)}, EdgeOptions()))

    by_path = {r["match"].get("path"): r for r in _routes(config)}
    watch = by_path["/fittracker.user.v1.StreamService/Watch"]
    upload = by_path["/fittracker.user.v1.StreamService/Upload"]
    assert watch["route"]["timeout"] == "0s"
    assert "max_stream_duration" not in watch["route"]["max_stream_duration"]
    assert "typed_per_filter_config" not in watch
    assert upload["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"] is True
    assert "retry_policy" not in upload["route"]


def test_only_public_methods_skip_the_token(services: list[envoy_config.GrpcService]) -> None:
    config: Any = envoy_config.plain(envoy_config.build_config(
        services, envoy_config.default_topology({s.domain for s in services}), EdgeOptions()))

    rules = _filter(config, "envoy.filters.http.jwt_authn")["typed_config"]["rules"]

    optional = [r["match"]["path"] for r in rules if "requires_any" in r["requires"]]
    assert optional == list(envoy_config.PUBLIC_METHODS)
    assert rules[-1] == {"match": {"prefix": "/"}, "requires": {"provider_name": "fittracker"}}


def test_public_methods_match_what_the_services_declare() -> None:
    declared: set[str] = set()
    for name in present_services():
        module = importlib.import_module(f"services.{name}.service")
        declared |= set(getattr(module, "PUBLIC_METHODS", ()))

    assert declared == set(envoy_config.PUBLIC_METHODS)


def test_topology_leaves_out_domains_it_does_not_name(services: list[envoy_config.GrpcService]) -> None:
    config: Any = envoy_config.plain(envoy_config.build_config(
        services, {"user": (Address("10.0.0.7", 50051), Address("user.internal", 50051))}, EdgeOptions()))

    clusters = config["static_resources"]["clusters"]
    assert [c["name"] for c in clusters] == ["user"]
    assert clusters[0]["type"] == "STRICT_DNS"
    transcoded = _filter(config, "envoy.filters.http.grpc_json_transcoder")["typed_config"]["services"]
    assert transcoded == ["fittracker.user.v1.UserService"]


@pytest.mark.parametrize("text", ["user", "user=", "user=localhost", "user=host:port"])
def test_bad_upstream_flag_is_refused(text: str) -> None:
    with pytest.raises(SystemExit):
        envoy_config.main(["--upstream", text, "--output", "-"])
