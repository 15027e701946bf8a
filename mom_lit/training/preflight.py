"""Trainer settings checked against the data before a run writes anything.

Lightning finds some inconsistencies only once the fit loop has built its loaders, after the run's folder,
config and event files exist, and reports them in a long traceback. What can be known from the prepared data's
metadata is checked here instead, with one message naming the setting and the fix.
"""

from __future__ import annotations

from typing import Any

from mom_lit.data import remote
from mom_lit.data.prepared import read_meta

__all__ = ["train_batches_bound", "check_val_check_interval", "check_validation_after_resume"]


def train_batches_bound(datamodule: Any, world_size: int) -> int | None:
    """At most how many training batches one rank sees per epoch, from the ``train`` split's metadata.

    The data module must expose ``root`` (the folder of prepared splits), ``seq_len`` and ``batch_size``
    (:class:`~mom_lit.data.TextDataModule` does). Rows of ``seq_len + 1`` tokens are shared over ranks and
    whole batches kept; loader workers can only drop more, so this is an upper bound. None when unknown (no
    such attributes, no prepared metadata yet).
    """
    try:
        root, seq_len, batch_size = datamodule.root, int(datamodule.seq_len), int(datamodule.batch_size)
        meta = read_meta(remote.join(root, "train"))  # root may be a URL
    except (AttributeError, TypeError, ValueError, OSError):
        return None
    rows = int(meta["num_tokens"]) // (seq_len + 1)
    return rows // max(world_size, 1) // batch_size


def check_val_check_interval(trainer: Any, datamodule: Any) -> None:
    """Raises ``ValueError`` when an integer ``trainer.val_check_interval`` exceeds the training batches of one
    epoch while validation is counted per epoch (``check_val_every_n_epoch`` set) and runs (``limit_val_batches``
    above 0): Lightning would refuse it only after the run's folder is written."""
    interval = trainer.val_check_interval
    if (not isinstance(interval, int) or isinstance(interval, bool) or trainer.check_val_every_n_epoch is None
            or trainer.limit_val_batches == 0):
        return
    bound = train_batches_bound(datamodule, trainer.world_size)
    if bound is None:
        return
    limit = trainer.limit_train_batches
    if isinstance(limit, int) and not isinstance(limit, bool):
        bound = min(bound, limit)
    elif isinstance(limit, float):
        bound = int(bound * limit)
    if interval > bound:
        raise ValueError(
            f"trainer.val_check_interval={interval} exceeds the {bound} training batches of one epoch "
            f"(batch_size={datamodule.batch_size}, seq_len={datamodule.seq_len}, {trainer.world_size} rank(s)): "
            f"set it to at most {bound}, or set trainer.check_val_every_n_epoch=null to count it across epochs")


def check_validation_after_resume(trainer: Any, resumed_step: int) -> None:
    """Raises ``ValueError`` when a ``fit`` resumed at optimizer step ``resumed_step`` would reach
    ``trainer.max_steps`` without validating once, validation being counted over the whole run
    (``check_val_every_n_epoch=null``, integer ``val_check_interval`` in training batches): the run would
    end with no validation loss and no checkpoint chosen by it, and say nothing."""
    interval, max_steps = trainer.val_check_interval, trainer.max_steps
    if (trainer.check_val_every_n_epoch is not None or not isinstance(interval, int) or isinstance(interval, bool)
            or max_steps is None or max_steps < 0 or resumed_step >= max_steps or trainer.limit_val_batches == 0):
        return
    batches = int(trainer.accumulate_grad_batches)  # training batches per optimizer step
    if (max_steps * batches) // interval > (resumed_step * batches) // interval:
        return
    raise ValueError(
        f"resumed at step {resumed_step}, the run would reach trainer.max_steps={max_steps} without validating "
        f"(trainer.val_check_interval={interval} training batches, counted from the start of the run): lower "
        "val_check_interval or raise max_steps")
