"""Command line: ``python -m mom_lit {fit,validate,test} --config configs/<name>.yaml [--section.field=value]``."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import fsspec
import yaml
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from mom_lit.config import ConfigError, MoMConfig
from mom_lit.safe_load import load_checkpoint_file, safe_checkpoint_types
from mom_lit.training.faults import (check_output_dirs, install_fault_tolerance, local_path, url_filesystem,
                                     verify_checkpoint_file)
from mom_lit.training.module import MoMLightningModule
from mom_lit.training.preflight import check_val_check_interval, check_validation_after_resume
from mom_lit.training.run_report import (RunConfigRecord, quiet_vendor_tips, run_summary, show_progress_messages,
                                         utc_stamp)

SUBCOMMANDS = ("fit", "validate", "test", "predict")

OPTIMIZER_ADVICE = ("the module trains with AdamW (decay/no_decay parameter groups) and a warm-up + cosine schedule; "
                    "set them with --model.lr, --model.betas, --model.eps, --model.weight_decay, "
                    "--model.warmup_steps and --model.min_lr_ratio")


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


def config_files(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The files given by ``--config``/``-c`` on a command line."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def optimizer_options(argv: list[str] | tuple[str, ...], files: list[str]) -> list[str]:
    """``--optimizer``/``--lr_scheduler`` options on a command line or ``optimizer``/``lr_scheduler`` keys in the
    config ``files`` (top level or under a subcommand), which the command line does not offer."""
    found = [arg.split("=", 1)[0] for arg in argv
             if isinstance(arg, str) and re.match(r"--(optimizer|lr_scheduler)(\.|=|$)", arg)]
    for path in files:
        try:
            with open(path) as stream:
                data = yaml.safe_load(stream)
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(data, dict):
            continue
        sections = [data, *(data[c] for c in SUBCOMMANDS if isinstance(data.get(c), dict))]
        found += [f"{key} (in {path})" for section in sections for key in ("optimizer", "lr_scheduler")
                  if key in section]
    return found


def given_vocab_size(config: Any, files: list[str]) -> int | None:
    """``model.config.vocab_size`` as set in a config file (the command line refuses it: it is linked from the
    data module), or None when it was left unset: a value other than the field's default, or the key found in
    one of the ``--config`` ``files``."""
    value = getattr(getattr(getattr(config, "model", None), "config", None), "vocab_size", None)
    if value is None:
        return None
    if value != MoMConfig.__dataclass_fields__["vocab_size"].default:
        return value
    for path in files:
        try:
            with open(path) as stream:
                data = yaml.safe_load(stream)
        except (OSError, yaml.YAMLError):
            continue
        model = data.get("model") if isinstance(data, dict) else None
        model_config = model.get("config") if isinstance(model, dict) else None
        if isinstance(model_config, dict) and "vocab_size" in model_config:
            return value
    return None


def resumed_step(ckpt_path: str | None) -> int | None:
    """The optimizer step a local checkpoint file was saved at (read with its tensors memory-mapped), or None
    (no checkpoint, a sharded folder, ``last`` left unresolved; a remote file is not read twice)."""
    if not ckpt_path or url_filesystem(ckpt_path) is not None or not local_path(ckpt_path).is_file():
        return None
    step = load_checkpoint_file(local_path(ckpt_path), mmap=True).get("global_step")
    return int(step) if step is not None else None


def check_vocab_size(given: int | None, datamodule: Any) -> None:
    """Refuses a ``model.config.vocab_size`` that differs from the data module's, which the run would use."""
    data_vocab = getattr(datamodule, "vocab_size", None)
    if given is not None and data_vocab is not None and given != data_vocab:
        raise ValueError(f"model.config.vocab_size={given} conflicts with the data module's vocab_size={data_vocab} "
                         "(the model's vocabulary comes from the tokenizer): remove model.config.vocab_size or set "
                         f"it to {data_vocab}")


