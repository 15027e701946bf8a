"""Fault tolerance of training: non-finite steps, atomic checkpoint files and preemption signals."""

from __future__ import annotations

import dataclasses
import glob
import os
import posixpath
import secrets
import signal
import tempfile
import threading
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint

from mom_lit.safe_load import UnsafeCheckpointError, load_checkpoint_file

NONFINITE_POLICIES = ("skip", "stop")


# Non-finite steps -------------------------------------------------------------------------------------------------
def step_is_finite(loss: torch.Tensor, grads: list[torch.Tensor]) -> bool:
    """Whether the loss and every gradient are finite, at the cost of one host synchronisation.

    Under DDP the gradients are already all-reduced here, so a non-finite value on any rank is seen by all of
    them and every rank takes the same decision.
    """
    flags = [torch.isfinite(loss.detach()).all()]
    if grads:
        # One norm per tensor is non-finite exactly when the tensor holds a NaN or an infinity.
        flags.append(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
    return bool(torch.stack(flags).all())


def describe_nonfinite(module: torch.nn.Module, loss: torch.Tensor, router_entropy: torch.Tensor | None,
                       limit: int = 5, batch: dict[str, torch.Tensor] | None = None) -> str:
    """Where a non-finite step came from: the layers whose router went non-finite, the first offending
    parameters and gradients and, given the step's ``batch``, the first layer whose router or memory went
    non-finite in a re-run of its forward pass (a non-finite memory in one layer makes every later router
    non-finite too). Only called once a step is known to be bad, so its cost does not matter."""
    parts = [f"loss={float(loss.detach()):g}"]
    if router_entropy is not None:
        bad_layers = torch.nonzero(~torch.isfinite(router_entropy)).flatten().tolist()
        if bad_layers:
            parts.append(f"router logits non-finite in layer(s) {bad_layers}")
    if batch is not None:
        input_ids, cu_seqlens = batch["input_ids"], batch.get("cu_seqlens")
        if cu_seqlens is not None:
            input_ids = input_ids.reshape(1, -1)  # (1, B*T) packed documents
        try:
            located = locate_nonfinite_forward(module, input_ids, cu_seqlens)
        except Exception as err:  # the report must not hide the non-finite step behind another error
            located = f"re-running the forward pass to locate it failed ({type(err).__name__}: {err})"
        parts.append(located or "the forward pass re-run with the current parameters is finite")
    bad_params = [n for n, p in module.named_parameters() if not torch.isfinite(p.detach()).all()]
    bad_grads = [n for n, p in module.named_parameters()
                 if p.grad is not None and not torch.isfinite(p.grad).all()]
    total = sum(1 for _ in module.parameters())
    for kind, names in (("parameters", bad_params), ("gradients", bad_grads)):
        if names:
            # In model order; a non-finite value deep in the model spreads to the gradients of all layers below.
            parts.append(f"non-finite {kind} in {len(names)} of {total} tensors, first: {names[:limit]}")
    return "; ".join(parts)


def _all_finite(value: Any) -> bool:
    """Whether every floating-point tensor in ``value`` (a tensor, a dataclass, a tuple or list) is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_all_finite(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list)):
        return all(_all_finite(v) for v in value)
    return True


@torch.no_grad()
def locate_nonfinite_forward(model: torch.nn.Module, input_ids: torch.Tensor,
                             cu_seqlens: torch.Tensor | None = None) -> str | None:
    """Runs the forward pass of a bad step again (eagerly, with the current parameters) and says where a
    non-finite value first appeared: the first MoM layer whose router output or memory output is non-finite,
    and the layers whose final memory state is. None when this forward pass is finite (the step went bad in
    the backward pass, or only with other parameters)."""
    from mom_lit.layer import MoMLayer  # the model imports this module's users: import late

    first: list[str] = []

    def check(where: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not first and not _all_finite(output):
            first.append(where)

    hooks = []
    for module in model.modules():
        if isinstance(module, MoMLayer):
            if module.router is not None:
                hooks.append(module.router.register_forward_hook(partial(check, f"layer {module.layer_idx} router")))
            hooks.append(module.register_forward_hook(partial(check, f"layer {module.layer_idx} memory output")))
    try:
        # forward(), not __call__: an in-place torch.compile would skip the hooks.
        out = model.forward(input_ids, cu_seqlens=cu_seqlens, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    bad_states = [i for i, state in enumerate(out.cache.layers) if not _all_finite(state)]
    if not first and not bad_states:
        return None
    parts = [f"first non-finite in the forward pass: {first[0]}"] if first else []
    if bad_states:
        parts.append(f"memory state non-finite in layer(s) {bad_states}")
    return ", ".join(parts)


class NonFiniteStepError(FloatingPointError):
    """Raised by the ``nonfinite="stop"`` policy."""


# Atomic checkpoint files ------------------------------------------------------------------------------------------
def url_filesystem(path: _PATH) -> tuple[Any, str] | None:
    """``(fsspec file system, path within it)`` for a URL of a non-local file system (``s3://``, ``memory://``),
    None for a local path or a ``file://`` URL."""
    text = os.fspath(path)
    if "://" not in text:
        return None
    fs, inner = fsspec.core.url_to_fs(text)
    return None if isinstance(fs, LocalFileSystem) else (fs, inner)


def local_path(path: _PATH) -> Path:
    """``path`` as a local path (a ``file://`` URL without its scheme)."""
    text = os.fspath(path)
    return Path(fsspec.core.url_to_fs(text)[1]) if text.startswith("file://") else Path(text)


def _temporary_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(8)}.tmp"


def _check_archive(stream: Any, path: str, size: int, expected: int) -> None:
    """Raises naming ``path`` unless ``size`` is the ``expected`` byte count and ``stream`` opens as a zip
    archive (its central directory, written last, is present)."""
    if size != expected:
        raise OSError(f"checkpoint {path} was not written completely: {size} of {expected} bytes stored")
    try:
        zipfile.ZipFile(stream).close()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise OSError(f"checkpoint {path} was not written completely ({err})") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, verifies it and renames it into place.

    Local paths (and ``file://`` URLs): the temporary file is fsynced, checked (its size and its zip
    directory, written last) and moved with ``os.replace``, which is atomic within one file system: a crash
    while saving leaves the previous ``last.ckpt`` intact instead of a truncated one. Other URLs (``s3://``,
    ``gs://``, ``memory://`` ...) go through their fsspec file system: the temporary object is written and
    checked the same way, then moved with the file system's ``mv`` (a rename where the file system has one, a
    server-side copy on object stores, where an object appears only once complete), and the final object is
    checked again. New files get the permissions the user's umask gives any new file. Loading a file that
    cannot be read raises an error naming it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        remote = url_filesystem(path)
        if remote is not None:
            self._save_remote(checkpoint, *remote, url=os.fspath(path))
            return
        path = local_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / _temporary_name(path.name)
        # 0o666 less the umask, as for any file the user creates (mkstemp would make it private to its owner).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
                written = f.tell()
            with open(tmp, "rb") as f:
                _check_archive(f, str(tmp), os.fstat(f.fileno()).st_size, written)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # The rename itself is durable only once the folder's entry is on disk.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        # Temporary files of this name left by a process killed while writing (one process writes a given
        # checkpoint path, so any other is stale).
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)

    @staticmethod
    def _save_remote(checkpoint: dict[str, Any], fs: Any, path: str, url: str) -> None:
        parent, name = posixpath.split(path.rstrip("/"))
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, _temporary_name(name))
        try:
            with fs.open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                written = f.tell()
            with fs.open(tmp, "rb") as f:
                _check_archive(f, url, fs.size(tmp), written)
            fs.mv(tmp, path)
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise
        with fs.open(path, "rb") as f:
            _check_archive(f, url, fs.size(path), written)
        for stale in fs.glob(posixpath.join(parent, f".{glob.escape(name)}.*.tmp")):
            fs.rm(stale)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Loads ``path`` without running code whatever ``weights_only`` asks (see :mod:`mom_lit.safe_load`)."""
        verify_checkpoint_file(path, content=False)
        remote = url_filesystem(path)
        try:
            if remote is None:
                return load_checkpoint_file(local_path(path), map_location=map_location)
            fs, inner = remote
            with fs.open(inner, "rb") as f:
                return load_checkpoint_file(f, map_location=map_location)
        except UnsafeCheckpointError:
            raise
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise RuntimeError(f"cannot read checkpoint {path}: the file is corrupt or truncated ({err})") from err


def verify_checkpoint_file(path: _PATH, content: bool = True) -> None:
    """Raises an error naming ``path`` unless it is a complete, undamaged ``torch.save`` archive and, with
    ``content``, holds nothing whose loading would run code (:class:`~mom_lit.safe_load.UnsafeCheckpointError`).

    A truncated file lacks the archive's central directory (at its very end); damage inside it fails the
    CRC-32 that ``torch.save`` stores for every record. ``torch.load`` checks neither: a flipped byte in a
    tensor would load silently. Costs one read of the file; the content check unpickles it with its tensors
    memory-mapped (read whole from a URL, which ``path`` may be: see :class:`AtomicCheckpointIO`).
    """
    remote = url_filesystem(path)
    fs, inner = remote if remote is not None else (fsspec.filesystem("file"), str(local_path(path)))
    if not fs.isfile(inner):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with fs.open(inner, "rb") as f, zipfile.ZipFile(f) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise RuntimeError(f"cannot read checkpoint {path}: the file is corrupt or truncated ({err})") from err
    if damaged is not None:
        raise RuntimeError(f"cannot read checkpoint {path}: the file is corrupt (CRC mismatch in record {damaged!r})")
    if content:
        try:
            if remote is None:
                load_checkpoint_file(inner, mmap=True)
            else:
                with fs.open(inner, "rb") as f:  # a stream cannot be memory-mapped
                    load_checkpoint_file(f)
        except UnsafeCheckpointError:
            raise
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise RuntimeError(f"cannot read checkpoint {path}: the file is corrupt or truncated ({err})") from err


# Output folders ---------------------------------------------------------------------------------------------------
class OutputDirError(PermissionError):
    """An output folder of the run (logs, checkpoints) cannot be created or written."""


def unwritable_reason(folder: _PATH) -> str | None:
    """Why ``folder`` could not be created or written to, or None. Creates nothing: it inspects the nearest
    existing ancestor (an existing folder must be writable; a file in the way never is)."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    # os.access also reports a read-only file system for root, whose permissions are otherwise never checked.
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" + ("" if existing == path else f" (creating {path})")
    return None


