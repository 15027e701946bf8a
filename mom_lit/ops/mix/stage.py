"""The mix stage in Triton: ``GatedRMSNorm(sum_j w_j o_j, gate)`` per token and head, reading each token's slot
outputs in place from the scan's segment-sorted output (kernels in ``kernels.py``; the reference in
``reference.py``)."""

from __future__ import annotations

import torch

__all__ = ["mix_gated_rms_norm"]


class _MixGatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, rank, weight, gate, norm_weight, eps, launch):
        from mom_lit.ops.mix import kernels as kern  # Triton is imported only where its kernels run

        o, weight = o.contiguous(), weight.contiguous()
        gate = gate.contiguous() if gate is not None else None
        out = kern.mix_fwd(o, rank, weight, gate, norm_weight, eps, launch)
        ctx.save_for_backward(o, rank, weight, gate, norm_weight)
        ctx.eps, ctx.launch = eps, launch
        return out

    @staticmethod
    def backward(ctx, dout):
        from mom_lit.ops.mix import kernels as kern  # Triton is imported only where its kernels run

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
