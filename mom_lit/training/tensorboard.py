"""The TensorBoard logger of the configs: Lightning's, without the two cards that carry no information."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` with ``default_hp_metric`` off by default (no placeholder ``hp_metric``)
    and without the ``epoch`` counter the Trainer adds to every batch of metrics it logs (a flat card that
    TensorBoard would show first; the step axis already orders the run and checkpoints record the epoch).
    The arguments are Lightning's."""

    def __init__(self, save_dir: str | Path, name: str | None = "lightning_logs", version: int | str | None = None,
                 log_graph: bool = False, default_hp_metric: bool = False, prefix: str = "",
                 sub_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version=version, log_graph=log_graph,
                         default_hp_metric=default_hp_metric, prefix=prefix, sub_dir=sub_dir, **kwargs)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {key: value for key, value in metrics.items() if key != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)
