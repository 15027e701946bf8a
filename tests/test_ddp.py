"""Two-process CPU DDP (gloo) through the command line: ranks see different data and end with equal weights;
configs/ddp.yaml trains as one process does at the same global batch."""

from __future__ import annotations

import json
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


class _RankRows(torch.utils.data.IterableDataset):
    def __init__(self, tokens: torch.Tensor, rank: int, world_size: int, batch_size: int, first_row: int):
        self.tokens, self.rank, self.world_size, self.batch_size = tokens, rank, world_size, batch_size
        self.first_row = first_row

    def __iter__(self):
        span = self.world_size * self.batch_size  # rows per micro-step over all ranks
        for start in range(self.first_row, len(self.tokens) - span + 1, span):
            for t in self.tokens[start + self.rank * self.batch_size:start + (self.rank + 1) * self.batch_size]:
                yield {"input_ids": t[:-1], "labels": t[1:]}


class IndexedRows(L.LightningDataModule):
    """Fixed random token rows dealt in index order: micro-step s of rank r of W takes rows
    ``(s W + r) B .. (s W + r + 1) B - 1``. The rows of an optimizer step are then the same set for any number
    of ranks and micro-batches making the same global batch, so the runs below differ only in how the gradient
    is reduced. (An iterable dataset: Lightning leaves its order alone.) A resumed run starts at the rows of
    the step it resumes at."""

    def __init__(self, vocab_size: int = 64, seq_len: int = 16, batch_size: int = 4, rows: int = 256):
        super().__init__()
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.tokens = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        trainer = self.trainer
        done = trainer.global_step * self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        rows = _RankRows(self.tokens, trainer.global_rank, trainer.world_size, self.batch_size, done)
        return torch.utils.data.DataLoader(rows, batch_size=self.batch_size)


def _fit_step_losses(out: Path, devices: int, batch: int, accumulate: int, steps: int, *extra: str,
                     overlays: tuple[str, ...] = ()) -> list[float]:
    """Trains a tiny model through the command line on ``IndexedRows``; the loss of every optimizer step over the
    whole global batch, as tools/scale_runs.py's probe records it."""
    args = [
        sys.executable, "-m", "mom_lit", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        *[w for name in overlays for w in ("--config", str(REPO / "configs" / name))],
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}", "--trainer.num_nodes=1",
        f"--trainer.accumulate_grad_batches={accumulate}", f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        "--trainer.callbacks=[]", "--trainer.callbacks+=scale_runs.ScaleProbe",
        f"--trainer.callbacks.out_dir={out}", "--trainer.callbacks.warmup_steps=0",
        "--model.config.hidden_size=32", "--model.config.num_layers=2", "--model.config.head_dim=8",
        "--model.config.chunk_size=16", "--model.config.backend=eager", "--model.warmup_steps=1",
        # The load-balancing loss is computed on each rank's own rows, not the global batch's: a genuine
        # difference between layouts that would hide the one tested here.
        "--model.config.aux_loss_coef=0.0",
        "--data=test_ddp.IndexedRows", f"--data.batch_size={batch}", *extra,
    ]
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), str(REPO / "tools"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(args, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "probe.json").read_text())["step_losses"]


@pytest.mark.slow
def test_ddp_overlay_matches_one_process_at_the_same_global_batch(tmp_path):
    """configs/ddp.yaml (gradients as bucket views, no unused-parameter search) on 2 gloo ranks of 4 rows
    against 1 process accumulating 2 micro-batches of 4 rows: the same 8 rows per step, so the losses of every
    step agree to fp32 reduction-order noise; so do they with ``static_graph`` (valid without accumulation).
    With the bf16 gradient reduction they agree to a stated, looser tolerance."""
    steps, ddp = 4, ("ddp.yaml",)
    one = _fit_step_losses(tmp_path / "one", 1, 4, 2, steps)
    two = _fit_step_losses(tmp_path / "two", 2, 4, 1, steps, overlays=ddp)
    static = _fit_step_losses(tmp_path / "static", 2, 4, 1, steps, "--trainer.strategy.init_args.static_graph=true",
                              overlays=ddp)
    bf16 = _fit_step_losses(tmp_path / "bf16", 2, 4, 1, steps, "--trainer.strategy.init_args.gradient_reduction=bf16",
                            overlays=ddp)
    assert len(one) == len(two) == len(bf16) == steps
    assert len(set(one)) == steps  # training moved the loss: the equality is not that of a frozen model
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(static), torch.tensor(one), rtol=1e-5, atol=1e-5)
    # bf16 keeps 8 mantissa bits: gradients carry relative errors of ~4e-3 into each AdamW step, which moved the
    # loss by < 1e-4 over these steps; 1e-3 leaves room for other seeds and platforms.
    assert bf16[0] == one[0] and bf16[1:] != one[1:]  # the hook acts (from the first reduced gradient on)
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(one), rtol=0, atol=1e-3)


@pytest.mark.parametrize("rule", ["gated_delta", "delta", "gla", "simple_gla", "linear"])
def test_every_parameter_gets_a_gradient_when_memories_go_unselected(rule):
    """What makes ``find_unused_parameters: false`` (configs/ddp.yaml) and ``static_graph: true`` valid for MoM: with
    one token routed to one of four memories (three unselected in every layer), no load-balancing loss and no
    shared memory, every parameter still takes part in the backward pass. The memories' projections are
    stacked (E, out, in) tensors, so an unselected memory's slice gets a zero gradient, never none."""
    from mom_lit import MoMConfig
    from mom_lit.model import MoMForCausalLM

    cfg = MoMConfig.from_preset("debug", update_rule=rule, backend="eager", num_memories=4, topk=1,
                                shared_memory=False, aux_loss_coef=0.0)
    torch.manual_seed(0)
    model = MoMForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (1, 1))
    out = model(ids, labels=ids)
    out.loss.backward()
    loads = list(out.router_load)
    assert len(loads) == cfg.num_layers and all(int((load > 0).sum()) == 1 for load in loads)  # one memory each
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_ddp_strategy_refuses_an_unknown_or_conflicting_gradient_reduction():
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    from mom_lit.training.strategies import MoMDDPStrategy

    with pytest.raises(ValueError, match="gradient_reduction must be one of"):
        MoMDDPStrategy(gradient_reduction="fp16")
    with pytest.raises(ValueError, match="leave ddp_comm_hook unset"):
        MoMDDPStrategy(gradient_reduction="bf16", ddp_comm_hook=fp16_compress_hook)
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="static_graph=True.*accumulate_grad_batches=1, got 2"):
        MoMDDPStrategy(static_graph=True).setup(SimpleNamespace(accumulate_grad_batches=2))
