"""Paths that may be URLs: local folders through ``pathlib``, anything with a ``scheme://`` through fsspec.

litdata streams prepared splits from object storage itself (``s3://``, ``gs://`` ...); what mom_lit reads
beforehand (metadata, to check the data before a run starts) goes through the URL's fsspec file system.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

import fsspec

__all__ = ["is_url", "join", "isdir", "isfile", "read_text"]


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path


def join(base: str | os.PathLike[str], *parts: str) -> str | Path:
    """``base/parts...``: a URL stays a string with its ``//`` intact (``Path`` would collapse it)."""
    if is_url(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return Path(base).joinpath(*parts)


def _fs(path: str) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(path)


def isdir(path: str | os.PathLike[str]) -> bool:
    if is_url(path):
        fs, inner = _fs(str(path))
        return fs.isdir(inner)
    return Path(path).expanduser().is_dir()


def isfile(path: str | os.PathLike[str]) -> bool:
    if is_url(path):
        fs, inner = _fs(str(path))
        return fs.isfile(inner)
    return Path(path).expanduser().is_file()


def read_text(path: str | os.PathLike[str]) -> str:
    if is_url(path):
        fs, inner = _fs(str(path))
        with fs.open(inner, "r") as f:
            return f.read()
    return Path(path).read_text()
