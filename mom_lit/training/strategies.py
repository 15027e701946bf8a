"""Lightning's DDP strategy with the gradient-reduction precision as a typed option (``configs/ddp.yaml``)."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

GRADIENT_REDUCTIONS = ("fp32", "bf16")


class MoMDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose gradient all-reduce may run in bf16, on any device.

    Lightning registers DDP communication hooks on CUDA only; this strategy registers the bf16 compression hook
    wherever DDP runs (also over gloo on CPUs, where the tests check it). Every other argument is
    ``DDPStrategy``'s, and through it ``torch.nn.parallel.DistributedDataParallel``'s (``bucket_cap_mb``,
    ``gradient_as_bucket_view``, ``static_graph``, ``find_unused_parameters``).

    ``static_graph=True`` is refused with ``trainer.accumulate_grad_batches > 1``: Lightning runs the first
    micro-batch under DDP's ``no_sync``, and a static-graph DDP whose first backward pass does not reduce fails
    inside torch (an internal assertion of its reducer).

    Args:
        gradient_reduction: ``"fp32"`` reduces the gradients as they are; ``"bf16"`` casts each bucket to bf16
            for the all-reduce (half the bytes on the wire) and the averaged result back, which perturbs the
            update by bf16's relative rounding (about 4e-3 per gradient element).
    """

    def __init__(self, gradient_reduction: Literal["fp32", "bf16"] = "fp32", **kwargs: Any) -> None:
        if gradient_reduction not in GRADIENT_REDUCTIONS:
            raise ValueError(f"gradient_reduction must be one of {GRADIENT_REDUCTIONS}, got {gradient_reduction!r}")
        if gradient_reduction != "fp32" and kwargs.get("ddp_comm_hook") is not None:
            raise ValueError("gradient_reduction='bf16' registers its own communication hook: leave ddp_comm_hook "
                             "unset or set gradient_reduction='fp32'")
        super().__init__(**kwargs)
        self.gradient_reduction = gradient_reduction

    def _register_ddp_hooks(self) -> None:
        if self.gradient_reduction == "fp32":
            super()._register_ddp_hooks()
            return
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        self.model.register_comm_hook(state=None, hook=bf16_compress_hook)  # None: the default process group

    def setup(self, trainer: L.Trainer) -> None:
        if self._ddp_kwargs.get("static_graph") and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"static_graph=True (trainer.strategy) needs trainer.accumulate_grad_batches=1, got "
                f"{trainer.accumulate_grad_batches}: DDP's static graph cannot start under no_sync, which "
                "gradient accumulation uses; set static_graph: false or accumulate_grad_batches: 1")
        super().setup(trainer)
