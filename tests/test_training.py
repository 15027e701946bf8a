"""The Lightning module: parameter groups, LR schedule, FLOPs, throughput, metrics and short fits."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from mom_lit import MoMConfig, MoMForCausalLM
from mom_lit.training import MoMLightningModule, WarmupCosine, decay_plan, param_groups
from mom_lit.training.flops import (active_parameters, matmul_flops_per_token, scan_flops_per_token,
                                   training_flops_per_token)
from mom_lit.training.metrics import SliceAccuracy
from mom_lit.training.throughput import TokenThroughput, compute_dtype

LR_TOL = 1e-12  # the schedule is closed-form float arithmetic
LOSS_TOL = 1e-5  # fp32 means of the same losses in a different order


def tiny_config(**overrides) -> MoMConfig:
    values = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, num_memories=3, topk=2,
                  shared_memory=True, chunk_size=8, backend="eager")
    return MoMConfig(**{**values, **overrides})


class RandomTokens(L.LightningDataModule):
    """Fixed random token rows; optional per-example ``slice`` ids and supervision on the second half only."""

    def __init__(self, vocab_size: int = 61, seq_len: int = 13, batch_size: int = 3, rows: int = 12,
                 with_slices: bool = False):
        super().__init__()
        self.vocab_size, self.seq_len, self.batch_size, self.rows = vocab_size, seq_len, batch_size, rows
        self.with_slices = with_slices

    def _rows(self, seed: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.vocab_size, (self.rows, self.seq_len + 1), generator=g)
        rows = []
        for i, row in enumerate(tokens):
            example = {"input_ids": row[:-1], "labels": row[1:].clone()}
            if self.with_slices:
                example["labels"][: self.seq_len // 2] = -100
                example["slice"] = torch.tensor(2 + i % 3)
            rows.append(example)
        return rows

    def train_dataloader(self):
        return DataLoader(self._rows(0), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self._rows(1), batch_size=self.batch_size, shuffle=False)

    test_dataloader = val_dataloader


def fit(module: MoMLightningModule, data: RandomTokens, tmp_path, **trainer_kwargs) -> L.Trainer:
    kwargs = dict(max_steps=4, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  num_sanity_val_steps=0)
    trainer = L.Trainer(**{**kwargs, **trainer_kwargs})
    trainer.fit(module, data)
    return trainer


# Parameter groups -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["gated_delta", "gla", "linear"])
def test_weight_decay_only_on_matrices(rule):
    model = MoMForCausalLM(tiny_config(update_rule=rule))
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        expected = "decay" if p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) else "no_decay"
        assert id(p) in ids[expected], name
    no_decay_names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if id(p) in ids["no_decay"]}
    assert "weight" in no_decay_names  # RMSNorm scales
    if rule == "gated_delta":
        assert {"A_log", "dt_bias"} <= no_decay_names
    if rule == "gla":
        assert "gk_bias" in no_decay_names  # a 2-D bias, excluded by its flag
    # Every parameter exactly once: the tied embedding/LM-head matrix is not duplicated.
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters())) == len(ids["decay"] | ids["no_decay"])


def test_weight_decay_plan_survives_wrapping():
    """Wrapped (here: activation-checkpointed) parameter names map back onto the plan of the bare model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from mom_lit.model import MoMBlock

    model = MoMForCausalLM(tiny_config())
    plan = decay_plan(model)
    before = [[id(p) for p in g["params"]] for g in param_groups(model, 0.01, plan)]
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, MoMBlock))
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    after = [[id(p) for p in g["params"]] for g in param_groups(model, 0.01, plan)]
    assert before == after
    with pytest.raises(ValueError, match="missing from the weight-decay plan"):
        param_groups(model, 0.01, {})
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


# LR schedule --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup,total,floor", [(5, 23, 0.1), (1, 7, 0.0), (0, 10, 0.5), (9, 9, 0.1)])
def test_warmup_cosine_shape(warmup, total, floor):
    f = WarmupCosine(warmup, total, floor)
    values = [f(s) for s in range(total + 5)]
    for s in range(warmup):  # linear ramp reaching 1 at the last warm-up step
        assert values[s] == pytest.approx((s + 1) / warmup, abs=LR_TOL)
    decay = values[warmup:total + 1]
    if warmup < total:
        assert decay[0] == pytest.approx(1.0, abs=LR_TOL)
        mid = warmup + (total - warmup) / 2
        if mid == int(mid):
            assert f(int(mid)) == pytest.approx((1 + floor) / 2, abs=LR_TOL)
    assert all(a >= b - LR_TOL for a, b in zip(decay, decay[1:]))  # non-increasing after warm-up
    assert all(v == pytest.approx(floor, abs=LR_TOL) for v in values[total:])  # the floor, then constant


