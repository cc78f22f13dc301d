"""Read and export the OCI image layout that ``tools/image/build.sh`` writes.

``python tools/image/layout.py size <layout> <tag>`` prints the compressed size (what a registry stores
and a node pulls) per layer; ``python tools/image/layout.py archive <layout> <tag> <reference> <tar>``
writes the layout as an oci-archive whose one image is named ``<reference>``
(``fittracker/backend:<tag>``), the name ``podman load`` and ``skopeo copy`` give it.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
REF_NAME = "org.opencontainers.image.ref.name"


def index_entry(layout: Path, tag: str) -> dict[str, Any]:
    """The entry of the layout's index.json that carries ``tag``."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            found: dict[str, Any] = entry
            return found
    raise SystemExit(f"no tag {tag!r} in {layout / 'index.json'}")


def blob(layout: Path, digest: str) -> Path:
    """Where a blob with this ``algorithm:hex`` digest lives in the layout."""
    algorithm, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algorithm / hexdigest


def describe(layout: Path, tag: str) -> str:
    """One line: the compressed size of the image and of each layer."""
    manifest = json.loads(blob(layout, index_entry(layout, tag)["digest"]).read_text())
    layers = [int(layer["size"]) for layer in manifest["layers"]]
    sizes = " + ".join(f"{size / MIB:.1f}" for size in layers)
    return f"{sum(layers) / MIB:.1f} MiB compressed ({len(layers)} layers: {sizes} MiB)"


def write_archive(layout: Path, tag: str, reference: str, out: Path) -> None:
    """Write the image tagged ``tag`` as an oci-archive naming it ``reference``, and nothing else."""
    entry = dict(index_entry(layout, tag))
    entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: reference}
    manifest_path = blob(layout, entry["digest"])
    manifest = json.loads(manifest_path.read_text())
    blobs = [manifest_path, blob(layout, manifest["config"]["digest"])]
    blobs += [blob(layout, layer["digest"]) for layer in manifest["layers"]]
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [entry]}
    with tarfile.open(out, "w") as tar:
        top = {"oci-layout": (layout / "oci-layout").read_bytes(), "index.json": json.dumps(index).encode()}
        for name, data in top.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for path in blobs:
            tar.add(path, arcname=str(path.relative_to(layout)), recursive=False)


def main(argv: list[str]) -> None:
    """Dispatch ``size`` and ``archive``."""
    match argv:
        case ["size", layout, tag]:
            print(describe(Path(layout), tag))
        case ["archive", layout, tag, reference, out]:
            write_archive(Path(layout), tag, reference, Path(out))
        case _:
            raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
