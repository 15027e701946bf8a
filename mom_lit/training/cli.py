"""Command line: ``python -m mom_lit {fit,validate,test} --config configs/<name>.yaml [--section.field=value]``."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from mom_lit.training.module import MoMLightningModule


class MoMLightningCLI(LightningCLI):
    """LightningCLI for :class:`MoMLightningModule` and any data module given by ``data.class_path``.

    ``model.config.vocab_size`` is not set by hand: it is linked from the instantiated data module's
    ``vocab_size`` (so it cannot appear in a config file either).
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(MoMLightningModule, LightningDataModule, subclass_mode_data=True, args=args, run=run,
                         **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")


def cli_main(args: Any = None, run: bool = True) -> MoMLightningCLI:
    return MoMLightningCLI(args=args, run=run)