def test_warmup_cosine_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(-1, 10, 0.1)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(0, 0, 0.1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        WarmupCosine(1, 10, 1.5)


@pytest.mark.slow
def test_fit_follows_schedule_and_counts_tokens(tmp_path):
    """The optimizer's LR at every step matches the schedule from trainer.max_steps; tokens are counted."""
    module = MoMLightningModule(tiny_config(), lr=1e-3, warmup_steps=2, min_lr_ratio=0.2)
    seen = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    data = RandomTokens()
    trainer = fit(module, data, tmp_path, max_steps=6, callbacks=[RecordLR()], limit_val_batches=0)
    expected = [1e-3 * WarmupCosine(2, 6, 0.2)(s) for s in range(6)]
    assert seen == pytest.approx(expected, abs=LR_TOL)
    assert trainer.global_step == 6
    assert module.tokens_seen == 6 * data.batch_size * data.seq_len
    assert {"train/loss", "train/lm_loss", "train/aux_loss", "train/ppl", "train/tokens_seen",
            "throughput/tokens_per_sec"} <= set(trainer.logged_metrics)
    assert float(trainer.logged_metrics["train/ppl"]) == pytest.approx(
        math.exp(float(trainer.logged_metrics["train/lm_loss"])), rel=1e-5)
    assert "throughput/mfu" not in trainer.logged_metrics  # no known peak on a CPU


@pytest.mark.parametrize("rule", ["gated_delta", "gla"])
def test_bf16_mixed_fit_with_clipping_matches_fp32(rule, tmp_path):
    """Lightning's ``bf16-mixed`` (fp32 weights, bf16 autocast forward, custom-function backwards outside
    autocast) with gradient clipping trains like fp32: same first-step loss to bf16 rounding, finite weights
    that moved. This is how every GPU config of the project runs."""
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        module = MoMLightningModule(tiny_config(update_rule=rule), lr=1e-3, warmup_steps=0)
        before = [p.detach().clone() for p in module.parameters()]
        seen = []

        class RecordLoss(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen.append(float(outputs["loss"]))

        fit(module, RandomTokens(), tmp_path / precision, max_steps=3, precision=precision, gradient_clip_val=1.0,
            callbacks=[RecordLoss()], limit_val_batches=0)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
        losses[precision] = seen
    assert len(losses["bf16-mixed"]) == 3
    assert losses["bf16-mixed"][0] == pytest.approx(losses["32-true"][0], rel=2e-2)


# Evaluation metrics -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_validation_loss_is_token_weighted_and_slices_are_reported(tmp_path):
    data = RandomTokens(with_slices=True, rows=10, batch_size=4)  # batches of 4, 4 and 2 rows
    module = MoMLightningModule(tiny_config(), warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.validate(module, data)[0]

    rows = data._rows(1)
    module.eval()
    nll, count, hits = 0.0, 0, {}
    with torch.no_grad():
        for row in rows:
            out = module.model(row["input_ids"][None], targets=row["labels"][None])
            mask = row["labels"] != -100
            nll += float(out.lm_loss) * int(mask.sum())
            count += int(mask.sum())
            ok = (out.logits[0].argmax(-1) == row["labels"])[mask]
            h = hits.setdefault(int(row["slice"]), [0, 0])
            h[0] += int(ok.sum())
            h[1] += int(mask.sum())
    assert metrics["val/loss"] == pytest.approx(nll / count, abs=LOSS_TOL)
    assert metrics["val/ppl"] == pytest.approx(math.exp(nll / count), rel=LOSS_TOL)
    assert {k for k in metrics if k.startswith("val/acc_slice")} == {f"val/acc_slice{s}" for s in hits}
    for s, (ok, total) in hits.items():
        assert metrics[f"val/acc_slice{s}"] == pytest.approx(ok / total, abs=1e-6)
    test_metrics = trainer.test(module, data)[0]
    assert test_metrics["test/loss"] == pytest.approx(nll / count, abs=LOSS_TOL)


def test_slice_accuracy_counts():
    metric = SliceAccuracy()
    logits = torch.zeros(3, 2, 5)
    logits[0, 0, 1] = logits[0, 1, 2] = 1  # predicts [1, 2]
    logits[1, :, 3] = 1  # predicts [3, 3]
    logits[2, :, 4] = 1  # predicts [4, 4]
    targets = torch.tensor([[1, 0], [3, -100], [0, -100]])
    metric.update(logits, targets, torch.tensor([7, 9, 7]))
    result = metric.compute()
    assert set(result) == {7, 9}
    assert float(result[7]) == pytest.approx(1 / 3)  # row 0: 1 of 2; row 2: 0 of 1
    assert float(result[9]) == 1.0
    with pytest.raises(ValueError, match="slices"):
        metric.update(logits, targets, torch.tensor([1, 2]))


# FLOPs and throughput -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["gated_delta", "delta", "gla", "simple_gla", "linear"])
@pytest.mark.parametrize("conv_size,gate", [(0, False), (4, True)])
def test_matmul_flops_match_parameters_of_single_memory_model(rule, conv_size, gate):
    """Without a router every weight matrix is used once per token: forward FLOPs = 2 x its entries."""
    cfg = tiny_config(num_memories=1, topk=1, shared_memory=False, update_rule=rule, conv_size=conv_size,
                      use_output_gate=gate, gla_gate_rank=4)
    model = MoMForCausalLM(cfg)
    matrices = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and not getattr(p, "_no_weight_decay", 0))
    assert matmul_flops_per_token(cfg) == 2 * matrices


def test_flops_count_only_active_memories():
    base = tiny_config(num_memories=4, topk=2, shared_memory=True)
    more_memories = tiny_config(num_memories=8, topk=2, shared_memory=True)
    # Twice the memories at equal top-k: only the router grows.
    assert matmul_flops_per_token(more_memories) - matmul_flops_per_token(base) == 2 * 2 * 32 * 4
    assert scan_flops_per_token(more_memories) == scan_flops_per_token(base)
    assert training_flops_per_token(base) == 3 * (matmul_flops_per_token(base) + scan_flops_per_token(base))


@pytest.mark.parametrize("rule", ["gated_delta", "gla", "linear"])
def test_active_parameters_leave_out_the_skipped_memories(rule):
    """A token of an E=4, top-2 model passes through as many parameters as an E=2, top-2 model holds, less the
    two extra router rows per layer."""
    four = tiny_config(num_memories=4, topk=2, shared_memory=True, update_rule=rule, gla_gate_rank=4)
    two = tiny_config(num_memories=2, topk=2, shared_memory=True, update_rule=rule, gla_gate_rank=4)
    total_four, total_two = MoMForCausalLM(four).num_parameters(), MoMForCausalLM(two).num_parameters()
    router_rows = four.num_layers * 2 * four.hidden_size
    assert active_parameters(four, total_four) == total_two + router_rows < total_four
    assert active_parameters(two, total_two) == total_two
    single = tiny_config(num_memories=1, topk=1, shared_memory=False, update_rule=rule)
    assert active_parameters(single, 1234) == 1234


def test_token_throughput_window_and_mfu():
    meter = TokenThroughput(window=3, flops_per_token=10.0, peak_flops=1000.0)
    assert meter.compute() == {}
    for t, n in [(0.0, 0), (1.0, 100), (2.0, 300), (4.0, 400)]:
        meter.update(n, now=t)
    out = meter.compute(world_size=2)
    assert out["tokens_per_sec"] == pytest.approx((400 - 100) / 3.0)  # the window holds the last 3 updates
    assert out["mfu"] == pytest.approx(100.0 * 10.0 / (1000.0 * 2))
    meter.reset()
    assert meter.compute() == {}
    assert "mfu" not in TokenThroughput(2).compute()
    with pytest.raises(ValueError, match="window"):
        TokenThroughput(1)
    assert compute_dtype("bf16-mixed") == torch.bfloat16 and compute_dtype("32-true") == torch.float32


# Module options -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"), (dict(throughput_window=1), "throughput_window"),
])
def test_module_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoMLightningModule(tiny_config(), **kwargs)


