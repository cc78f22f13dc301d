"""Lay out the third-party .proto files the contracts import, taken from installed packages.

buf's remote registry is unreachable here, so the imports come from local files:
``google/api/*.proto`` and ``google/rpc/*.proto`` from the googleapis-common-protos wheel, and
``buf/validate/validate.proto`` from the protovalidate source distribution (its wheel ships only
the Python runtime, whose generated ``validate_pb2`` module we produce ourselves from this file).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tarfile
import tempfile
import tomllib
import urllib.request
from importlib import metadata
from pathlib import Path

GOOGLE_API_FILES = ("annotations.proto", "http.proto", "field_behavior.proto", "resource.proto")
#: The error model: the edge needs these in its descriptor set to render error details as JSON.
GOOGLE_RPC_FILES = ("status.proto", "error_details.proto", "code.proto")


def copy_googleapis(dest: Path) -> None:
    """Copy the google/api annotations and google/rpc error types shipped by googleapis-common-protos."""
    import google.api  # noqa: PLC0415 - only needed when laying out the files
    import google.rpc  # noqa: PLC0415

    for package, names in ((google.api, GOOGLE_API_FILES), (google.rpc, GOOGLE_RPC_FILES)):
        src = Path(next(iter(package.__path__)))
        out = dest / "google" / src.name
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(src / name, out / name)


def locked_sdist(package: str, lock: Path) -> tuple[str, str]:
    """The (url, sha256) of ``package``'s source distribution as ``uv.lock`` records it."""
    with lock.open("rb") as f:
        entries = tomllib.load(f)["package"]
    entry = next((e for e in entries if e["name"] == package), None)
    if entry is None or "sdist" not in entry:
        raise SystemExit(f"{lock} records no source distribution for {package}; run `make lock`")
    algorithm, _, digest = entry["sdist"]["hash"].partition(":")
    if algorithm != "sha256":
        raise SystemExit(f"{lock}: unexpected hash algorithm {algorithm!r} for {package}")
    return entry["sdist"]["url"], digest


def download_verified(url: str, sha256: str, out: Path) -> None:
    """Fetch ``url`` into ``out``, refusing bytes whose digest is not the locked one."""
    with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 - the URL comes from uv.lock
        data = response.read()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise SystemExit(f"{url}: sha256 {actual} does not match the locked {sha256}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)


def copy_validate_proto(dest: Path, cache: Path, lock: Path) -> None:
    """Extract buf/validate/validate.proto from the sdist of the installed protovalidate.

    The sdist is the one ``uv.lock`` names, checked against its hash, so the contract rules we compile
    are exactly those of the locked runtime.
    """
    version = metadata.version("protovalidate")
    out = dest / "buf" / "validate" / "validate.proto"
    stamp = dest / "buf" / "validate" / ".version"
    if out.exists() and stamp.exists() and stamp.read_text() == version:
        return
    url, sha256 = locked_sdist("protovalidate", lock)
    if not url.endswith(f"protovalidate-{version}.tar.gz"):
        raise SystemExit(f"installed protovalidate {version} is not the locked one ({url}); run `make venv`")
    sdist = cache / f"protovalidate-{version}.tar.gz"
    if not sdist.exists() or hashlib.sha256(sdist.read_bytes()).hexdigest() != sha256:
        download_verified(url, sha256, sdist)
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("proto/buf/validate/validate.proto"))
        data = tar.extractfile(member)
        assert data is not None, "validate.proto is a regular file in the sdist"
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as tmp:
            tmp.write(data.read())
        Path(tmp.name).replace(out)
    stamp.write_text(version)


def main() -> None:
    """Entry point: ``python tools/proto_deps.py DEST``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dest", type=Path, help="directory to lay the imports out in")
    parser.add_argument("--cache", type=Path, default=Path(".cache/downloads"))
    parser.add_argument("--lock", type=Path, default=Path("uv.lock"))
    args = parser.parse_args()
    copy_googleapis(args.dest)
    copy_validate_proto(args.dest, args.cache, args.lock)


if __name__ == "__main__":
    main()
