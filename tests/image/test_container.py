"""The built image, run by podman the way the manifests run it: the user service serves and stops cleanly.

``make image-test`` builds the image and runs these with ``FITTRACKER_IMAGE_ARCHIVE`` naming the
oci-archive; without it (plain ``make test``) they are skipped, since the build takes about a minute.
The container gets what a pod gets in mesh/base/k8s: uid/gid 10001, a read-only root filesystem with
writable tmpfs volumes only at the data directory and /tmp, production settings with the signing key
mounted read-only, and the manifests' command. Podman keeps its images and containers in a directory
of the test's own, so the machine's container storage is left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fittracker.user.v1 import user_service_pb2, user_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.auth import JWKS_FILE, SIGNING_KEY_FILE, load_or_create_signing_key
from services.runtime.settings import SERVICES
from tests.image.recipe import RECIPE
from tests.support import bearer

ARCHIVE = os.environ.get("FITTRACKER_IMAGE_ARCHIVE", "")
pytestmark = pytest.mark.skipif(not ARCHIVE, reason="needs the built image: make image-test")

UID, GID = int(RECIPE["APP_UID"]), int(RECIPE["APP_GID"])
KEYS_DIR = "/etc/fittracker/keys"
#: The container's /tmp, a volume of the image like the data directory.
CONTAINER_TMP = "/tmp"  # noqa: S108  # a path inside the container, not a temporary file here
#: Longer than the drain notice plus the grace period the container is started with; podman sends
#: SIGKILL only after it, so exit code 0 means the service stopped by itself within its grace.
STOP_TIMEOUT_SECONDS = 30
#: Bound on every wait for the container: start-up, health, each call.
DEADLINE_SECONDS = 60.0


@dataclass(frozen=True)
class Podman:
    """The podman command line, pointed at a storage directory of its own."""

    root: Path

    def args(self, *args: str) -> list[str]:
        # runc, not crun: crun refuses hosts with hybrid cgroups (v1 controllers + a v2 mount).
        return ["podman", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                "--runtime", "runc", *args]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.args(*args), capture_output=True, text=True, check=check,
                              timeout=DEADLINE_SECONDS * 2)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    tool = Podman(tmp_path_factory.mktemp("podman"))
    yield tool
    tool("rm", "--all", "--force", check=False)
    tool("rmi", "--all", "--force", check=False)
    shutil.rmtree(tool.root, ignore_errors=True)


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """The image loaded from the archive ``make image`` wrote; its reference."""
    loaded = podman("load", "--input", ARCHIVE).stdout
    reference = loaded.strip().splitlines()[-1].removeprefix("Loaded image: ").split(",")[0]
    assert f"/{RECIPE['IMAGE_NAME']}:" in reference, loaded
    return reference


def run_flags(keys: Path, data: Path) -> list[str]:
    """What the Deployments in mesh/base/k8s give the container."""
    return [
        "--user", f"{UID}:{GID}",
        "--read-only", "--read-only-tmpfs=false",
        "--volume", f"{data}:{RECIPE['DATA_DIR']}:rw",
        "--tmpfs", f"{CONTAINER_TMP}:rw,size=64m,mode=1777",
        "--volume", f"{keys}:{KEYS_DIR}:ro",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        # Explicit limits: podman's defaults are above what a process without CAP_SYS_RESOURCE may set.
        "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
        "--env", "FITTRACKER_ENVIRONMENT=production",
        "--env", f"FITTRACKER_PAGE_TOKEN_KEY={secrets.token_hex(32)}",
        "--env", f"FITTRACKER_JWT_KEYS_DIR={KEYS_DIR}",
        "--env", "FITTRACKER_GRACE_SECONDS=10",
    ]


@pytest.fixture(scope="module")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A provisioned key pair, owned and readable like the Secret volume (root, group 10001, 0440)."""
    keys = tmp_path_factory.mktemp("keys")
    load_or_create_signing_key(keys, allow_create=True)
    keys.chmod(0o755)
    for name in (SIGNING_KEY_FILE, JWKS_FILE):
        os.chown(keys / name, 0, GID)
        (keys / name).chmod(0o440)
    return keys


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty directory for the data volume, mode 0777 like the emptyDir Kubernetes makes."""
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    return data


def test_image_config_runs_python_as_the_service_account(podman: Podman, image: str) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{GID}"
    assert config["Cmd"] == ["python", "-m", "services.user"]
    assert not config.get("Entrypoint"), "no shell or init in front of python: it must be PID 1"
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["Volumes"]) == {RECIPE["DATA_DIR"], CONTAINER_TMP}


def test_every_service_imports_in_the_image(
    podman: Podman, image: str, signing_keys: Path, data_dir: Path
) -> None:
    modules = ", ".join(f"services.{name}" for name in SERVICES)
    probe = (
        "import os, sys\n"
        f"import {modules}\n"
        "print(os.getpid(), os.getuid(), os.getgid(), '%d.%d' % sys.version_info[:2])\n"
        "open('/app/probe', 'w')\n"
    )
    result = podman("run", "--rm", *run_flags(signing_keys, data_dir), image, "python", "-c", probe, check=False)
    assert result.stdout.split() == ["1", str(UID), str(GID), RECIPE["PYTHON_VERSION"]], result.stderr
    assert "Read-only file system: '/app/probe'" in result.stderr


def test_build_stage_tools_stay_out_of_the_image(
    podman: Podman, image: str, signing_keys: Path, data_dir: Path
) -> None:
    probe = "for t in uv pip pip3 gcc cc apt-get mmdebstrap; do command -v $t && exit 1; done; echo clean"
    result = podman("run", "--rm", *run_flags(signing_keys, data_dir), "--entrypoint", "/bin/sh", image, "-c", probe,
                    check=False)
    assert result.stdout.strip() == "clean", result.stdout


def test_user_service_serves_register_and_login_then_stops_on_sigterm(
    podman: Podman, image: str, signing_keys: Path, data_dir: Path
) -> None:
    name = f"user-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, *run_flags(signing_keys, data_dir), "--publish", "127.0.0.1::50051",
           image, "python", "-m", "services.user")
    host_port = podman("port", name, "50051/tcp").stdout.strip().rsplit(":", 1)[1]
    with grpc.insecure_channel(f"127.0.0.1:{host_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # The published port accepts connections before the service listens; waiting for ready covers it.
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_SECONDS, wait_for_ready=True)
        except grpc.RpcError:
            output = podman("logs", name, check=False)
            pytest.fail(f"the service never answered health checks; its output:\n{output.stdout}{output.stderr}")
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        users = user_service_pb2_grpc.UserServiceStub(channel)
        email = f"{uuid.uuid4().hex[:12]}@example.com"
        registered = users.Register(
            user_service_pb2.RegisterRequest(email=email, password="correct horse battery", display_name="Ada"),
            timeout=DEADLINE_SECONDS,
        )
        assert registered.user.email == email
        tokens = users.Login(
            user_service_pb2.LoginRequest(email=email, password="correct horse battery"), timeout=DEADLINE_SECONDS
        ).tokens
        me = users.GetUser(user_service_pb2.GetUserRequest(name="users/me"), timeout=DEADLINE_SECONDS,
                           metadata=bearer(tokens.access_token))
        assert me.name == registered.user.name

        with pytest.raises(grpc.RpcError) as wrong:
            users.Login(user_service_pb2.LoginRequest(email=email, password="not the password"),
                        timeout=DEADLINE_SECONDS)
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED

    podman("stop", "--time", str(STOP_TIMEOUT_SECONDS), name)
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    result = podman("logs", name)
    logs = result.stdout + result.stderr
    assert state["ExitCode"] == 0, logs
    messages = [json.loads(line)["msg"] for line in logs.splitlines() if line.startswith("{")]
    assert messages[-2:] == ["draining", "stopped"], logs
    # The embedded store went to the data volume, the one writable place besides /tmp.
    assert (data_dir / "user.sqlite3").exists()
