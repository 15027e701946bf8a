"""Two-process CPU DDP (gloo) through the command line: ranks see different data and end with equal weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


class RecordRank(L.Callback):
    """Saves the batches a rank trained on and its final weights to ``<out_dir>/rank<r>.pt``."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.batches: list[torch.Tensor] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size, "batches": self.batches,
                    "state": state, "initial": self.initial, "tokens_seen": pl_module.tokens_seen,
                    "skipped_steps": pl_module.skipped_steps},
                   self.out_dir / f"rank{trainer.global_rank}.pt")


class PoisonOneRank(L.Callback):
    """Makes one gradient non-finite on rank 1 only, at one step, after DDP's all-reduce: what a rank of a sharded
    strategy sees when the bad values fall in its shard alone. Runs before the module's own hook."""

    def __init__(self, step: int = 1):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0].fill_(float("nan"))


@pytest.mark.slow
def test_two_process_cpu_ddp(tmp_path):
    steps, batch, seq_len = 3, 4, 32
    args = [
        sys.executable, "-m", "mom_lit", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=2", f"--trainer.val_check_interval={steps}",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.callbacks+=test_ddp.RecordRank", f"--trainer.callbacks.out_dir={tmp_path}",
        "--trainer.callbacks+=test_ddp.PoisonOneRank",
        "--model.config.hidden_size=32", "--model.config.num_layers=2", "--model.config.head_dim=8",
        "--model.config.chunk_size=16", "--model.config.backend=eager", "--model.warmup_steps=1",
        f"--data.init_args.seq_len={seq_len}", f"--data.init_args.batch_size={batch}",
        "--data.init_args.num_workers=0",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    rows = [{tuple(row.tolist()) for b in r["batches"] for row in b} for r in ranks]
    assert all(len(r["batches"]) == steps for r in ranks)
    assert len(rows[0]) == len(rows[1]) == steps * batch
    assert not rows[0] & rows[1]  # the ranks trained on different rows
    assert all(r["tokens_seen"] == steps * batch * seq_len * 2 for r in ranks)  # counted over both ranks
    # Rank 1 alone saw a non-finite gradient at step 1; both ranks skipped that step, so they stay equal.
    assert [r["skipped_steps"] for r in ranks] == [1, 1]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name
    # Training moved the weights: the equality is not that of an untouched initialisation.
    assert not torch.equal(ranks[0]["state"]["embed.weight"], ranks[0]["initial"]["embed.weight"])
    checkpoint = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False)
    assert checkpoint["global_step"] == steps