def test_activation_checkpointing_keeps_gradients_and_checkpoint_layout():
    torch.manual_seed(0)
    plain = MoMLightningModule(tiny_config())
    wrapped = MoMLightningModule(tiny_config(), activation_checkpointing=True)
    wrapped.load_state_dict(plain.state_dict())
    wrapped.configure_model()
    wrapped.configure_model()  # idempotent: no nested wrappers
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    batch = RandomTokens()._rows(0)[:2]
    batch = {k: torch.stack([r[k] for r in batch]) for k in ("input_ids", "labels")}
    for m in (plain, wrapped):
        m(batch).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_compile_is_in_place():
    module = MoMLightningModule(tiny_config(), compile=True)
    keys = list(module.state_dict())
    module.configure_model()
    assert module.model._compiled_call_impl is not None
    assert list(module.state_dict()) == keys


def test_packed_batch_goes_through_cu_seqlens():
    """With cu_seqlens the (B, T) batch is flattened to one row whose documents do not see each other."""
    torch.manual_seed(0)
    module = MoMLightningModule(tiny_config()).eval()
    rows = RandomTokens()._rows(0)[:2]
    packed = {"input_ids": torch.stack([r["input_ids"] for r in rows]),
              "labels": torch.stack([r["labels"] for r in rows]),
              "cu_seqlens": torch.tensor([0, 5, 13, 26], dtype=torch.int32)}
    with torch.no_grad():
        out = module(packed)
        first = module.model(packed["input_ids"][:1, :5], targets=packed["labels"][:1, :5])
    assert out.logits.shape == (1, 26, 61)
    torch.testing.assert_close(out.logits[0, :5], first.logits[0], rtol=1e-5, atol=1e-5)


