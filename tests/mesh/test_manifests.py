"""The Kubernetes and Istio manifests in mesh/, as each overlay renders them: strict schemas and the rules between them.

No cluster runs here. The real kustomize (``make deps`` installs it into .cache/bin) renders every
overlay under ``mesh/overlays``; ``tests/mesh/validate``, a small Go program, decodes each rendered
document into the official Go types (k8s.io/api, the VPA's API package, istio.io/client-go, and the
Istio spec messages through protojson), failing on unknown fields, wrong types and unknown enum values.
The Python tests then check what no schema can: names that must match across objects, the call graph of
the code, the capacity figures behind prod's autoscaling, the edge's generated config, and that no
secret value is in any rendered manifest.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.auth import load_or_create_signing_key
from services.runtime.settings import DEFAULT_PORTS, SERVICES
from tools import bench, edge_configmap, envoy_config
from tools.devstack import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
MESH = ROOT / "mesh"
OVERLAYS = ("dev", "prod")
VALIDATOR_SRC = Path(__file__).resolve().parent / "validate"
VALIDATOR_BIN = ROOT / ".cache" / "bin" / "mesh-validate"
KUSTOMIZE_BIN = ROOT / ".cache" / "bin" / "kustomize"
ISTIOCTL_BIN = ROOT / ".cache" / "bin" / "istioctl"
NAMESPACE = "fittracker"
#: Callers outside the namespace that a policy may name: only the ingress gateway, in front of the edge.
FOREIGN_PRINCIPALS = {"cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"}
#: Every Deployment: the services and the edge.
WORKLOADS = (*SERVICES, "edge")

#: Ports by service name as plain strings, since names here come from YAML and regexes.
PORTS: dict[str, int] = {str(name): port for name, port in DEFAULT_PORTS.items()}

Doc = dict[str, Any]


@functools.cache
def rendered(overlay: str) -> str:
    """``kustomize build mesh/overlays/<overlay>``: what would be applied."""
    if not KUSTOMIZE_BIN.exists():
        pytest.fail(f"{KUSTOMIZE_BIN.relative_to(ROOT)} is missing: run `make deps`")
    result = subprocess.run(
        [str(KUSTOMIZE_BIN), "build", str(MESH / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kustomize build mesh/overlays/{overlay} failed:\n{result.stderr}")
    return result.stdout


def _load(overlay: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(rendered(overlay)) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    """The rendered documents of one overlay (each test runs for every overlay)."""
    return _load(request.param)


@pytest.fixture(scope="module")
def prod() -> list[Doc]:
    """The rendered documents of the prod overlay."""
    return _load("prod")


@pytest.fixture(scope="module")
def dev() -> list[Doc]:
    """The rendered documents of the dev overlay."""
    return _load("dev")


def _of(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


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
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_document_decodes_strictly_into_the_official_types(validator: Path, tmp_path: Path,
                                                                         overlay: str) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(rendered(overlay))
    result = _validate(validator, manifest)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{len(_load(overlay))} documents valid"


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


def _istio_analyze(manifest: Path) -> subprocess.CompletedProcess[str]:
    if not ISTIOCTL_BIN.exists():
        pytest.fail(f"{ISTIOCTL_BIN.relative_to(ROOT)} is missing: run `make deps`")
    # --all-namespaces: by default the analyzer reports on the "default" namespace only.
    return subprocess.run(
        [str(ISTIOCTL_BIN), "analyze", "--use-kube=false", "--all-namespaces", str(manifest)],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_istios_own_analyzer_finds_no_issue(tmp_path: Path, overlay: str) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(rendered(overlay))
    result = _istio_analyze(manifest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No validation issues found" in result.stdout + result.stderr


def test_istios_analyzer_refuses_what_the_schema_check_lets_through(tmp_path: Path, prod: list[Doc]) -> None:
    # A zero route timeout decodes fine into the types, but Istio's admission would refuse it.
    planted = copy.deepcopy(prod)
    _of(planted, "VirtualService")["edge"]["spec"]["http"][0]["timeout"] = "0s"
    manifest = tmp_path / "planted.yaml"
    manifest.write_text(yaml.safe_dump_all(planted))
    result = _istio_analyze(manifest)
    assert result.returncode != 0
    assert "IST0106" in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------
# Names that must agree across objects
# ------------------------------------------------------------------------------------------------


def test_every_object_lives_in_the_namespace_which_has_injection_on(docs: list[Doc]) -> None:
    namespace = _of(docs, "Namespace")[NAMESPACE]
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in docs if d["kind"] != "Namespace")


def test_every_deployment_runs_as_its_own_service_account(docs: list[Doc]) -> None:
    accounts = _of(docs, "ServiceAccount")
    for name, deployment in _of(docs, "Deployment").items():
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == name
        assert name in accounts


def _container(docs: list[Doc], name: str) -> Doc:
    containers = _of(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _env(docs: list[Doc], name: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(docs, name)["env"]}


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_runs_its_module_in_production_on_its_port(docs: list[Doc], service: str) -> None:
    container = _container(docs, service)
    assert container["command"] == ["python", "-m", f"services.{service}"]
    assert (ROOT / "services" / service / "__main__.py").exists()
    assert container["image"].startswith("fittracker/backend:")
    env = _env(docs, service)
    assert env["FITTRACKER_ENVIRONMENT"] == "production"
    assert env["FITTRACKER_PORT"] == str(PORTS[service])
    assert env["FITTRACKER_MONGO_URL"]["secretKeyRef"]["name"] == env["FITTRACKER_REDIS_URL"]["secretKeyRef"]["name"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": PORTS[service], "http-metrics": int(env["FITTRACKER_METRICS_PORT"])}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["FITTRACKER_JWT_KEYS_DIR"] in mounts


@pytest.mark.parametrize("service", SERVICES)
def test_probes_ask_grpc_health_on_the_grpc_port(docs: list[Doc], service: str) -> None:
    container = _container(docs, service)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == PORTS[service], probe
    liveness = container["livenessProbe"]
    env = _env(docs, service)
    drain = float(env["FITTRACKER_DRAIN_NOTICE_SECONDS"]) + float(env["FITTRACKER_GRACE_SECONDS"])
    # A draining pod answers NOT_SERVING; liveness must not kill it before the drain ends.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


@pytest.mark.parametrize("service", SERVICES)
def test_the_pod_outlives_its_drain_and_runs_locked_down(docs: list[Doc], service: str) -> None:
    pod = _of(docs, "Deployment")[service]["spec"]["template"]["spec"]
    env = _env(docs, service)
    drain = float(env["FITTRACKER_DRAIN_NOTICE_SECONDS"]) + float(env["FITTRACKER_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    context = _container(docs, service)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    resources = _container(docs, service)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert pod["topologySpreadConstraints"]


#: The one writable path the image expects under its read-only root (a path in the pod, not here).
SCRATCH_DIR = "/tmp"  # noqa: S108


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_container_has_a_read_only_root_and_a_scratch_tmp(docs: list[Doc], workload: str) -> None:
    pod = _of(docs, "Deployment")[workload]["spec"]["template"]["spec"]
    scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for container in pod["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounted.get(SCRATCH_DIR) in scratch, container["name"]


@pytest.mark.parametrize("service", SERVICES)
def test_services_expose_grpc_by_name_and_app_protocol(docs: list[Doc], service: str) -> None:
    svc = _of(docs, "Service")[service]
    assert svc["spec"]["selector"] == _of(docs, "Deployment")[service]["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [
        {"name": "grpc", "port": PORTS[service], "targetPort": "grpc", "appProtocol": "grpc"}
    ]


# ------------------------------------------------------------------------------------------------
# Overlays: replicas, autoscaling, capacity, images
# ------------------------------------------------------------------------------------------------


def test_dev_runs_one_replica_of_everything_and_nothing_that_scales(dev: list[Doc]) -> None:
    assert {name: d["spec"].get("replicas") for name, d in _of(dev, "Deployment").items()} == dict.fromkeys(
        WORKLOADS, 1)
    assert not [d["kind"] for d in dev
                if d["kind"] in ("HorizontalPodAutoscaler", "VerticalPodAutoscaler", "PodDisruptionBudget")]


@pytest.mark.parametrize("workload", WORKLOADS)
def test_prod_autoscalers_and_budget_target_each_deployment(prod: list[Doc], workload: str) -> None:
    deployment = _of(prod, "Deployment")[workload]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = _of(prod, "HorizontalPodAutoscaler")[workload]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": workload}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 60)
    ((metric),) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # The load share at which make bench measures p99 against its target (see the prod overlay).
    assert metric["resource"]["target"]["averageUtilization"] == round(bench.LOAD_SHARE * 100)
    pdb = _of(prod, "PodDisruptionBudget")[workload]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("service", SERVICES)
def test_prod_vpas_only_recommend(prod: list[Doc], service: str) -> None:
    vpa = _of(prod, "VerticalPodAutoscaler")[service]["spec"]
    assert vpa["targetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": service}
    # "Auto"/"Recreate" would rewrite CPU requests under the HPA's utilisation target.
    assert vpa["updatePolicy"]["updateMode"] in ("Off", "Initial")


def test_prod_requests_one_core_for_the_one_worker_bench_measures(prod: list[Doc]) -> None:
    # One worker process per pod uses about one core; bench's per-process figure is per that core.
    assert _env(prod, "user")["FITTRACKER_WORKERS"] == "1"
    assert _container(prod, "user")["resources"]["requests"]["cpu"] == "1"


def _images(docs: list[Doc]) -> dict[str, str]:
    return {c["name"]: c["image"] for d in _of(docs, "Deployment").values()
            for c in d["spec"]["template"]["spec"]["containers"]}


def test_images_are_the_release_and_the_envoy_the_edge_is_tested_with(docs: list[Doc]) -> None:
    release = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    reported = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True)
    match = re.search(r"/(\d+\.\d+\.\d+)/", reported.stdout)
    assert match, reported.stdout
    images = _images(docs)
    assert images.pop("envoy") == f"envoyproxy/envoy:v{match.group(1)}"
    assert images == dict.fromkeys(SERVICES, f"fittracker/backend:{release}")


# ------------------------------------------------------------------------------------------------
# The edge's ConfigMap: generated, packed by kustomize, a configuration Envoy accepts
# ------------------------------------------------------------------------------------------------


def _edge_config_files(docs: list[Doc]) -> dict[str, bytes]:
    """The files the edge pod sees under its working directory, by path, from the rendered ConfigMap."""
    volumes = {v["name"]: v for v in _of(docs, "Deployment")["edge"]["spec"]["template"]["spec"]["volumes"]}
    source = volumes["config"]["configMap"]
    configmap = _of(docs, "ConfigMap")[source["name"]]
    contents = {k: v.encode() for k, v in configmap.get("data", {}).items()}
    contents |= {k: base64.b64decode(v) for k, v in configmap.get("binaryData", {}).items()}
    return {item["path"]: contents[item["key"]] for item in source["items"]}


def test_the_edge_mounts_the_generated_config_its_inputs_and_nothing_else(docs: list[Doc]) -> None:
    files = _edge_config_files(docs)
    assert files == {
        "envoy.yaml": (ROOT / edge_configmap.EDGE_DIR / "envoy.yaml").read_bytes(),
        str(envoy_config.DESCRIPTOR): (ROOT / envoy_config.DESCRIPTOR).read_bytes(),
        str(envoy_config.ETAG_LUA): (ROOT / envoy_config.ETAG_LUA).read_bytes(),
    }
    (envoy,) = _of(docs, "Deployment")["edge"]["spec"]["template"]["spec"]["containers"]
    assert envoy["args"][:2] == ["-c", "envoy.yaml"]
    # The config names its files relative to the working directory, where the ConfigMap is mounted.
    assert {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}["config"] == envoy["workingDir"]


def test_the_committed_cluster_config_is_fresh() -> None:
    assert edge_configmap.stale(edge_configmap.render()) == [], "run `make gen`"


def test_the_cluster_edge_trusts_exactly_the_ingress_gateway_for_client_addresses(docs: list[Doc]) -> None:
    config = yaml.safe_load(_edge_config_files(docs)["envoy.yaml"])
    (listener,) = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["use_remote_address"] is True
    assert hcm["xff_num_trusted_hops"] == 1
    local = yaml.safe_load((ROOT / envoy_config.OUTPUT).read_text())["static_resources"]["listeners"][0]
    assert "xff_num_trusted_hops" not in local["filter_chains"][0]["filters"][0]["typed_config"]


@pytest.mark.parametrize("hops", ["-1", "many", "11"])
def test_the_trusted_hops_option_refuses_a_bad_count_by_name(hops: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "envoy_config.py"), "--xff-num-trusted-hops", hops, "--output", "-"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "--xff-num-trusted-hops" in result.stderr


def test_envoy_accepts_the_config_as_the_pod_sees_it(tmp_path: Path, prod: list[Doc]) -> None:
    for path, content in _edge_config_files(prod).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(content)
    # The JWKS comes from a Secret mounted at an absolute path: point the copy at a scratch one.
    keys = tmp_path / "keys"
    load_or_create_signing_key(keys, allow_create=True)
    config = tmp_path / "envoy.yaml"
    config.write_text(config.read_text().replace(edge_configmap.KEYS_DIR, str(keys)))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", "envoy.yaml", "--log-level", "error", "--disable-hot-restart"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------
# Secrets: referenced, never contained
# ------------------------------------------------------------------------------------------------

#: Environment variables whose value is a credential, or a URL that may carry one: only by reference.
CREDENTIAL_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE|CREDENTIAL|_KEY$|_KEY_FILE_CONTENT|MONGO_URL|"
                            r"REDIS_URL|DATABASE_URL|DSN")
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/@:]*:[^\s/@]+@", re.IGNORECASE)
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
#: A JWK's private part: "d" beside a "kty".
PRIVATE_JWK = re.compile(r'"kty"[\s\S]*"d"\s*:|"d"\s*:[\s\S]*"kty"')


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}[{index}]")
    elif isinstance(value, str):
        yield where, value


def secret_leaks(docs: list[Doc]) -> list[str]:
    """Where the documents contain a secret value rather than a reference to one."""
    found: list[str] = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Secret":
            found.append(f"{name}: Secrets are provisioned out of band, never rendered")
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for env in container.get("env", []):
                if "value" in env and CREDENTIAL_ENV.search(env["name"]):
                    found.append(f"{name}: {env['name']} has a literal value; use secretKeyRef")
        strings = list(_strings(doc, name))
        strings += [(f"{name}.binaryData.{key}", base64.b64decode(data).decode("latin-1"))
                    for key, data in doc.get("binaryData", {}).items()]
        for where, text in strings:
            for pattern, what in ((URL_WITH_PASSWORD, "a URL with a password"), (PRIVATE_KEY, "a private key"),
                                  (PRIVATE_JWK, "a private JWK")):
                if pattern.search(text):
                    found.append(f"{where}: {what}")
    return found


def test_no_rendered_manifest_contains_a_secret_value(docs: list[Doc]) -> None:
    assert secret_leaks(docs) == []


@pytest.mark.parametrize("service", SERVICES)
def test_credentials_reach_each_service_by_reference(docs: list[Doc], service: str) -> None:
    env = _env(docs, service)
    for name in ("FITTRACKER_MONGO_URL", "FITTRACKER_REDIS_URL"):
        assert env[name]["secretKeyRef"]["name"] == "fittracker-datastores"
    volumes = {v["name"]: v for v in _of(docs, "Deployment")[service]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["jwt-keys"]["secret"]["secretName"] == (
        "fittracker-jwt-signing" if service == "user" else "fittracker-jwks")


def test_notification_providers_come_from_optional_secrets(docs: list[Doc]) -> None:
    container = _container(docs, "notification")
    assert container["envFrom"] == [{"secretRef": {"name": "fittracker-notification-providers", "optional": True}}]
    volumes = {v["name"]: v for v in _of(docs, "Deployment")["notification"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["provider-keys"]["secret"]["secretName"] == "fittracker-notification-keys"
    assert volumes["provider-keys"]["secret"]["optional"] is True


def _plant_env(docs: list[Doc], name: str, value: str) -> None:
    _container(docs, "notification")["env"].append({"name": name, "value": value})


def _plant_configmap(docs: list[Doc], text: str) -> None:
    docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": text}})


_PEM = "-----BEGIN EC " + "PRIVATE KEY-----\nMHcCAQEEI...\n-----END EC PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("plant", "complaint"),
    [
        (lambda d: d.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fittracker-datastores"},
                             "stringData": {"redis-url": "redis://redis:6379/0"}}), "Secret/fittracker-datastores"),
        (lambda d: _plant_env(d, "FITTRACKER_REDIS_URL", "redis://redis:6379/0"), "FITTRACKER_REDIS_URL"),
        (lambda d: _plant_env(d, "FITTRACKER_SMTP_PASSWORD", "hunter2hunter2"), "FITTRACKER_SMTP_PASSWORD"),
        (lambda d: _plant_env(d, "FITTRACKER_OTLP_ENDPOINT", "https://otel:s3cret@collector:4317"),
         "a URL with a password"),
        (lambda d: _plant_configmap(d, _PEM), "a private key"),
        (lambda d: _plant_configmap(d, json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "d": "AAAA"}]})),
         "a private JWK"),
    ],
    ids=["secret-object", "datastore-url", "password", "url-userinfo", "pem-key", "jwk-private"],
)
def test_the_secret_scan_finds_a_planted_value(prod: list[Doc], plant: Any, complaint: str) -> None:
    planted = copy.deepcopy(prod)
    plant(planted)
    assert any(complaint in leak for leak in secret_leaks(planted)), secret_leaks(planted)


# ------------------------------------------------------------------------------------------------
# Istio: traffic and who may call whom
# ------------------------------------------------------------------------------------------------


def _host(service: str) -> str:
    return f"{service}.{NAMESPACE}.svc.cluster.local"


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_routing_and_an_mtls_destination_rule(docs: list[Doc], service: str) -> None:
    vs = _of(docs, "VirtualService")[service]["spec"]
    assert vs["hosts"] == [_host(service)]
    for route in vs["http"]:
        assert route["route"][0]["destination"] == {"host": _host(service), "port": {"number": PORTS[service]}}
        assert "connect-failure" in route["retries"]["retryOn"]
    dr = _of(docs, "DestinationRule")[service]["spec"]
    assert dr["host"] == _host(service)
    assert dr["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"
    assert dr["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"] > 0
    assert dr["trafficPolicy"]["outlierDetection"]


def test_mtls_is_strict_for_the_whole_namespace(docs: list[Doc]) -> None:
    peer = _of(docs, "PeerAuthentication")
    assert len(peer) == 1
    (only,) = peer.values()
    assert "selector" not in only["spec"]
    assert only["spec"]["mtls"]["mode"] == "STRICT"


def test_policy_principals_name_existing_service_accounts(docs: list[Doc]) -> None:
    accounts = _of(docs, "ServiceAccount")
    for name, policy in _of(docs, "AuthorizationPolicy").items():
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


def test_each_service_admits_exactly_the_edge_and_its_callers_in_code(docs: list[Doc]) -> None:
    code = _callers_in_code()
    assert code["user"] >= {"ai", "notification"}, "the scan no longer finds the known calls"
    policies = _of(docs, "AuthorizationPolicy")
    assert policies["allow-nothing"]["spec"] == {"action": "ALLOW"}, "default deny: ALLOW with no rules"
    for service in SERVICES:
        spec = policies[service]["spec"]
        assert spec["selector"]["matchLabels"] == {"app": service}
        assert spec["action"] == "ALLOW"
        principals = {p for rule in spec["rules"] for src in rule["from"] for p in src["source"]["principals"]}
        expected = {f"cluster.local/ns/{NAMESPACE}/sa/{c}" for c in {"edge", *code[service]}}
        assert principals == expected, service


def test_callers_are_configured_with_the_addresses_of_what_they_call(docs: list[Doc]) -> None:
    code = _callers_in_code()
    for callee, callers in code.items():
        for caller in callers:
            address = _env(docs, caller)[f"FITTRACKER_{callee.upper()}_ADDR"]
            assert address == f"{_host(callee)}:{PORTS[callee]}"


def test_the_public_host_reaches_the_edge_through_the_gateway(docs: list[Doc]) -> None:
    gateway = _of(docs, "Gateway")["edge"]["spec"]
    edge_vs = _of(docs, "VirtualService")["edge"]["spec"]
    assert edge_vs["gateways"] == ["edge"]
    assert set(edge_vs["hosts"]) <= {h for server in gateway["servers"] for h in server["hosts"]}
    edge_port = _of(docs, "Service")["edge"]["spec"]["ports"][0]["port"]
    assert edge_vs["http"][0]["route"][0]["destination"] == {"host": _host("edge"), "port": {"number": edge_port}}


def test_tracing_samples_a_share_of_requests(docs: list[Doc]) -> None:
    (telemetry,) = _of(docs, "Telemetry").values()
    (tracing,) = telemetry["spec"]["tracing"]
    assert 0 < tracing["randomSamplingPercentage"] <= 100
