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
from tools.envoy_config import Address, EdgeOptions, Limit

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
    assert [c["name"] for c in clusters] == ["user", envoy_config.PREFLIGHT_CLUSTER]
    assert clusters[0]["type"] == "STRICT_DNS"
    transcoded = _filter(config, "envoy.filters.http.grpc_json_transcoder")["typed_config"]["services"]
    assert transcoded == ["fittracker.user.v1.UserService"]


@pytest.mark.parametrize("text", ["user", "user=", "user=localhost", "user=host:port"])
def test_bad_upstream_flag_is_refused(text: str) -> None:
    with pytest.raises(SystemExit):
        envoy_config.main(["--upstream", text, "--output", "-"])


# --- quotas, caching, reads -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("100/s", Limit(100, "second")),
    ("100/s,250", Limit(100, "second", burst=250)),
    ("6000/m", Limit(6000, "minute")),
    ("7", Limit(7, "second")),
    ("off", None),
    ("0", None),
])
def test_limits_parse_and_print_back(text: str, expected: Limit | None) -> None:
    parsed = Limit.parse(text)

    assert parsed == expected
    if parsed is not None:
        assert Limit.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text", ["10/h", "ten/s", "10/s,x", "-1/s"])
def test_bad_limits_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected|bad limit"):
        Limit.parse(text)


def _quota_filter(config: dict[str, Any]) -> dict[str, Any] | None:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    for name in ("client_quotas", "envoy.filters.http.ratelimit"):
        if name in names:
            # After jwt_authn, which sets the user header the per-user quota reads.
            assert names.index(name) > names.index("envoy.filters.http.jwt_authn")
            return _filter(config, name)
    return None


def test_local_quotas_use_one_wildcard_bucket_per_address_and_per_user(
        services: list[envoy_config.GrpcService]) -> None:
    options = EdgeOptions(ip_limit=Limit(50, "second", burst=80), user_limit=Limit(600, "minute"))
    config: Any = envoy_config.plain(envoy_config.build_config(
        services, envoy_config.default_topology({s.domain for s in services}), options))

    quotas = _quota_filter(config)

    assert quotas is not None
    typed = quotas["typed_config"]
    assert typed["descriptors"] == [
        {"entries": [{"key": "remote_address"}],
         "token_bucket": {"max_tokens": 80, "tokens_per_fill": 50, "fill_interval": "1s"}},
        {"entries": [{"key": "user_id"}],
         "token_bucket": {"max_tokens": 600, "tokens_per_fill": 600, "fill_interval": "60s"}},
    ]
    assert typed["rate_limits"] == [
        {"actions": [{"remote_address": {}}]},
        {"actions": [{"request_headers": {"header_name": "x-user-id", "descriptor_key": "user_id"}}]},
    ]
    assert typed["rate_limited_as_resource_exhausted"] is True
    assert typed["enable_x_ratelimit_headers"] == "DRAFT_VERSION_03"
    assert typed["response_headers_to_add"][0]["header"] == {"key": "retry-after", "value": "1"}
    assert "token_bucket" not in typed  # no default bucket: a call that matches nothing is not limited here


def test_quotas_can_be_turned_off(services: list[envoy_config.GrpcService]) -> None:
    config: Any = envoy_config.plain(envoy_config.build_config(
        services, envoy_config.default_topology({s.domain for s in services}),
        EdgeOptions(ip_limit=None, user_limit=None)))

    assert _quota_filter(config) is None


