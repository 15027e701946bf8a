"""The package list of pyproject.toml names every package of the source tree (an unlisted one would be missing
from an installed, non-editable mom_lit)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "mom_lit").rglob("__init__.py")
             if "callbacks" not in init.relative_to(ROOT).parts}
    # Mapped from top-level folders (package-dir): mom_lit.callbacks from callbacks/, mom_lit.configs from configs/.
    found |= {"mom_lit.callbacks", "mom_lit.configs"}
    assert listed == found
