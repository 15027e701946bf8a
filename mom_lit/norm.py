"""RMSNorm, the gated per-head RMSNorm of the MoM output and the L2 norm of queries and keys (plain torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """``RMSNorm(x) * swish(gate)`` over the last dimension (one head)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        if gate is None:
            return y
        return (y.float() * F.silu(gate.float())).to(x.dtype)


def _l2_normalize_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class _L2Normalize(torch.autograd.Function):
    """``y = x r``, ``r = rsqrt(sum x^2 + eps)`` over the last dimension in fp32, with the explicit backward
    ``dx = r (dy - y sum(dy y))``: a few passes where autograd's chain of pow, sum, rsqrt and mul takes twice
    as many. Keeps y (fp32) and r."""

    @staticmethod
    def forward(ctx, x, eps):
        x32 = x.float()
        r = torch.rsqrt((x32 * x32).sum(-1, keepdim=True).add_(eps))  # (..., 1)
        y = x32 * r
        ctx.save_for_backward(y, r)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        y, r = ctx.saved_tensors
        dy32 = dy.float()
        dot = (dy32 * y).sum(-1, keepdim=True)  # (..., 1)
        dx = dy32 * r
        dx.addcmul_(y, dot.mul_(r), value=-1)
        return dx.to(dy.dtype), None


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum x^2 + eps)`` over the last dimension, computed in fp32, in x's dtype. Eagerly with a
    hand-written backward; under ``torch.compile`` the plain expression, which the compiler fuses both ways. A
    float64 input (the precision reference runs) also takes the plain expression: its fp32 gradient, rounded in
    another order, would move float64 results by more than float64 rounding."""
    if (torch.compiler.is_compiling() or x.dtype == torch.float64
            or not (torch.is_grad_enabled() and x.requires_grad)):
        return _l2_normalize_reference(x, eps)
    return _L2Normalize.apply(x, eps)
