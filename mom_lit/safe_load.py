"""Reading checkpoint files without running code.

A ``torch.save`` file is a pickle: unpickled freely, it may call any importable function (a ``__reduce__`` that
runs a shell command). Every checkpoint mom_lit reads goes through :func:`load_checkpoint_file`, which unpickles
with ``weights_only=True``: tensors, plain Python values (dict, list, tuple, str, numbers, None), the containers
and classes torch allows by default, and :data:`SAFE_TYPES`, the project's own types that may appear in a
checkpoint. Anything else is refused with :class:`UnsafeCheckpointError` naming the file and what it holds.

The Lightning checkpoints of this project hold tensors, ``OrderedDict`` (module and optimizer states), plain
values (hyper-parameters, loop progress, the data module's loader position, callbacks' states) and, when a data
module was built in Python with a ``pathlib`` path, that path.
"""

from __future__ import annotations

import contextlib
import pathlib
import pickle
from collections.abc import Iterator
from typing import Any

import torch

from mom_lit.config import MoMConfig

__all__ = ["SAFE_TYPES", "UnsafeCheckpointError", "load_checkpoint_file", "refusal", "safe_checkpoint_types"]

# Constructed by the restricted unpickler from their stored state only: no code of the file's choosing runs.
SAFE_TYPES: tuple[type, ...] = (MoMConfig, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                                pathlib.PureWindowsPath)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds an object whose loading would run code (not a tensor, a plain value or one of
    :data:`SAFE_TYPES`)."""


@contextlib.contextmanager
def safe_checkpoint_types() -> Iterator[None]:
    """Allows :data:`SAFE_TYPES` to ``torch.load(..., weights_only=True)`` inside the block only."""
    with torch.serialization.safe_globals(list(SAFE_TYPES)):
        yield


def refusal(path: Any, error: BaseException) -> UnsafeCheckpointError | None:
    """The error to raise for ``path`` when ``error`` is the restricted unpickler refusing its content, else None
    (a damaged file, for instance, keeps its own error)."""
    message = str(error)
    if not isinstance(error, pickle.UnpicklingError) or "Weights only load failed" not in message:
        return None
    # torch's message names the refused global in a line "... WeightsUnpickler error: Unsupported global: ...".
    detail = next((line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip().rstrip(".")
                   for line in message.splitlines() if "WeightsUnpickler error:" in line),
                  "an object outside the allowed types")
    allowed = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in SAFE_TYPES)
    return UnsafeCheckpointError(
        f"refusing to load checkpoint {path}: it holds something other than tensors, plain values and mom_lit's "
        f"own types ({allowed}), and loading it could run code ({detail})"
    )


def load_checkpoint_file(path: Any, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` allowing :data:`SAFE_TYPES`; raises :class:`UnsafeCheckpointError`
    naming ``path`` for any other object. ``mmap`` maps the tensors' storage instead of reading it (a cheap way to
    check a file's content)."""
    with safe_checkpoint_types():
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            refused = refusal(path, err)
            if refused is None:
                raise
            raise refused from None
