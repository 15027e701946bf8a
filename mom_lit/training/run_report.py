"""What a command-line run tells its user and records in its folder.

- :class:`RunConfigRecord`: the run folder's ``config.yaml`` is written once, by the command that created the
  folder; a later command writing into the same folder (a resumed ``fit``, a ``validate``/``test`` of the run)
  records its own config beside it as ``config.<resume|validate|test>.<UTC time>.yaml``.
- :func:`run_summary`: the lines printed when ``fit`` ends (validation losses, checkpoints, logs, how to resume,
  how to open TensorBoard).
- :func:`quiet_vendor_tips`: drops Lightning's advertisements for its cloud products from the terminal.
- :func:`show_progress_messages`: shows mom_lit's own progress messages (e.g. the one-off compilation on CPU).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["RunConfigRecord", "run_dir", "run_summary", "quiet_vendor_tips", "show_progress_messages", "utc_stamp"]


def utc_stamp() -> str:
    """The current UTC time as ``YYYYmmddTHHMMSSZ``: sorts in time order and is safe in file names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def run_dir(trainer: Any) -> str | None:
    """The run's folder: the Trainer's log folder without its logger's ``sub_dir`` (where a ``validate`` of a
    training run writes its event files). As seen by this process: unlike ``Trainer.log_dir`` it broadcasts
    nothing, so rank 0 alone may ask."""
    logger = trainer.logger
    log_dir = (getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) if logger is not None
               else trainer.default_root_dir)
    if log_dir is None:
        return None
    log_dir = os.fspath(log_dir)
    sub_dir = getattr(logger, "sub_dir", None)
    return posixpath.dirname(log_dir.rstrip("/")) if sub_dir else log_dir  # keeps a URL's "//"


class RunConfigRecord(SaveConfigCallback):
    """Writes the command's parsed config into the run folder without ever replacing one already there.

    ``config.yaml`` when the folder has none, else ``config.<label>.<UTC time>.yaml``: ``label`` names the
    command (the CLI passes ``resume`` for a ``fit`` from a checkpoint, else the subcommand); None takes the
    Trainer's stage. ``stamp`` is the command's time (default: when the config is written). The other
    arguments are :class:`~lightning.pytorch.cli.SaveConfigCallback`'s.
    """

    def __init__(self, *args: Any, label: str | None = None, stamp: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label = label
        self.stamp = stamp

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_dir(trainer) if trainer.is_global_zero else None
        if folder is not None:
            fs = get_filesystem(folder)
            fs.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, self.config_filename)
            if fs.exists(path):
                label = self.label or str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
                stem = os.path.join(folder, f"config.{label}.{self.stamp or utc_stamp()}")
                path, n = f"{stem}.yaml", 1
                while fs.exists(path):  # two commands within the same second
                    path, n = f"{stem}.{n}.yaml", n + 1
            self.parser.save(self.config, path, skip_none=False, overwrite=False, multifile=self.multifile)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def _checkpoint_callback(trainer: Any) -> ModelCheckpoint | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)


def _loss(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def run_summary(trainer: Any, resume_argv: list[str] | None, monitor: str = "val/loss") -> str:
    """The lines printed when ``fit`` ends: steps done, the best and last ``monitor`` values, where the
    checkpoints and logs are, the command that resumes this run (``resume_argv``, the arguments after
    ``python -m mom_lit``; None when there is no checkpoint to resume from) and how to open TensorBoard."""
    lines = [f"Run finished at step {trainer.global_step} (epoch {trainer.current_epoch})."]
    checkpoint = _checkpoint_callback(trainer)
    last = trainer.callback_metrics.get(monitor)
    if checkpoint is not None and checkpoint.monitor == monitor and checkpoint.best_model_score is not None:
        lines.append(f"  {monitor}: best {_loss(checkpoint.best_model_score)}, last {_loss(last)}")
    else:
        lines.append(f"  {monitor}: last {_loss(last)}")
    if checkpoint is not None:
        if checkpoint.best_model_path:
            lines.append(f"  best checkpoint: {checkpoint.best_model_path}")
        if checkpoint.last_model_path:
            lines.append(f"  last checkpoint: {checkpoint.last_model_path}")
    folder = run_dir(trainer) if trainer.loggers else None
    if folder is not None:
        lines.append(f"  logs and config: {folder}")
    if resume_argv is not None:
        lines.append(f"  resume: {shlex.join([Path(sys.executable).name, '-m', 'mom_lit', *resume_argv])}")
    save_dir = getattr(trainer.logger, "save_dir", None)
    if save_dir is not None and isinstance(trainer.logger, TensorBoardLogger):
        lines.append(f"  TensorBoard: tensorboard --logdir {shlex.quote(str(save_dir))}")
    return "\n".join(lines)


class _DropVendorTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_vendor_tips() -> None:
    """Drops Lightning's "💡 Tip" advertisements (logged through its rank-zero logger); idempotent."""
    from lightning_utilities.core import rank_zero  # Lightning points its `log` at the logger it uses

    log = rank_zero.log
    if not any(isinstance(f, _DropVendorTips) for f in log.filters):
        log.addFilter(_DropVendorTips())


def show_progress_messages() -> None:
    """Prints mom_lit's INFO messages to stderr when nothing else handles them (as Lightning does for its own
    logger); idempotent."""
    log = logging.getLogger("mom_lit")
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
