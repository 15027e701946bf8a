"""RMSNorm and the gated per-head RMSNorm of the MoM output."""

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


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class _MixGatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, rank, weight, gate, norm_weight, eps, launch):
        from mom_lit.ops import layer_triton as kern

        o, weight = o.contiguous(), weight.contiguous()
        gate = gate.contiguous() if gate is not None else None
        out = kern.mix_fwd(o, rank, weight, gate, norm_weight, eps, launch)
        ctx.save_for_backward(o, rank, weight, gate, norm_weight)
        ctx.eps, ctx.launch = eps, launch
        return out

    @staticmethod
    def backward(ctx, dout):
        from mom_lit.ops import layer_triton as kern

        o, rank, weight, gate, norm_weight = ctx.saved_tensors
        do, dweight, dgate, dnorm = kern.mix_bwd(o, rank, weight, gate, norm_weight, dout, ctx.eps, ctx.launch)
        return do, None, dweight.to(weight.dtype), dgate, dnorm.to(norm_weight.dtype), None, None


def mix_gated_rms_norm(o: torch.Tensor, rank: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                       norm_weight: torch.Tensor, eps: float, launch=None) -> torch.Tensor:
    """Triton fusion of the MoM output stage: ``GatedRMSNorm(sum_j weight[:, j] o_j, gate)`` per head, where
    slot j of token t is row ``rank[t * J + j]`` of the scan's segment-sorted output.

    Args:
        o: (L, H, V) sorted slot outputs; rank: (N_tok * J,) int64 sorted position of each token-major slot;
        weight: (N_tok, J) routing weights; gate: (N_tok, H, V) or None; norm_weight: (V,); launch: the kernels'
        ``StageLaunchConfig`` (None: the library's).
    Returns:
        (N_tok, H, V) in o's dtype. Sums and norms run in fp32 (the reference path rounds in between).
    """
    return _MixGatedRMSNorm.apply(o, rank, weight, gate, norm_weight, eps, launch)
