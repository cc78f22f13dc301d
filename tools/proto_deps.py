"""Lay out the third-party .proto files the contracts import, taken from installed packages.

buf's remote registry is unreachable here, so the imports come from local files:
``google/api/*.proto`` and ``google/rpc/*.proto`` from the googleapis-common-protos wheel, and
``buf/validate/validate.proto`` from the protovalidate source distribution (its wheel ships only
the Python runtime, whose generated ``validate_pb2`` module we produce ourselves from this file).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
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


def copy_validate_proto(dest: Path, cache: Path) -> None:
    """Extract buf/validate/validate.proto from the sdist of the installed protovalidate."""
    version = metadata.version("protovalidate")
    out = dest / "buf" / "validate" / "validate.proto"
    stamp = dest / "buf" / "validate" / ".version"
    if out.exists() and stamp.exists() and stamp.read_text() == version:
        return
    cache.mkdir(parents=True, exist_ok=True)
    sdists = list(cache.glob(f"protovalidate-{version}.tar.gz"))
    if not sdists:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"protovalidate=={version}", "--dest", str(cache)],
            check=True,
        )
        sdists = list(cache.glob(f"protovalidate-{version}.tar.gz"))
    with tarfile.open(sdists[0]) as tar:
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
    args = parser.parse_args()
    copy_googleapis(args.dest)
    copy_validate_proto(args.dest, args.cache)


if __name__ == "__main__":
    main()
