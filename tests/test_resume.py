"""Exact resume across epoch boundaries: the streaming train loader's position, every batch and the weights."""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from itertools import islice
from pathlib import Path

import lightning as L
import pytest
import torch

from mom_lit.data import TextDataModule
from mom_lit.training import MoMLightningModule
from mom_lit.training.faults import PreemptionCheckpoint
from conftest import BATCH_SIZE, BATCHES_PER_EPOCH, SEQ_LEN
from test_faults import SignalAtStep
from test_training import tiny_config


def text_data(data_dir: Path, num_workers: int) -> TextDataModule:
    return TextDataModule(data_dir=str(data_dir), seq_len=SEQ_LEN, batch_size=BATCH_SIZE, num_workers=num_workers)


def epoch_blocks(loader) -> list[tuple[int, ...]]:
    """Every row's token block (``seq_len + 1`` ids) of the batches ``loader`` yields, in order."""
    return [tuple(row) for batch in loader for row in block_rows(batch).tolist()]


def block_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1)  # (B, T+1): each row's token block


# The loader alone ---------------------------------------------------------------------------------------------
def two_epochs(data_dir: Path, num_workers: int) -> list[list[tuple[int, ...]]]:
    data = text_data(data_dir, num_workers)
    data.setup("fit")
    loader = data.train_dataloader()
    assert len(loader) == BATCHES_PER_EPOCH
    return [epoch_blocks(loader) for _ in range(2)]


@pytest.mark.parametrize("workers_before,workers_after", [(0, 0), (2, 2), (0, 2)])
def test_epoch_after_a_resumed_one_is_a_fresh_epoch(four_batch_epochs, workers_before, workers_after, caplog):
    """As Lightning does: a resumed epoch is ended after ``len()`` batches without asking the loader for one
    more. The next epoch must be the whole next epoch of an uninterrupted loader, not a replay of the resumed
    position (litdata keeps resuming from a loaded state until an epoch's generator runs to its end)."""
    reference = two_epochs(four_batch_epochs, workers_before)
    assert len(set(reference[0])) == len(reference[0]) == BATCHES_PER_EPOCH * BATCH_SIZE

    data = text_data(four_batch_epochs, workers_before)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    seen = [tuple(row) for row in block_rows(next(batches)).tolist()]
    state = data.state_dict()
    del batches

    resumed = text_data(four_batch_epochs, workers_after)
    resumed.setup("fit")
    with caplog.at_level(logging.WARNING, logger="mom_lit"):
        resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    # At most len() - 1 more batches, never one past them (a shorter epoch ends with StopIteration).
    rest = [tuple(row) for batch in islice(iter(loader), BATCHES_PER_EPOCH - 1) for row in block_rows(batch).tolist()]
    next_epoch = epoch_blocks(loader)
    if workers_before == workers_after:
        assert seen + rest == reference[0]
        assert next_epoch == reference[1]
        assert not caplog.records
    else:
        # litdata deals the remaining blocks over the new workers, each dropping its last partial batch: none is
        # repeated, a few may be skipped, and the next epoch is the whole one of a loader with the new workers.
        assert len(set(seen + rest)) == len(seen + rest) and set(rest) <= set(reference[0]) - set(seen)
        assert len(seen + rest) >= len(reference[0]) - workers_after * (BATCH_SIZE - 1)
        assert next_epoch == two_epochs(four_batch_epochs, workers_after)[1]
        # litdata records num_workers=0 as one worker
        assert f"resuming mid-epoch with num_workers={workers_after}, the checkpoint was written with " \
               f"{max(workers_before, 1)}" in caplog.text


# Lightning fits -----------------------------------------------------------------------------------------------
class RecordBatches(L.Callback):
    """Keeps ``(global_step, epoch, token blocks)`` of every training step."""

    def __init__(self):
        self.steps: list[tuple[int, int, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step, trainer.current_epoch, block_rows(batch).clone()))


