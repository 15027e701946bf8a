"""AdamW parameter groups (decay only on matrices) and the linear warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

# Segments that wrappers (activation checkpointing, FSDP, torch.compile) insert into parameter names.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """The parameter name as the unwrapped model spells it."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def decays(param: nn.Parameter) -> bool:
    """Weight decay applies to matrices only; gate parameters (``A_log``, ``dt_bias``), norms and biases are
    vectors or carry ``_no_weight_decay``."""
    return param.ndim >= 2 and not getattr(param, "_no_weight_decay", False)


def decay_plan(model: nn.Module) -> dict[str, bool]:
    """Whether each parameter of the unwrapped model decays, by name.

    Taken before any wrapping: sharding (FSDP) flattens parameters and drops their attributes, so neither
    ``ndim`` nor ``_no_weight_decay`` can be read afterwards.
    """
    return {canonical_name(name): decays(p) for name, p in model.named_parameters()}


def param_groups(model: nn.Module, weight_decay: float, plan: dict[str, bool] | None = None) -> list[dict]:
    """Two AdamW groups, ``decay`` and ``no_decay`` (empty ones dropped); shared (tied) parameters appear once."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    plan = decay_plan(model) if plan is None else plan
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = canonical_name(name)
        if key not in plan:
            raise ValueError(f"parameter {name!r} is missing from the weight-decay plan")
        (decay if plan[key] else no_decay).append(p)
    groups = [dict(name="decay", params=decay, weight_decay=weight_decay),
              dict(name="no_decay", params=no_decay, weight_decay=0.0)]
    return [g for g in groups if g["params"]]


@dataclass
class WarmupCosine:
    """LR multiplier for optimizer step ``step`` (0-based): linear warm-up to 1 over ``warmup_steps``, then a
    half cosine down to ``min_ratio`` at ``total_steps``, constant afterwards.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 0:
            return self.min_ratio
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
