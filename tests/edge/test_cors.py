"""OPTIONS requests at the edge: preflights are answered by Envoy and never reach a replica.

First the configuration (allowed origins from flags or FITTRACKER_EDGE_CORS_ORIGINS, checked as
browsers write them; no OPTIONS route leads to a service). Then the attacker's requests, through
the real edge: a CORS preflight (with or without the gRPC-Web
content type a browser never sends on one), on a gRPC-Web path and on a JSON path, from the
allowed origin and from another one, with and without a token; and a plain OPTIONS (no
Access-Control-Request-Method), which is an ordinary call that needs a token. None may reach a
service (the access log names no upstream host) and none may end in a server error.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.edge.conftest import GRPC_WEB, ORIGIN, Account, Edge, Reply
from tools import envoy_config

pytestmark = pytest.mark.edge

GRPC_WEB_PATH = "/fittracker.user.v1.UserService/GetUser"
JSON_PATH = "/v1/users/me"
OTHER_ORIGIN = "https://evil.example"
#: gRPC codes that mean the server failed (the gRPC side of a 5xx).
SERVER_FAULTS = {2, 13, 14, 15}
UNIMPLEMENTED = 12

PATHS = pytest.mark.parametrize("path", [GRPC_WEB_PATH, JSON_PATH])
ORIGINS = pytest.mark.parametrize("origin", [ORIGIN, OTHER_ORIGIN])
TOKENS = pytest.mark.parametrize("with_token", [False, True], ids=["no-token", "token"])
#: Extra headers of each shape of OPTIONS: as a browser sends it, and as the attacker did.
SHAPES = pytest.mark.parametrize("shape", [{}, {"content-type": GRPC_WEB, "x-grpc-web": "1"}],
                                 ids=["browser", "grpc-web-content-type"])


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["https://app.example", "http://127.0.0.1:8000", "http://[::1]:3000"])
def test_an_origin_as_browsers_send_it_is_accepted(origin: str) -> None:
    assert envoy_config.check_origin(origin) == origin


@pytest.mark.parametrize(("origin", "hint"), [
    ("https://app.example/", "'https://app.example'"),
    ("https://app.example:443", "'https://app.example'"),
    ("HTTPS://App.Example", "'https://app.example'"),
    ("*", "scheme://host"),
    ("https://*.example", "scheme://host"),
    ("app.example", "scheme://host"),
    ("ftp://app.example", "scheme://host"),
    ("https://user@app.example", "scheme://host"),
    ("https://app.example:99999", "scheme://host"),
])
def test_an_origin_no_browser_sends_is_refused_with_the_right_spelling(origin: str, hint: str) -> None:
    with pytest.raises(ValueError, match=r"CORS origin") as caught:
        envoy_config.check_origin(origin)

    assert hint in str(caught.value)


def _options_for(argv: list[str], env: dict[str, str]) -> envoy_config.EdgeOptions:
    return envoy_config.options_from(envoy_config._parser(env).parse_args(argv))[1]


def test_origins_come_from_the_environment_and_flags_win() -> None:
    env = {envoy_config.CORS_ORIGINS_ENV: "https://app.example, https://admin.app.example"}

    assert _options_for([], {}).cors_origins == envoy_config.DEFAULT_CORS_ORIGINS
    assert _options_for([], env).cors_origins == ("https://app.example", "https://admin.app.example")
    assert _options_for(["--cors-origin", "http://localhost:8000"], env).cors_origins == ("http://localhost:8000",)
    assert _options_for([], {envoy_config.CORS_ORIGINS_ENV: "none"}).cors_origins == ()


def test_a_bad_origin_in_the_environment_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        envoy_config._parser({envoy_config.CORS_ORIGINS_ENV: "https://app.example/"})

    assert caught.value.code == 2
    assert envoy_config.CORS_ORIGINS_ENV in capsys.readouterr().err


def _built(origins: tuple[str, ...]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    services = envoy_config.read_services(envoy_config.ROOT / envoy_config.DESCRIPTOR)
    config: Any = envoy_config.plain(envoy_config.build_config(
        services, envoy_config.default_topology({s.domain for s in services}),
        envoy_config.EdgeOptions(cors_origins=origins)))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    return hcm["route_config"]["virtual_hosts"][0]["routes"], clusters


def _takes_options(route: dict[str, Any]) -> bool:
    method = next((h for h in route["match"].get("headers", []) if h["name"] == ":method"), None)
    return method is None or method["string_match"] == {"exact": "OPTIONS"}


@pytest.mark.parametrize("origins", [("https://app.example", "http://localhost:3000"), ()], ids=["two", "none"])
def test_no_options_route_leads_to_a_service(origins: tuple[str, ...]) -> None:
    routes, clusters = _built(origins)

    # The first route an OPTIONS can match, in table order, for any path: a catch-all OPTIONS route.
    first = next(r for r in routes if _takes_options(r))
    assert first["match"]["prefix"] == "/"
    options_routes = [r for r in routes if r["match"].get("headers", [{}])[0].get("name") == ":method"]
    assert routes[:len(options_routes)] == options_routes
    assert options_routes[-1]["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "OPTIONS"}}]
    for route in options_routes:
        if "route" in route:
            assert route["route"]["cluster"] == envoy_config.PREFLIGHT_CLUSTER
            assert clusters[route["route"]["cluster"]]["load_assignment"]["endpoints"] == []
        else:
            assert route["direct_response"]["status"] in {204, 405}
    forwarded = {r["match"]["headers"][1]["string_match"]["exact"] for r in options_routes if "route" in r}
    assert forwarded == set(origins)
    assert (envoy_config.PREFLIGHT_CLUSTER in clusters) == bool(origins)


# --- through the edge ------------------------------------------------------------------------


def options(edge: Edge, path: str, headers: dict[str, str], token: str | None) -> Reply:
    """Send one OPTIONS and check what every OPTIONS must satisfy: answered by the edge, no fault."""
    sent = dict(headers)
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    reply = edge.http("OPTIONS", path, headers=sent)

    entry = edge.logs.access_log(reply.headers["x-request-id"])
    assert entry["upstream_host"] in {None, "-"}, f"reached a replica: {entry}"
    assert reply.status < 500, (reply.status, reply.headers, reply.body)
    assert int(reply.headers.get("grpc-status", "0")) not in SERVER_FAULTS, reply.headers
    return reply


def allowed_headers(reply: Reply) -> set[str]:
    """The CORS headers that grant the browser anything."""
    return {h for h in reply.headers if h.startswith("access-control-allow-")}


@PATHS
@TOKENS
@SHAPES
def test_preflight_from_allowed_origin_is_answered_by_the_edge(
    edge: Edge, account: Account, path: str, with_token: bool, shape: dict[str, str],
) -> None:
    reply = options(edge, path, {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-grpc-web",
        **shape,
    }, account.access_token if with_token else None)

    assert reply.status in {200, 204}
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in reply.headers["access-control-allow-methods"]
    assert "x-grpc-web" in reply.headers["access-control-allow-headers"]


@PATHS
@TOKENS
@SHAPES
def test_preflight_from_other_origin_is_answered_without_allowing_it(
    edge: Edge, account: Account, path: str, with_token: bool, shape: dict[str, str],
) -> None:
    reply = options(edge, path, {
        "origin": OTHER_ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-grpc-web",
        **shape,
    }, account.access_token if with_token else None)

    assert allowed_headers(reply) == set(), reply.headers


@PATHS
@ORIGINS
@SHAPES
def test_plain_options_without_token_is_unauthenticated(edge: Edge, path: str, origin: str,
                                                        shape: dict[str, str]) -> None:
    reply = options(edge, path, {"origin": origin, **shape}, None)

    assert reply.status == 401, (reply.status, reply.headers, reply.body)


@PATHS
@ORIGINS
@SHAPES
def test_plain_options_with_token_is_not_allowed(edge: Edge, account: Account, path: str, origin: str,
                                                 shape: dict[str, str]) -> None:
    reply = options(edge, path, {"origin": origin, **shape}, account.access_token)

    assert reply.status == 405, (reply.status, reply.headers, reply.body)
    assert "OPTIONS" not in reply.headers["allow"]
    if shape:
        assert reply.headers["grpc-status"] == str(UNIMPLEMENTED)
    else:
        assert reply.json()["code"] == UNIMPLEMENTED