class SignalDuringValidation(L.Callback):
    """Sends ``signum`` to this process from inside the validation run that follows step ``step``."""

    def __init__(self, step: int, signum: int = int(signal.SIGUSR1)):
        self.step, self.signum = step, signum

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)


def fit_text(tmp_path: Path, data_dir: Path, num_workers: int, max_steps: int, callbacks: list[L.Callback],
             ckpt_path: Path | None = None) -> tuple[L.Trainer, MoMLightningModule]:
    torch.manual_seed(0)
    module = MoMLightningModule(tiny_config(vocab_size=320), warmup_steps=1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        val_check_interval=2, limit_val_batches=1, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(module, text_data(data_dir, num_workers), ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.slow
@pytest.mark.parametrize("workers_before,workers_after,during", [
    pytest.param(0, 0, "step", id="0-0-workers"),
    pytest.param(1, 1, "validation", id="1-1-workers-during-validation"),
    pytest.param(2, 1, "step", id="2-1-workers"),
])
def test_preempted_fit_resumes_exactly_across_epochs(tmp_path, four_batch_epochs, workers_before, workers_after,
                                                     during, one_thread):
    """Preempted (SIGUSR1) in the second step of epoch 0, or in the validation run after it, and resumed through
    epochs 1 and 2: every batch's token ids and the final weights equal an uninterrupted run's; with another
    number of loader workers, each whole epoch holds the same blocks and the steps before the stop are the same."""
    max_steps = 2 * BATCHES_PER_EPOCH + 2
    whole = RecordBatches()
    _, reference = fit_text(tmp_path / "whole", four_batch_epochs, workers_before, max_steps, [whole])

    first, second = RecordBatches(), RecordBatches()
    signal_at = SignalAtStep(1, int(signal.SIGUSR1)) if during == "step" else SignalDuringValidation(2)
    trainer, _ = fit_text(tmp_path / "parts", four_batch_epochs, workers_before, max_steps,
                          [first, signal_at, PreemptionCheckpoint()])
    stopped = 2 if during == "step" else 3  # a signal during validation is acted on at the end of the next step
    assert trainer.global_step == stopped
    last = tmp_path / "parts" / "checkpoints" / "last.ckpt"
    trainer, module = fit_text(tmp_path / "parts", four_batch_epochs, workers_after, max_steps, [second],
                               ckpt_path=last)
    assert trainer.global_step == max_steps

    expected = [(step, epoch) for step in range(1, max_steps + 1) for epoch in [(step - 1) // BATCHES_PER_EPOCH]]
    assert [(step, epoch) for step, epoch, _ in whole.steps] == expected
    kept = first.steps + second.steps
    assert [(step, epoch) for step, epoch, _ in kept] == expected
    if workers_before == workers_after:
        for (step, _, rows), (_, _, reference_rows) in zip(kept, whole.steps, strict=True):
            assert torch.equal(rows, reference_rows), f"step {step}"
        for name, value in reference.state_dict().items():
            assert torch.equal(module.state_dict()[name], value), name
        return
    # Another number of workers interleaves their blocks differently: the steps before the stop are the same
    # and each whole epoch holds the same blocks (here every worker's share of the rest is whole batches).
    for (step, _, rows), (_, _, reference_rows) in zip(kept[:stopped], whole.steps[:stopped], strict=True):
        assert torch.equal(rows, reference_rows), f"step {step}"

    def blocks_per_epoch(steps):
        per_epoch: dict[int, Counter] = {}
        for _, epoch, rows in steps:
            per_epoch.setdefault(epoch, Counter()).update(tuple(row) for row in rows.tolist())
        return per_epoch

    complete = range(max_steps // BATCHES_PER_EPOCH)
    assert [blocks_per_epoch(kept)[e] for e in complete] == [blocks_per_epoch(whole.steps)[e] for e in complete]