def creation_failure(folder: _PATH) -> str | None:
    """Why no folder can be created on the way to ``folder``, found by creating (and removing) a uniquely named
    one in its nearest existing ancestor: a folder that passes :func:`unwritable_reason`, e.g. under ``/proc``,
    may still refuse. None when it can be created. The unique name keeps ranks that check at once apart."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing == path:
        return None
    try:
        probe = tempfile.mkdtemp(prefix=".mom_lit-probe-", dir=existing)
    except OSError as err:
        return f"no folder can be created in {existing} ({err.strerror or err}, creating {path})"
    os.rmdir(probe)
    return None


def check_output_dirs(trainer: L.Trainer) -> None:
    """Raises :class:`OutputDirError` naming the folder and setting, before anything is trained or written,
    when a folder the run writes to (logger ``save_dir``, else ``default_root_dir``, and checkpoint
    ``dirpath``) cannot be written. Remote paths (``scheme://``) are left to their file systems."""
    folders = [(f"trainer.logger ({type(lg).__name__}) save_dir", lg.save_dir) for lg in trainer.loggers
               if getattr(lg, "save_dir", None)]
    if not folders:
        folders = [("trainer.default_root_dir", trainer.default_root_dir)]
    folders += [(f"{type(cb).__name__} dirpath", cb.dirpath) for cb in trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None]
    for setting, folder in folders:
        if "://" in str(folder):
            continue
        reason = unwritable_reason(folder) or creation_failure(folder)
        if reason is not None:
            raise OutputDirError(f"cannot write the run's output to {setting} {str(folder)!r}: {reason}; "
                                 "choose another folder")


# Preemption -------------------------------------------------------------------------------------------------------
class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1 (what SLURM sends before preemption), saves ``last.ckpt`` at the next step boundary
    and stops training cleanly; ``--ckpt_path last`` then resumes exactly.

    The handlers are installed on every rank for the duration of training (replacing Lightning's own SIGTERM
    handler, which would end the run with an exception instead). Like any early stop, the Trainer runs its
    validation loop before exiting: keep ``limit_val_batches`` within the grace period. Under several processes
    the decision is all-reduced each step, so every rank saves and stops at the same step even if only some got
    the signal.

    Args:
        signals: names of the signals to handle.
        exit_code: exit status of ``python -m mom_lit`` after such a stop (0: as a finished run). A job script
            tells a preempted run from a finished one by it, e.g. to requeue itself (see
            ``tools/slurm_example.sbatch``).
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), exit_code: int = 0):
        for name in signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"signals must name POSIX signals, got {name!r}")
        if not isinstance(exit_code, int) or not 0 <= exit_code <= 255:
            raise ValueError(f"exit_code must be an integer in [0, 255], got {exit_code!r}")
        self.signals = tuple(signals)
        self.exit_code = exit_code
        self.received: int | None = None
        self.stopped = False  # saved last.ckpt and stopped because of a signal
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, after the Trainer registered its own handlers; signal.signal works in the main thread only.
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                # Its own: a later save of last.ckpt overwrites the file instead of writing last-v1.ckpt.
                callback.last_model_path = str(path)
        # Lightning runs validation (when configured) before an early stop, as for EarlyStopping.
        trainer.should_stop = True
        self.stopped = True

    def state_dict(self) -> dict[str, Any]:
        return {}


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """``last.ckpt`` in the folder of the first ``ModelCheckpoint``, else in the run's ``checkpoints`` folder."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def preemption_exit_code(trainer: L.Trainer) -> int:
    """The ``exit_code`` of the :class:`PreemptionCheckpoint` that stopped this run, else 0."""
    return next((c.exit_code for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint) and c.stopped), 0)


def install_fault_tolerance(trainer: L.Trainer) -> None:
    """Atomic checkpoint writes (unless another ``CheckpointIO`` was configured) and preemption handling (unless
    a :class:`PreemptionCheckpoint` is already among the callbacks)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):
        # Before the checkpoint callbacks, which the Trainer keeps last.
        index = next((i for i, c in enumerate(trainer.callbacks) if isinstance(c, ModelCheckpoint)),
                     len(trainer.callbacks))
        trainer.callbacks.insert(index, PreemptionCheckpoint())
