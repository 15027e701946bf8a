"""LightningModule that trains a MoM causal language model."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torchmetrics import MeanMetric

from mom_lit.config import MoMConfig
from mom_lit.interop.init_weights import load_init_weights
from mom_lit.model import MoMBlock, MoMForCausalLM, MoMOutput
from mom_lit.plan import resolve_plan
from mom_lit.training.faults import NONFINITE_POLICIES, NonFiniteStepError, describe_nonfinite, step_is_finite
from mom_lit.training.flops import training_flops_per_token
from mom_lit.training.metrics import SliceAccuracy
from mom_lit.training.optim import WarmupCosine, decay_plan, param_groups
from mom_lit.training.throughput import TokenThroughput

_EVAL_STAGES = ("val", "test")


def _is_fsdp(module: nn.Module | None) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def shard_blocks(model: MoMForCausalLM, mesh: Any) -> None:
    """FSDP2 plan: ``fully_shard`` each block (with its checkpoint wrapper, if any), then the root, which keeps
    the embedding, the final norm and the (tied) head. Each block's parameters are gathered just before its
    forward and backward and freed after; the root's stay gathered through the step.

    ``mesh`` is the 1-D data-parallel mesh the parameters are sharded over (Lightning's
    ``ModelParallelStrategy`` builds it; ``configs/fsdp2.yaml``).
    """
    from torch.distributed.fsdp import fully_shard

    for index, block in enumerate(model.blocks):
        # Every block but the last reshards after the forward; the last one's backward starts right away.
        fully_shard(block, mesh=mesh, reshard_after_forward=index < len(model.blocks) - 1)
    fully_shard(model, mesh=mesh)


class MoMLightningModule(L.LightningModule):
    """Trains ``MoMForCausalLM(config)`` with AdamW and a warm-up + cosine schedule.

    Batches are dicts with ``input_ids`` (B, T), already-shifted ``labels`` (B, T; -100 ignored), optionally
    ``cu_seqlens`` of the flattened (1, B*T) batch and a per-example ``slice`` id (MQAR), whose per-slice
    accuracy is then logged on validation and test.

    Logged: ``train/loss`` (what is optimised: LM loss + weighted auxiliary terms), ``train/lm_loss``,
    ``train/aux_loss`` (unweighted load balance, 1 = balanced), ``train/z_loss``, ``train/ppl`` (exp of the LM
    loss), ``train/tokens_seen`` (all ranks), ``throughput/tokens_per_sec`` (all ranks) and ``throughput/mfu``
    where the device's peak is known, ``memory/peak_allocated_gib`` on CUDA (the most GiB held by tensors since the
    process started); ``val/loss`` and ``val/ppl`` (token-weighted over the whole set), the same
    for ``test/``. The learning rate is logged by Lightning's ``LearningRateMonitor`` (in every config), per
    parameter group (``decay``/``no_decay``).

    Args:
        config: the model. From the command line every field is reachable: ``--model.config.num_layers=2``;
            ``config.vocab_size`` is linked from the data module by the CLI.
        lr: peak learning rate.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay of the weight matrices (never of gates, norms or biases).
        warmup_steps: optimizer steps of linear warm-up from ~0 to ``lr``.
        min_lr_ratio: the cosine decays to ``min_lr_ratio * lr`` at the last step (``trainer.max_steps``, or
            the Trainer's estimate from ``max_epochs``).
        compile: ``torch.compile`` the model (in place: checkpoints keep the plain parameter names).
        activation_checkpointing: recompute each block in the backward pass instead of storing its
            activations. Under FSDP prefer the strategy's ``activation_checkpointing_policy``; under
            ``ModelParallelStrategy`` (FSDP2, ``configs/fsdp2.yaml``) this is the switch, applied before sharding.
        throughput_window: training batches over which tokens/s and MFU are averaged.
        nonfinite: what a step with a non-finite loss or gradient does. ``"skip"``: the optimizer step is
            skipped (gradients dropped, so AdamW's moments and weight decay are untouched; the LR schedule
            still advances) and counted in ``train/skipped_steps``. ``"stop"``: training ends with a
            :class:`~mom_lit.training.faults.NonFiniteStepError` naming the step, the layers whose router went
            non-finite, the first non-finite parameters and gradients, and the first layer whose router or
            memory went non-finite in a re-run of the step's forward pass. The check costs one host
            synchronisation per optimizer step.
        init_weights: start a NEW run from these weights: an exported model directory (``save_pretrained``,
            ``mom-lit convert``), an fla directory or a ``.ckpt`` file, whose architecture must be
            ``config``'s (the differing fields are named otherwise). Only the parameters are taken: optimizer,
            step, schedule and data position start afresh, unlike resuming with ``--ckpt_path`` (whose weights
            replace these). Loaded here, before the Trainer runs or writes anything; recorded in checkpoints
            under ``init_weights``, not among the hyper-parameters (rebuilding from a checkpoint needs only it).
    """

    def __init__(
        self,
        config: MoMConfig,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        warmup_steps: int = 1024,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        activation_checkpointing: bool = False,
        throughput_window: int = 20,
        nonfinite: str = "skip",
        init_weights: str | None = None,
    ):
        super().__init__()
        if isinstance(config, dict):  # hyper-parameters read back from a checkpoint
            config = MoMConfig.from_dict(config)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if throughput_window < 2:
            raise ValueError(f"throughput_window must be >= 2, got {throughput_window}")
        # Validates warmup_steps and min_lr_ratio now rather than at the first optimizer step.
        WarmupCosine(warmup_steps, max(warmup_steps, 1), min_lr_ratio)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.save_hyperparameters({"config": config.to_dict(), "lr": lr, "betas": list(betas), "eps": eps,
                                   "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                                   "min_lr_ratio": min_lr_ratio, "compile": compile,
                                   "activation_checkpointing": activation_checkpointing,
                                   "throughput_window": throughput_window, "nonfinite": nonfinite})
        self.config = config
        self.model = MoMForCausalLM(config)
        if init_weights is not None:
            self.model.load_state_dict(load_init_weights(init_weights, config))
        self.init_weights = init_weights
        self._decay_plan = decay_plan(self.model)
        self._model_prepared = False
        self.eval_loss = nn.ModuleDict({stage: MeanMetric() for stage in _EVAL_STAGES})
        self.slice_accuracy = nn.ModuleDict({stage: SliceAccuracy() for stage in _EVAL_STAGES})
        self.tokens_seen = 0
        self.skipped_steps = 0
        # (loss, router entropy, batch) of the last training batch, read by the non-finite check.
        self._last_step: tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]] | None = None
        self._throughput: TokenThroughput | None = None

    # Model ----------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # Called by every fit/validate/test; wrapping twice would nest checkpoint wrappers.
        if self._model_prepared:
            return
        self._model_prepared = True
        if self.hparams.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            apply_activation_checkpointing(self.model, check_fn=lambda m: isinstance(m, MoMBlock))
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            self.model.configure_paths(compile_stages=False)
        if isinstance(strategy, ModelParallelStrategy):
            shard_blocks(self.model, strategy.device_mesh["data_parallel"])
        if self.hparams.compile:
            self.model.compile()

    def forward(self, batch: dict[str, torch.Tensor]) -> MoMOutput:
        input_ids, targets = batch["input_ids"], batch["labels"]
        cu_seqlens = batch.get("cu_seqlens")
        if cu_seqlens is not None:
            # Packed documents: one row, boundaries given by cu_seqlens.
            input_ids, targets = input_ids.reshape(1, -1), targets.reshape(1, -1)  # (1, B*T)
        return self.model(input_ids, targets=targets, cu_seqlens=cu_seqlens)

    # Training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        out = self(batch)
        self.log("train/loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        metrics = {"train/lm_loss": out.lm_loss.detach(), "train/ppl": out.lm_loss.detach().exp()}
        if out.aux_loss is not None:
            metrics["train/aux_loss"] = out.aux_loss.detach()
        if out.z_loss is not None:
            metrics["train/z_loss"] = out.z_loss.detach()
        self.log_dict(metrics, on_step=True, on_epoch=False)
        # Shapes are known on the host: counting tokens costs no synchronisation.
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self._last_step = (out.loss.detach(), out.router_entropy, batch)
        result: dict[str, Any] = {"loss": out.loss}
        if out.router_load is not None:
            # Read by RoutingStatsCallback; already detached.
            result["router_load"] = out.router_load
            result["router_entropy"] = out.router_entropy
        return result

    def on_train_start(self) -> None:
        # the FLOPs of the scan that runs here: the Triton tile on a GPU, the config's chunk length elsewhere
        chunk = resolve_plan(self.model.plans.config, self.device, torch.float32, trial_run=False).chunk_size
        self._throughput = TokenThroughput.for_device(
            self.hparams.throughput_window, training_flops_per_token(self.config, chunk), self.device,
            str(self.trainer.precision))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after backward (and the DDP gradient all-reduce) and before clipping and the optimizer step.
        if self._last_step is None:
            return
        loss, router_entropy, batch = self._last_step
        self._last_step = None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = step_is_finite(loss, [p.grad for p in params if p.grad is not None])
        if self.trainer.world_size > 1:
            # Under FSDP each rank sees only its shard of the gradients (and under any strategy only its own loss):
            # every rank must take the same decision, or the replicas drift apart.
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        if self.hparams.get("nonfinite", "skip") == "stop":
            raise NonFiniteStepError(f"non-finite training step at global step {self.trainer.global_step}: "
                                     f"{describe_nonfinite(self.model, loss, router_entropy, batch=batch)}")
        # Without gradients AdamW leaves every parameter and its moments as they are.
        for p in params:
            p.grad = None
        self.skipped_steps += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        if self.device.type == "cuda":
            # The caching allocator's counter: read on the host, no synchronisation.
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.log("memory/peak_allocated_gib", peak, on_step=True, on_epoch=False)
        if self._throughput is None:
            return
        self._throughput.update(self.tokens_seen)
        for name, value in self._throughput.compute(self.trainer.world_size).items():
            self.log(f"throughput/{name}", value, on_step=True, on_epoch=False)

    def on_validation_epoch_start(self) -> None:
        # Time spent validating is not training throughput: restart the window.
        if self._throughput is not None:
            self._throughput.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["init_weights"] = self.init_weights

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self.init_weights = checkpoint.get("init_weights", self.init_weights)

    # Evaluation -----------------------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self(batch)
        targets = batch["labels"]
        # Token-weighted: the set's mean loss, not the mean of batch means.
        self.eval_loss[stage].update(out.lm_loss, weight=(targets != -100).sum())
        if "slice" in batch:
            logits = out.logits.view(*targets.shape, -1)  # (B, T, V) even for a flattened batch
            self.slice_accuracy[stage].update(logits, targets, batch["slice"])

    def _eval_epoch_end(self, stage: str) -> None:
        loss = self.eval_loss[stage].compute()  # synchronised across ranks by torchmetrics
        self.eval_loss[stage].reset()
        # The loss is also shown in the progress bar; the rest goes to the loggers only.
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        metrics = {f"{stage}/ppl": loss.exp()}
        accuracy = self.slice_accuracy[stage]
        if accuracy.update_called:
            per_slice = accuracy.compute()
            accuracy.reset()
            metrics.update({f"{stage}/acc_slice{s}": a for s, a in per_slice.items()})
        # The values are already reduced (identical on every rank); sync_dist only averages equal scalars.
        self.log_dict(metrics, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # Optimisation ---------------------------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        model = self.trainer.strategy.model
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and _is_fsdp(model):
            # Lightning's FSDP precision plugin refuses norm clipping: the norm must cover every rank's shard,
            # which only the root FSDP module computes.
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, self._decay_plan)
        # Not fused: Lightning's mixed-precision plugin refuses to clip the gradients of an optimizer that
        # unscales them itself, and every config clips. On CUDA torch picks the multi-tensor (foreach) step.
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        total = self.trainer.estimated_stepping_batches
        if total == float("inf") or total < 1:
            raise ValueError("the LR schedule needs a finite run: set trainer.max_steps or trainer.max_epochs")
        schedule = WarmupCosine(hp.warmup_steps, int(total), hp.min_lr_ratio)
        # Passed as a plain function, which LambdaLR leaves out of its state: a resumed run follows the
        # schedule of its own max_steps (e.g. an extended run) rather than the one it was saved with.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
