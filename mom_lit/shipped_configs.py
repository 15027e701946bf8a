"""The configs shipped with mom_lit, addressable by name: ``mom-lit fit --config quickstart``.

They are the YAML files of the repository's ``configs/`` folder, installed as the package data
``mom_lit/configs``. A ``--config`` value naming an existing file is used as given; otherwise a bare name
(``quickstart`` or ``quickstart.yaml``) selects the shipped config of that name. Paths inside a config
(``data_dir``, a logger's ``save_dir``) stay relative to the working directory, however the config was found.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["UnknownConfigError", "resolve_config", "resolve_config_args", "shipped_config_dir",
           "shipped_config_names"]

CONFIG_FLAGS = ("--config", "-c")
SUFFIXES = (".yaml", ".yml")


class UnknownConfigError(ValueError):
    """A ``--config`` value that is neither a file nor the name of a shipped config."""


def shipped_config_dir() -> Path:
    """The folder of the shipped configs: the package data of an installed wheel, else the ``configs/`` folder
    beside the package in a source checkout (also what an editable install imports)."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def shipped_config_names() -> list[str]:
    """The names ``--config`` accepts besides paths, sorted."""
    return sorted(path.stem for path in shipped_config_dir().glob("*.yaml"))


def _is_inline_yaml(value: str) -> bool:
    # jsonargparse also takes the config itself as the value: `--config '{trainer: {max_steps: 2}}'`.
    return any(mark in value for mark in ("{", "\n", ": "))


def resolve_config(value: str) -> str:
    """The path ``--config value`` reads: ``value`` itself if it is a file (or inline YAML), else the shipped
    config it names. Raises :class:`UnknownConfigError`, naming the shipped configs, for anything else."""
    if Path(value).expanduser().is_file() or _is_inline_yaml(value):
        return value
    path = Path(value)
    if path.name == value:  # a bare name, not a path
        stem = path.stem if path.suffix in SUFFIXES else value
        shipped = shipped_config_dir() / f"{stem}.yaml"
        if shipped.is_file():
            return str(shipped)
    names = ", ".join(shipped_config_names())
    raise UnknownConfigError(f"--config {value}: no such file, and no shipped config of that name "
                             f"(shipped: {names})")


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every ``--config``/``-c``/``--config=`` resolved by :func:`resolve_config`."""
    out: list[str] = []
    expect_value = False
    for arg in argv:
        if expect_value:
            out.append(resolve_config(arg))
            expect_value = False
        elif arg in CONFIG_FLAGS:
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out
