"""The repository's tools as modules for the tests: ``tools/*.py`` are scripts, not a package."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """The module of ``tools/<name>.py``, imported once per process (later calls return the same module).

    ``tools/`` is on ``sys.path`` while it imports, for the tools that import each other (and so that a tool's
    functions pickle by module name into worker processes), and only then.
    """
    path = TOOLS / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no tool {name!r}: {path} does not exist")
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != path:
        raise ImportError(f"a module {name!r} that is not {path} is already imported ({loaded!r})")
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(TOOLS))