def test_global_quotas_go_to_the_rate_limit_service(services: list[envoy_config.GrpcService]) -> None:
    options = EdgeOptions(rate_limit_service="127.0.0.1:8081", ip_limit=Limit(100, "second"),
                          user_limit=Limit(1200, "minute"))
    config: Any = envoy_config.plain(envoy_config.build_config(
        services, envoy_config.default_topology({s.domain for s in services}), options))

    quotas = _quota_filter(config)
    service_config = yaml.safe_load(envoy_config.rate_limit_service_config(options))

    assert quotas is not None and quotas["name"] == "envoy.filters.http.ratelimit"
    typed = quotas["typed_config"]
    assert typed["domain"] == service_config["domain"] == envoy_config.RATE_LIMIT_DOMAIN
    assert typed["failure_mode_deny"] is False
    assert typed["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "ratelimit"
    assert "ratelimit" in {c["name"] for c in config["static_resources"]["clusters"]}
    assert service_config["descriptors"] == [
        {"key": "remote_address", "rate_limit": {"unit": "second", "requests_per_unit": 100}},
        {"key": "user_id", "rate_limit": {"unit": "minute", "requests_per_unit": 1200}},
    ]


def test_reads_retry_on_reset_and_the_rest_do_not(services: list[envoy_config.GrpcService]) -> None:
    config: Any = envoy_config.plain(envoy_config.build_config(
        services, envoy_config.default_topology({s.domain for s in services}), EdgeOptions()))
    routes = {r["name"]: r for r in _routes(config)}
    user = next(s for s in services if s.full_name == "fittracker.user.v1.UserService")

    reads = routes["fittracker.user.v1.UserService.reads"]
    everything = routes["fittracker.user.v1.UserService"]

    assert {m.name for m in user.methods if m.read_only} == {"GetJwks", "GetUser", "GetPreferences"}
    assert reads["match"]["safe_regex"]["regex"] == (
        r"^/fittracker\.user\.v1\.UserService/(GetJwks|GetUser|GetPreferences)$")
    assert reads["route"]["retry_policy"]["retry_on"].split(",")[-1] == "reset"
    assert "reset" not in everything["route"]["retry_policy"]["retry_on"].split(",")
    # Most specific first: Envoy takes the first matching route.
    names = list(routes)
    assert names.index("fittracker.user.v1.UserService.reads") < names.index("fittracker.user.v1.UserService")


def test_every_json_read_states_its_cacheability(services: list[envoy_config.GrpcService]) -> None:
    config: Any = envoy_config.plain(envoy_config.build_config(
        services, envoy_config.default_topology({s.domain for s in services}), EdgeOptions()))
    routes = {r["name"]: r for r in _routes(config)}
    known = {f"{s.prefix}{m.name}" for s in services for m in s.methods}

    for path, policy in envoy_config.CACHE_POLICIES.items():
        assert path in known, f"{path} is in no contract"
        route = routes[path.lstrip("/").replace("/", ".") + ".json"]
        # Only calls the transcoder rewrote from JSON: gRPC and gRPC-Web replies are not for HTTP caches.
        assert {"name": "x-envoy-original-path", "present_match": True} in route["match"]["headers"]
        added = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
        assert added == {"cache-control": policy, "vary": envoy_config.CACHE_VARY, envoy_config.ETAG_MARKER: "sha256"}
    for service in services:
        per_user = [f"{service.prefix}{m.name}" for m in service.methods if m.read_only
                    and not (m.client_streaming or m.server_streaming)
                    and f"{service.prefix}{m.name}" not in envoy_config.CACHE_POLICIES]
        if per_user:
            route = routes[f"{service.full_name}.reads.json"]
            assert {"name": "x-envoy-original-path", "present_match": True} in route["match"]["headers"]
            assert route["response_headers_to_add"] == [{"header": {
                "key": "cache-control", "value": envoy_config.PER_USER_POLICY},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    # Before the transcoder in the chain, so after it on the way out: it hashes JSON, not gRPC frames.
    assert names.index("envoy.filters.http.lua") < names.index("envoy.filters.http.grpc_json_transcoder")
    exposed = _cors(config)["expose_headers"]
    assert {"etag", "x-ratelimit-remaining", "retry-after"} <= {h.strip() for h in exposed.split(",")}


def _cors(config: dict[str, Any]) -> dict[str, Any]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    policy: dict[str, Any] = hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"][
        "envoy.filters.http.cors"]
    return policy


def test_command_line_renders_global_quotas_that_envoy_accepts(tmp_path: Path, keys_dir: Path) -> None:
    out, service_config = tmp_path / "envoy.yaml", tmp_path / "ratelimit" / "config.yaml"

    code = envoy_config.main([
        "--output", str(out), "--listen-port", "0", "--admin-port", "0", "--keys-dir", str(keys_dir),
        "--descriptor-path", str(ROOT / envoy_config.DESCRIPTOR), "--upstream", "user=127.0.0.1:1",
        "--ip-limit", "30/s,60", "--user-limit", "off", "--rate-limit-service", "127.0.0.1:8081",
        "--rate-limit-service-config", str(service_config)])
    validated = validate(out, tmp_path)

    assert code == 0
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert yaml.safe_load(service_config.read_text())["descriptors"] == [
        {"key": "remote_address", "rate_limit": {"unit": "second", "requests_per_unit": 30}}]
    assert "descriptor_key: user_id" not in out.read_text()  # the per-user quota is off