class MoMLightningCLI(LightningCLI):
    """LightningCLI for :class:`MoMLightningModule` and any data module given by ``data.class_path``.

    Options are matched by their full names only (``--model.config.num_layer`` is refused, not taken for
    ``num_layers``). There is no ``--optimizer``/``--lr_scheduler``: the module's own arguments set its AdamW
    and schedule. Inputs are checked before the run's folder is written, and refused in one line: a data folder
    or tokenizer that is missing or does not fit, a ``trainer.val_check_interval`` longer than an epoch, a
    resumed ``fit`` that would end without validating (see :mod:`mom_lit.training.preflight`).

    The run folder's ``config.yaml`` is written by the command that created the folder; a resumed ``fit`` or a
    ``validate``/``test`` of the run records its config beside it (``config.<resume|validate|test>.<time>.yaml``,
    see :class:`~mom_lit.training.run_report.RunConfigRecord`), and a ``validate``/``test`` with ``--ckpt_path
    last`` writes its event files into the sub-folder ``<validate|test>.<time>`` of the run's folder. ``fit``
    ends with a summary: validation losses, checkpoints, logs, the command that resumes the run, TensorBoard.

    ``model.config.vocab_size`` is not set by hand: it is linked from the instantiated data module's
    ``vocab_size``. The command line refuses it; a config file may only repeat the data module's value.

    ``--ckpt_path last`` resumes the newest run of the configured logger (``save_dir/name/version_N``) from
    its ``checkpoints/last.ckpt`` and keeps logging into that run's folder; Lightning on its own would look
    in the new, empty version folder.

    Every Trainer it builds writes checkpoints atomically and saves ``last.ckpt`` and stops on SIGTERM/SIGUSR1
    (see :func:`~mom_lit.training.faults.install_fault_tolerance`); its output folders are checked for
    writability before anything runs. A checkpoint to resume from (given, or found by ``last``) is checked for
    damage and for content whose loading would run code before anything is written.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any):
        self._config_files: list[str] = []
        self._given_vocab_size: int | None = None
        self._argv: list[str] | None = None
        self._stamp: str | None = None  # the command's UTC time, set once its subcommand is known
        kwargs.setdefault("save_config_callback", RunConfigRecord)
        kwargs.setdefault("auto_configure_optimizers", False)
        no_abbrev = {"allow_abbrev": False}
        kwargs.setdefault("parser_kwargs", {**no_abbrev, **{c: dict(no_abbrev) for c in SUBCOMMANDS}})
        quiet_vendor_tips()
        show_progress_messages()
        super().__init__(MoMLightningModule, LightningDataModule, subclass_mode_data=True, args=args, run=run,
                         **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # jsonargparse reports a YAML syntax error without the file it came from.
        argv = sys.argv[1:] if args is None else args
        self._config_files = config_files(argv) if isinstance(argv, (list, tuple)) else []
        for path in self._config_files:
            try:
                with open(path) as stream:  # the stream's name puts the file into the error's positions
                    yaml.safe_load(stream)
            except yaml.YAMLError as err:
                parser.error(f"malformed YAML in config file {path}: {err}")
            except OSError:
                pass  # jsonargparse reports a missing file
        if isinstance(argv, (list, tuple)):
            self._argv = [str(arg) for arg in argv]
            refused = optimizer_options(self._argv, self._config_files)
            if refused:
                parser.error(f"{', '.join(refused)}: not an option here; {OPTIMIZER_ADVICE}")
        super().parse_arguments(parser, args)
        # LightningCLI reads the hyper-parameters of a given checkpoint right after parsing: a damaged file
        # would fail there with torch's message, which does not name it.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path.split(":")[0] not in ("last", "best", "hpc", "registry"):
            remote = url_filesystem(ckpt_path)
            fs, inner = remote if remote is not None else (fsspec.filesystem("file"), str(local_path(ckpt_path)))
            if not fs.exists(inner):
                parser.error(f"--ckpt_path {ckpt_path}: no such checkpoint file")
            if fs.isfile(inner):  # a folder is a sharded checkpoint, read by its strategy
                verify_checkpoint_file(ckpt_path)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyper-parameters of a given checkpoint with weights_only=True: mom_lit's own
        # types are allowed there too (parse_arguments already refused a file holding anything else).
        with safe_checkpoint_types():
            super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except ConfigError as err:
            # A field out of range is a usage error: one line, like a type error found while parsing.
            self.parser.error(f"model.config: {err}")
        except (ValueError, OSError) as err:
            # jsonargparse reports an error raised while building `data` (a class chosen by class_path) inside a
            # list of every type it tried; the error of the data module itself is the one to show.
            cause = err
            if str(err).startswith("Does not validate against any of the Union subtypes"):
                while cause.__cause__ is not None:
                    cause = cause.__cause__
            # A missing data folder, weights file or tokenizer, a value out of range: one line, nothing written.
            self.parser.error(str(cause))
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        try:
            check_vocab_size(self._given_vocab_size, self.datamodule)
        except ValueError as err:
            self.parser.error(str(err))
        self.trainer = self.instantiate_trainer()

    def _check_inputs(self, stage: str) -> None:
        # What the data module can check from metadata fails here, before the run's folders are created.
        try:
            check = getattr(self.datamodule, "check", None)
            if callable(check):
                check(stage)
            if stage == "fit":
                check_val_check_interval(self.trainer, self.datamodule)
                step = resumed_step(self.config["fit"].get("ckpt_path"))
                if step is not None:
                    check_validation_after_resume(self.trainer, step)
        except (ValueError, OSError) as err:
            self.parser.error(str(err))

    def before_fit(self) -> None:
        self._check_inputs("fit")

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(run_summary(self.trainer, self._resume_argv()), file=sys.stderr)

    def before_validate(self) -> None:
        self._check_inputs("validate")

    def before_test(self) -> None:
        self._check_inputs("test")

    def _resume_argv(self) -> list[str] | None:
        """This command's arguments with the checkpoint to resume from: ``last`` where that finds this run again
        (it was given, or this run is the newest of its logger), else the path of its ``last.ckpt``; None
        without a ``last.ckpt`` or when the arguments are not known (given as a dict)."""
        if self._argv is None:
            return None
        checkpoint = next((cb for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
        last = checkpoint.last_model_path if checkpoint is not None else ""
        if not last:
            return None
        argv, given, skip = [], None, False
        for arg in self._argv:  # without the checkpoint this run was given
            if skip:
                given, skip = arg, False
            elif arg == "--ckpt_path":
                skip = True
            elif arg.startswith("--ckpt_path="):
                given = arg.split("=", 1)[1]
            else:
                argv.append(arg)
        logger = self.config[self.subcommand].trainer.logger
        found = latest_run_checkpoint(logger) if logger and not isinstance(logger, (bool, list)) else None
        same_run = found is not None and Path(found[1]).resolve() == Path(last).resolve()
        target = "last" if given == "last" or same_run else last
        return [*argv, "--ckpt_path", target]

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        install_fault_tolerance(trainer)
        check_output_dirs(trainer)  # before anything is prepared, trained or written
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        self._given_vocab_size = given_vocab_size(config, self._config_files)
        if self.subcommand and config is not None:
            resumed = self.subcommand == "fit" and config.get("ckpt_path") is not None
            self._stamp = utc_stamp()  # names this command's config record and, for an evaluation, its events
            self.save_config_kwargs = {**self.save_config_kwargs, "label": "resume" if resumed else self.subcommand,
                                       "stamp": self._stamp}
        if not self.subcommand or config is None or config.get("ckpt_path") != "last":
            return
        found = latest_run_checkpoint(config.trainer.logger)
        if found is not None:
            version, path = found
            verify_checkpoint_file(path)  # before the run's folder receives a config file or event files
            config.trainer.logger.init_args.version = version
            config.ckpt_path = str(path)
            if self.subcommand != "fit" and "sub_dir" in config.trainer.logger.init_args:
                # Evaluating a training run: its event files stay apart from the run's own.
                config.trainer.logger.init_args.sub_dir = f"{self.subcommand}.{self._stamp}"


def cli_main(args: Any = None, run: bool = True) -> MoMLightningCLI:
    return MoMLightningCLI(args=args, run=run)
