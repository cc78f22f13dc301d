"""Write the cluster edge's configuration into mesh/base/edge/, where kustomize makes a ConfigMap of it.

The edge in a cluster runs the same generated config as ``make up``, rendered by
``tools/envoy_config.py`` for the cluster's topology (``CLUSTER_ARGS``: the Services' names, the
signing keys' Secret mount, one trusted proxy in front). kustomize reads files only from inside
its root, so the descriptor set and the ETag filter are copied beside the rendered envoy.yaml; the
configMapGenerator in ``mesh/base/kustomization.yaml`` then packs all three, and its name hash rolls
the edge whenever one of them changes.

``python tools/edge_configmap.py`` (part of ``make gen``) writes the three files; ``--check`` (part
of ``make check-gen``) fails when any committed copy differs from what would be written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tools import envoy_config

ROOT = envoy_config.ROOT
EDGE_DIR = Path("mesh/base/edge")
NAMESPACE = "fittracker"
#: Where mesh/base/k8s/edge.yaml mounts the Secret fittracker-jwks.
KEYS_DIR = "/etc/fittracker/keys"

#: The cluster's rendering. Paths stay relative: the edge's working directory is the ConfigMap's
#: mount, laid out like the repository (envoy/generated/..., envoy/lua/...).
CLUSTER_ARGS: tuple[str, ...] = (
    "--listen-address", "0.0.0.0",  # noqa: S104  # the pod's interface, reached through its sidecar
    "--keys-dir", KEYS_DIR,
    "--descriptor-path", str(envoy_config.DESCRIPTOR),
    # The Istio ingress gateway appends the client's address to X-Forwarded-For: trust that one entry.
    "--xff-num-trusted-hops", "1",
    # The web app's origin; other browser origins are refused by the edge itself.
    "--cors-origin", "https://app.fittracker.app",
    *(arg for domain, port in envoy_config.BASE_PORTS.items()
      for arg in ("--upstream", f"{domain}={domain}.{NAMESPACE}.svc.cluster.local:{port}")),
)


def render() -> dict[str, bytes]:
    """The files of the edge's ConfigMap by name, as they should be committed."""
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "envoy.yaml"
        # No environment: what is committed must not depend on the shell that ran `make gen`.
        envoy_config.main([*CLUSTER_ARGS, "--output", str(config)], env={})
        rendered = config.read_bytes()
    return {
        "envoy.yaml": rendered,
        envoy_config.DESCRIPTOR.name: (ROOT / envoy_config.DESCRIPTOR).read_bytes(),
        envoy_config.ETAG_LUA.name: (ROOT / envoy_config.ETAG_LUA).read_bytes(),
    }


def stale(files: dict[str, bytes]) -> list[str]:
    """Names under EDGE_DIR that are missing or differ from ``files``."""
    return [name for name, content in files.items()
            if not (ROOT / EDGE_DIR / name).is_file() or (ROOT / EDGE_DIR / name).read_bytes() != content]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python tools/edge_configmap.py [--check]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the committed files are stale")
    args = parser.parse_args(argv)
    files = render()
    if args.check:
        outdated = stale(files)
        if outdated:
            print(f"{EDGE_DIR}: {', '.join(outdated)} stale; run `make gen` and commit them", file=sys.stderr)
            return 1
        print(f"{EDGE_DIR} is up to date")
        return 0
    (ROOT / EDGE_DIR).mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (ROOT / EDGE_DIR / name).write_bytes(content)
    print(f"wrote {', '.join(sorted(files))} into {EDGE_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
