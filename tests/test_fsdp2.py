"""FSDP2 (``configs/fsdp2.yaml``: Lightning's ModelParallelStrategy, ``fully_shard`` per block, each block
recomputed in the backward pass) on CPU processes over gloo, through the command line."""

from __future__ import annotations

import pytest
import torch

from test_ddp import _fit_step_losses


@pytest.mark.slow
def test_fsdp2_trains_as_one_process_and_resumes_on_another_mesh(tmp_path):
    """2 sharded ranks of 4 rows against 1 plain process accumulating 2 micro-batches of 4 rows: the same rows
    per step, so the losses agree to fp32 reduction-order noise. The sharded checkpoint (one folder, a shard per
    rank) written after step 2 resumes on a 1-rank mesh, whose steps 3 and 4 repeat the uninterrupted losses."""
    steps, fsdp2 = 4, ("fsdp2.yaml",)
    # A constant learning rate after warm-up: the run that saves stops at step 2 (its max_steps), and the
    # optimizer it saves holds the learning rate of its own schedule, which the resumed run's first step uses.
    constant = "--model.min_lr_ratio=1.0"
    one = _fit_step_losses(tmp_path / "one", 1, 4, 2, steps, constant)
    save = [constant, "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.every_n_train_steps=2",
            f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}"]
    two = _fit_step_losses(tmp_path / "two", 2, 4, 1, 2, "--trainer.strategy.init_args.data_parallel_size=2",
                           *save, overlays=fsdp2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert len(list(last.glob("*.distcp"))) == 2  # one folder, in which each rank wrote its shard
    resumed = _fit_step_losses(tmp_path / "resumed", 1, 4, 2, steps,
                               "--trainer.strategy.init_args.data_parallel_size=1", constant, f"--ckpt_path={last}",
                               overlays=fsdp2)
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one[:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(one[2:]), rtol=1e-5, atol=1e-5)
