"""Run ``buf breaking`` against the contracts of an earlier commit.

The reference is ``$BUF_BREAKING_AGAINST`` when set; otherwise ``main`` from a feature branch,
and the previous commit when on main itself (so every commit that lands is checked against the
one before it). buf cannot read the reference from git directly, because the imports it needs
come from installed packages rather than the remote registry; the reference's ``proto/`` and
``buf.yaml`` are exported to a scratch workspace that shares our local imports.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    """Run git in the repository and return its stripped output."""
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def reference() -> str | None:
    """The commit to compare with, or None when there is nothing earlier."""
    explicit = os.environ.get("BUF_BREAKING_AGAINST")
    if explicit:
        return explicit
    try:
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        if branch != "main" and git("rev-parse", "--verify", "--quiet", "main"):
            return "main"
        return git("rev-parse", "--verify", "--quiet", "HEAD~1")
    except subprocess.CalledProcessError:
        return None


def main() -> int:
    """Export the reference's contracts and run buf breaking against them."""
    ref = reference()
    if ref is None:
        print("buf breaking: no earlier commit to compare with; skipped")
        return 0
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "--", "proto", "buf.yaml"],
        cwd=ROOT, capture_output=True, check=False,
    )
    if archive.returncode != 0:
        print(f"buf breaking: {ref} has no contracts yet; skipped")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        (Path(tmp) / ".cache").mkdir()
        (Path(tmp) / ".cache" / "proto-deps").symlink_to(ROOT / ".cache" / "proto-deps")
        buf = Path(sys.executable).parent / "buf"
        print(f"==> buf breaking against {ref}")
        return subprocess.run([str(buf), "breaking", "--against", tmp], cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
