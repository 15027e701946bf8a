"""Triton kernels of the mix stage: per token, the routing-weighted sum of its J slot outputs (read in place from
the scan's sorted output through ``rank``), the per-head RMSNorm and the swish output gate, in one pass; the
backward recomputes the sum and writes every slot's gradient row once (``rank`` is a permutation: no scatter-add).
The kernels also run on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mom_lit.ops.stage_launch import DEFAULT_LAUNCH, StageLaunchConfig, launch_config, row_block

__all__ = ["mix_bwd", "mix_fwd"]


@triton.jit
def _mixed_rows(o, rank, weight, offs_t, mask_t, col, mask_d, J: tl.constexpr, HV: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr):
    """(BT, BD) fp32 sum_j weight[t, j] o[rank[t * J + j]] over one head's columns."""
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(J):
        row = tl.load(rank + offs_t * J + j, mask=mask_t, other=0).to(tl.int64)
        w = tl.load(weight + offs_t * J + j, mask=mask_t, other=0.0).to(tl.float32)
        x = tl.load(o + row[:, None] * HV + col[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        acc += w[:, None] * x.to(tl.float32)
    return acc


@triton.jit
def _mix_fwd_kernel(o, rank, weight, gate, norm_weight, out, N, eps, J: tl.constexpr, HV: tl.constexpr,
                    D: tl.constexpr, HAS_GATE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    pid_t, offs_t, offs_d, mask_t, mask_d, mask, col = row_block(N, D, BT, BD)
    acc = _mixed_rows(o, rank, weight, offs_t, mask_t, col, mask_d, J, HV, BT, BD)
    r = tl.rsqrt(tl.sum(acc * acc, axis=1) / D + eps)
    y = acc * r[:, None] * tl.load(norm_weight + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        g = tl.load(gate + offs_t[:, None] * HV + col[None, :], mask=mask, other=0.0).to(tl.float32)
        y = y * g * tl.sigmoid(g)
    tl.store(out + offs_t[:, None] * HV + col[None, :], y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _mix_bwd_kernel(o, rank, weight, gate, norm_weight, dout, do, dweight, dgate, dnorm, N, eps,
                    J: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, D: tl.constexpr, HAS_GATE: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr):
    pid_t, offs_t, offs_d, mask_t, mask_d, mask, col = row_block(N, D, BT, BD)
    head = tl.program_id(1)
    acc = _mixed_rows(o, rank, weight, offs_t, mask_t, col, mask_d, J, HV, BT, BD)
    r = tl.rsqrt(tl.sum(acc * acc, axis=1) / D + eps)
    xhat = acc * r[:, None]
    nw = tl.load(norm_weight + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dy = tl.load(dout + offs_t[:, None] * HV + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate + offs_t[:, None] * HV + col[None, :], mask=mask, other=0.0).to(tl.float32)
        sg = tl.sigmoid(g)
        y = xhat * nw[None, :]
        dg = dy * y * sg * (1.0 + g * (1.0 - sg))
        tl.store(dgate + offs_t[:, None] * HV + col[None, :], dg.to(dgate.dtype.element_ty), mask=mask)
        dy = dy * g * sg
    dy = tl.where(mask, dy, 0.0)
    tl.store(dnorm + (pid_t * H + head) * D + offs_d, tl.sum(dy * xhat, axis=0), mask=mask_d)
    dxhat = dy * nw[None, :]
    # xhat = acc r with r = (mean(acc^2) + eps)^-1/2:  dacc = r (dxhat - xhat mean(dxhat xhat))
    dacc = r[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / D)[:, None])
    for j in tl.static_range(J):
        row = tl.load(rank + offs_t * J + j, mask=mask_t, other=0).to(tl.int64)
        w = tl.load(weight + offs_t * J + j, mask=mask_t, other=0.0).to(tl.float32)
        x = tl.load(o + row[:, None] * HV + col[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(do + row[:, None] * HV + col[None, :], (w[:, None] * dacc).to(do.dtype.element_ty), mask=mask)
        tl.store(dweight + (offs_t * J + j) * H + head, tl.sum(dacc * x, axis=1), mask=mask_t)


def mix_fwd(o: torch.Tensor, rank: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
            norm_weight: torch.Tensor, eps: float, launch: StageLaunchConfig | None = None) -> torch.Tensor:
    """(N, H, D) gated RMSNorm of sum_j weight[:, j] o[rank[t*J + j]]; o (L, H, D) contiguous, weight (N, J),
    gate (N, H, D) contiguous or None, norm_weight (D,)."""
    num_tokens, slots = weight.shape
    heads, dim = o.shape[1], o.shape[2]
    out = torch.empty(num_tokens, heads, dim, device=o.device, dtype=o.dtype)
    if num_tokens == 0:
        return out
    bt, bd, warps = launch_config(dim, (launch or DEFAULT_LAUNCH).mix_fwd)
    _mix_fwd_kernel[(triton.cdiv(num_tokens, bt), heads)](
        o, rank, weight, gate if gate is not None else o, norm_weight, out, num_tokens, eps, J=slots,
        HV=heads * dim, D=dim, HAS_GATE=gate is not None, BT=bt, BD=bd, num_warps=warps)
    return out


def mix_bwd(o, rank, weight, gate, norm_weight, dout, eps, launch: StageLaunchConfig | None = None):
    """Gradients of :func:`mix_fwd`: (do (L, H, D), dweight (N, J) fp32, dgate or None, dnorm_weight (D,) fp32)."""
    num_tokens, slots = weight.shape
    heads, dim = o.shape[1], o.shape[2]
    bt, bd, warps = launch_config(dim, (launch or DEFAULT_LAUNCH).mix_bwd)
    blocks = triton.cdiv(num_tokens, bt)
    do = torch.empty_like(o)
    dweight = torch.empty(num_tokens, slots, heads, device=o.device, dtype=torch.float32)
    dgate = torch.empty_like(gate) if gate is not None else None
    dnorm = torch.empty(blocks, heads, dim, device=o.device, dtype=torch.float32)
    if num_tokens == 0:
        return do, dweight.sum(-1), dgate, dnorm.sum((0, 1))
    _mix_bwd_kernel[(blocks, heads)](
        o, rank, weight, gate if gate is not None else o, norm_weight, dout.contiguous(), do, dweight,
        dgate if dgate is not None else do, dnorm, num_tokens, eps, J=slots, H=heads, HV=heads * dim, D=dim,
        HAS_GATE=gate is not None, BT=bt, BD=bd, num_warps=warps)
    return do, dweight.sum(-1), dgate, dnorm.sum((0, 1))
