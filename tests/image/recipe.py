"""The image recipe (``tools/image/recipe.env``) as the tests read it."""

from __future__ import annotations

import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE_FILE = ROOT / "tools" / "image" / "recipe.env"


def read_recipe(path: Path = RECIPE_FILE) -> dict[str, str]:
    """``NAME=value`` lines of the recipe, with shell quoting removed; comments and blanks skipped."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, raw = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: not NAME=value: {line!r}")
        (values[name.strip()],) = shlex.split(raw) or [""]
    return values


RECIPE = read_recipe()
