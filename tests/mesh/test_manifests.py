"""The Kubernetes and Istio manifests in mesh/: strict schema validation plus the rules between them.

No cluster runs here. ``tests/mesh/validate`` is a small Go program that decodes every document into
the official Go types (k8s.io/api, the VPA's API package, istio.io/client-go, and the Istio spec
messages through protojson), failing on unknown fields, wrong types and unknown enum values. The test
builds it with ``go build`` from the committed go.mod/go.sum into .cache/bin. The Python tests then
check what no schema can: names that must match across objects, and the call graph of the code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.settings import DEFAULT_PORTS, SERVICES

ROOT = Path(__file__).resolve().parents[2]
MESH = ROOT / "mesh"
VALIDATOR_SRC = Path(__file__).resolve().parent / "validate"
VALIDATOR_BIN = ROOT / ".cache" / "bin" / "mesh-validate"
NAMESPACE = "fittracker"
#: Callers outside the namespace that a policy may name: only the ingress gateway, in front of the edge.
FOREIGN_PRINCIPALS = {"cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"}

#: Ports by service name as plain strings, since names here come from YAML and regexes.
PORTS: dict[str, int] = {str(name): port for name, port in DEFAULT_PORTS.items()}

Doc = dict[str, Any]


def _manifests() -> list[Path]:
    return sorted([*MESH.glob("k8s/*.yaml"), *MESH.glob("istio/*.yaml")])


def _load() -> list[Doc]:
    docs: list[Doc] = []
    for path in _manifests():
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


DOCS = _load()


def _of(kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in DOCS if d["kind"] == kind}


def _go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if found is None:
        pytest.fail("Go is needed to build tests/mesh/validate: install it or put it on PATH (/usr/local/go/bin)")
    return found


@pytest.fixture(scope="module")
def validator() -> Iterator[Path]:
    """The schema validator, built from the committed go.mod/go.sum (`make deps` builds it first; a no-op here)."""
    VALIDATOR_BIN.parent.mkdir(parents=True, exist_ok=True)
    # -mod=readonly: go.sum pins every module; a missing or changed hash fails instead of resolving anew.
    env = {**os.environ, "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "0"}
    result = subprocess.run(
        [_go(), "build", "-o", str(VALIDATOR_BIN), "."],
        cwd=VALIDATOR_SRC, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            "building the mesh validator failed (needs the Go module proxy on a cold cache):\n"
            f"cd {VALIDATOR_SRC.relative_to(ROOT)} && go build ./...\n{result.stderr}"
        )
    yield VALIDATOR_BIN


def _validate(binary: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *map(str, files)], capture_output=True, text=True, timeout=60, check=False)


# ------------------------------------------------------------------------------------------------
# Schemas
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(660)
def test_every_document_decodes_strictly_into_the_official_types(validator: Path) -> None:
    result = _validate(validator, *_manifests())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{len(DOCS)} documents valid"


@pytest.mark.timeout(660)
@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        (  # a misspelt Kubernetes field
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {selectr: {app: x}}\n",
            'unknown field "selectr"',
        ),
        (  # a wrong type
            "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: x}\n"
            "spec: {minReplicas: two, maxReplicas: 3, scaleTargetRef: {kind: Deployment, name: x}}\n",
            "minReplicas",
        ),
        (  # a misspelt field inside an Istio spec (Istio's own UnmarshalJSON would accept it)
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n"
            "spec: {hosts: [x], http: [{retries: {attempts: 2, retryOnn: unavailable}}]}\n",
            'unknown field "retryOnn"',
        ),
        (  # an unknown enum value
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\n"
            "spec: {mtls: {mode: STRIKT}}\n",
            "STRIKT",
        ),
        (  # a VPA field
            "apiVersion: autoscaling.k8s.io/v1\nkind: VerticalPodAutoscaler\nmetadata: {name: x}\n"
            "spec: {targetRef: {kind: Deployment, name: x}, updatePolicy: {updateMod: 'Off'}}\n",
            'unknown field "updateMod"',
        ),
        ("apiVersion: v9\nkind: Gizmo\nmetadata: {name: x}\n", "unknown apiVersion/kind"),
    ],
)
def test_the_validator_rejects_what_a_cluster_would(validator: Path, tmp_path: Path, document: str,
                                                    complaint: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(document)
    result = _validate(validator, bad)
    assert result.returncode == 1
    assert complaint in result.stderr


# ------------------------------------------------------------------------------------------------
# Names that must agree across objects
# ------------------------------------------------------------------------------------------------


def test_every_object_lives_in_the_namespace_which_has_injection_on() -> None:
    namespace = _of("Namespace")[NAMESPACE]
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in DOCS if d["kind"] != "Namespace")


def test_every_deployment_runs_as_its_own_service_account() -> None:
    accounts = _of("ServiceAccount")
    for name, deployment in _of("Deployment").items():
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == name
        assert name in accounts


def _container(name: str) -> Doc:
    containers = _of("Deployment")[name]["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _env(name: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(name)["env"]}


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_runs_its_module_in_production_on_its_port(service: str) -> None:
    container = _container(service)
    assert container["command"] == ["python", "-m", f"services.{service}"]
    assert (ROOT / "services" / service / "__main__.py").exists()
    assert container["image"].startswith("fittracker/backend:")
    env = _env(service)
    assert env["FITTRACKER_ENVIRONMENT"] == "production"
    assert env["FITTRACKER_PORT"] == str(PORTS[service])
    assert env["FITTRACKER_MONGO_URL"]["secretKeyRef"]["name"] == env["FITTRACKER_REDIS_URL"]["secretKeyRef"]["name"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": PORTS[service], "http-metrics": int(env["FITTRACKER_METRICS_PORT"])}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["FITTRACKER_JWT_KEYS_DIR"] in mounts


@pytest.mark.parametrize("service", SERVICES)
def test_probes_ask_grpc_health_on_the_grpc_port(service: str) -> None:
    container = _container(service)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == PORTS[service], probe
    liveness = container["livenessProbe"]
    env = _env(service)
    drain = float(env["FITTRACKER_DRAIN_NOTICE_SECONDS"]) + float(env["FITTRACKER_GRACE_SECONDS"])
    # A draining pod answers NOT_SERVING; liveness must not kill it before the drain ends.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


@pytest.mark.parametrize("service", SERVICES)
def test_the_pod_outlives_its_drain_and_runs_locked_down(service: str) -> None:
    pod = _of("Deployment")[service]["spec"]["template"]["spec"]
    env = _env(service)
    drain = float(env["FITTRACKER_DRAIN_NOTICE_SECONDS"]) + float(env["FITTRACKER_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    context = _container(service)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    resources = _container(service)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert pod["topologySpreadConstraints"]


@pytest.mark.parametrize("service", SERVICES)
def test_services_expose_grpc_by_name_and_app_protocol(service: str) -> None:
    svc = _of("Service")[service]
    assert svc["spec"]["selector"] == _of("Deployment")[service]["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [
        {"name": "grpc", "port": PORTS[service], "targetPort": "grpc", "appProtocol": "grpc"}
    ]


@pytest.mark.parametrize("service", SERVICES)
def test_autoscalers_and_budget_target_the_deployment(service: str) -> None:
    deployment = _of("Deployment")[service]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = _of("HorizontalPodAutoscaler")[service]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": service}
    assert hpa["minReplicas"] >= 2
    assert hpa["maxReplicas"] >= 50
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    vpa = _of("VerticalPodAutoscaler")[service]["spec"]
    assert vpa["targetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": service}
    # "Auto"/"Recreate" would rewrite CPU requests under the HPA's utilisation target.
    assert vpa["updatePolicy"]["updateMode"] in ("Off", "Initial")
    pdb = _of("PodDisruptionBudget")[service]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


# ------------------------------------------------------------------------------------------------
# Istio: traffic and who may call whom
# ------------------------------------------------------------------------------------------------


def _host(service: str) -> str:
    return f"{service}.{NAMESPACE}.svc.cluster.local"


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_routing_and_an_mtls_destination_rule(service: str) -> None:
    vs = _of("VirtualService")[service]["spec"]
    assert vs["hosts"] == [_host(service)]
    for route in vs["http"]:
        assert route["route"][0]["destination"] == {"host": _host(service), "port": {"number": PORTS[service]}}
        assert "connect-failure" in route["retries"]["retryOn"]
    dr = _of("DestinationRule")[service]["spec"]
    assert dr["host"] == _host(service)
    assert dr["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"
    assert dr["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"] > 0
    assert dr["trafficPolicy"]["outlierDetection"]


def test_mtls_is_strict_for_the_whole_namespace() -> None:
    peer = _of("PeerAuthentication")
    assert len(peer) == 1
    (only,) = peer.values()
    assert "selector" not in only["spec"]
    assert only["spec"]["mtls"]["mode"] == "STRICT"


def test_policy_principals_name_existing_service_accounts() -> None:
    accounts = _of("ServiceAccount")
    for name, policy in _of("AuthorizationPolicy").items():
        for rule in policy["spec"].get("rules", []):
            for source in rule["from"]:
                for principal in source["source"]["principals"]:
                    if principal in FOREIGN_PRINCIPALS:
                        continue
                    match = re.fullmatch(rf"cluster\.local/ns/{NAMESPACE}/sa/([a-z0-9-]+)", principal)
                    assert match, f"{name}: {principal}"
                    assert match.group(1) in accounts, f"{name}: no ServiceAccount {match.group(1)}"


def _callers_in_code() -> dict[str, set[str]]:
    """Who calls whom over gRPC, read from ``resources.client("<callee>")`` in each service's package."""
    callers: dict[str, set[str]] = {s: set() for s in SERVICES}
    for caller in SERVICES:
        for source in (ROOT / "services" / caller).rglob("*.py"):
            for callee in re.findall(r"resources\.client\(\"(\w+)\"\)", source.read_text()):
                callers[callee].add(caller)
    return callers


