"""The package list of pyproject.toml names every package of the source tree (an unlisted one would be missing
from an installed, non-editable mom_lit)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "mom_lit").rglob("__init__.py")
             if "callbacks" not in init.relative_to(ROOT).parts}  # mom_lit.callbacks comes from callbacks/
    found.add("mom_lit.callbacks")
    assert listed == found