# The command line, end to end -----------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
# The quickstart recipe on a toy model and short rows; RoutingStatsCallback is the last callback of the config,
# so `--trainer.callbacks.log_every_n_steps` reaches it.
TINY_QUICKSTART = [
    "--config", str(REPO / "configs" / "quickstart.yaml"),
    "--model.config.hidden_size=32", "--model.config.num_layers=2", "--model.config.head_dim=8",
    "--model.config.chunk_size=16", "--model.config.backend=eager", "--model.warmup_steps=2",
    "--data.init_args.seq_len=32", "--data.init_args.batch_size=4",
    "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.callbacks.log_every_n_steps=1",
]


class StopAtStep(L.Callback):
    """Ends fit after ``step`` optimizer steps, like an interrupted job (used by the CLI tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def run_cli(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "mom_lit", "fit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def event_tags(run_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set[str]] = {}
    for events in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for kind, names in acc.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, set()).update(names)
    return tags


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_quickstart_cli_logs_to_tensorboard_and_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    run_cli(tmp_path, *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={whole}")
    run_dir = whole / "quickstart" / "version_0"
    tags = event_tags(run_dir)
    assert {"train/loss", "train/lm_loss", "train/aux_loss", "train/ppl", "train/tokens_seen",
            "throughput/tokens_per_sec", "val/loss", "val/ppl", "lr-AdamW/decay", "lr-AdamW/no_decay",
            "routing/starved", "routing/layer0/load_mem0", "routing/layer1/router_entropy",
            "routing/layer1/load_entropy", "routing/layer1/max_min_ratio"} <= set(tags["scalars"])
    assert "routing/load_heatmap" in tags["images"]
    assert {"routing/load_share", "routing/router_entropy"} <= set(tags["histograms"])

    # Interrupted after 3 of 6 steps, then resumed with `--ckpt_path last` into the same run folder.
    parts = tmp_path / "parts"
    run_cli(tmp_path, *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={parts}",
            "--trainer.callbacks+=test_training.StopAtStep", "--trainer.callbacks.step=3")
    assert load_checkpoint(parts / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 3
    run_cli(tmp_path, *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={parts}", "--ckpt_path", "last")
    assert not (parts / "quickstart" / "version_1").exists()

    expected = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    resumed = load_checkpoint(parts / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == expected["global_step"] == 6
    assert resumed["tokens_seen"] == expected["tokens_seen"] == 6 * 4 * 32
    assert resumed["state_dict"].keys() == expected["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    for a, b in zip(expected["optimizer_states"][0]["state"].values(),
                    resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["lr_schedulers"][0]["_last_lr"] == expected["lr_schedulers"][0]["_last_lr"]

    # The checkpoint alone rebuilds the module (its config is stored as plain values).
    module = MoMLightningModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.config.num_layers == 2 and module.config.vocab_size == 320
    assert torch.equal(module.model.embed.weight, expected["state_dict"]["model.embed.weight"])