def test_each_service_admits_exactly_the_edge_and_its_callers_in_code() -> None:
    code = _callers_in_code()
    assert code["user"] >= {"ai", "notification"}, "the scan no longer finds the known calls"
    policies = _of("AuthorizationPolicy")
    assert policies["allow-nothing"]["spec"] == {"action": "ALLOW"}, "default deny: ALLOW with no rules"
    for service in SERVICES:
        spec = policies[service]["spec"]
        assert spec["selector"]["matchLabels"] == {"app": service}
        assert spec["action"] == "ALLOW"
        principals = {p for rule in spec["rules"] for src in rule["from"] for p in src["source"]["principals"]}
        expected = {f"cluster.local/ns/{NAMESPACE}/sa/{c}" for c in {"edge", *code[service]}}
        assert principals == expected, service


def test_callers_are_configured_with_the_addresses_of_what_they_call() -> None:
    code = _callers_in_code()
    for callee, callers in code.items():
        for caller in callers:
            address = _env(caller)[f"FITTRACKER_{callee.upper()}_ADDR"]
            assert address == f"{_host(callee)}:{PORTS[callee]}"


def test_the_public_host_reaches_the_edge_through_the_gateway() -> None:
    gateway = _of("Gateway")["edge"]["spec"]
    edge_vs = _of("VirtualService")["edge"]["spec"]
    assert edge_vs["gateways"] == ["edge"]
    assert set(edge_vs["hosts"]) <= {h for server in gateway["servers"] for h in server["hosts"]}
    edge_port = _of("Service")["edge"]["spec"]["ports"][0]["port"]
    assert edge_vs["http"][0]["route"][0]["destination"] == {"host": _host("edge"), "port": {"number": edge_port}}


def test_tracing_samples_a_share_of_requests() -> None:
    (telemetry,) = _of("Telemetry").values()
    (tracing,) = telemetry["spec"]["tracing"]
    assert 0 < tracing["randomSamplingPercentage"] <= 100
