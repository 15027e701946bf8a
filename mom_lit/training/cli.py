"""Command line: ``python -m mom_lit {fit,validate,test} --config configs/<name>.yaml [--section.field=value]``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningCLI

from mom_lit.training.faults import install_fault_tolerance, verify_checkpoint_file
from mom_lit.training.module import MoMLightningModule


def latest_run_checkpoint(logger: Any) -> tuple[int, Path] | None:
    """(version, ``last.ckpt``) of the newest run of a ``save_dir``/``name``/``version_N`` logger, if any.

    ``logger`` is the parsed logger config (class_path + init_args). Only loggers whose version is left to
    auto-increment qualify: a run resumed from one of them must write into that same version.
    """
    args = getattr(logger, "init_args", None)
    if args is None or getattr(args, "version", None) is not None or getattr(args, "save_dir", None) is None:
        return None
    root = Path(args.save_dir) / (getattr(args, "name", None) or "")
    runs = []
    for path in root.glob("version_*/checkpoints/last.ckpt"):
        match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
        if match:
            runs.append((int(match.group(1)), path))
    return max(runs) if runs else None


class MoMLightningCLI(LightningCLI):
    """LightningCLI for :class:`MoMLightningModule` and any data module given by ``data.class_path``.

    ``model.config.vocab_size`` is not set by hand: it is linked from the instantiated data module's
    ``vocab_size`` (so it cannot appear in a config file either).

    ``--ckpt_path last`` resumes the newest run of the configured logger (``save_dir/name/version_N``) from
    its ``checkpoints/last.ckpt`` and keeps logging into that run's folder; Lightning on its own would look
    in the new, empty version folder.

    Every Trainer it builds writes checkpoints atomically and saves ``last.ckpt`` and stops on SIGTERM/SIGUSR1
    (see :func:`~mom_lit.training.faults.install_fault_tolerance`).
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(MoMLightningModule, LightningDataModule, subclass_mode_data=True, args=args, run=run,
                         **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the hyper-parameters of a given checkpoint right after parsing: a damaged file
        # would fail there with torch's message, which does not name it.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and Path(ckpt_path).is_file():
            verify_checkpoint_file(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        install_fault_tolerance(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None or config.get("ckpt_path") != "last":
            return
        found = latest_run_checkpoint(config.trainer.logger)
        if found is not None:
            version, path = found
            config.trainer.logger.init_args.version = version
            config.ckpt_path = str(path)


def cli_main(args: Any = None, run: bool = True) -> MoMLightningCLI:
    return MoMLightningCLI(args=args, run=run)
