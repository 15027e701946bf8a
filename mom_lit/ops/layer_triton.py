"""Triton kernels of the MoM layer around the scan: the slot stage before it and the mix stage after it.

Slot stage: gather, short convolution, SiLU and L2 norm in one pass.

Every sorted slot row ``i`` reads its pre-convolution inputs straight from the projections (``src[rows[i]]``: no
gathered copy), convolves along its segment (``position`` restarts at each segment start; the slot stage of a
training forward has no cached conv state), applies SiLU and, for q and k, the per-head L2 norm. The backward
recomputes the forward from the projections (nothing but the indices is kept) in two kernels: one writes the
pre-activation gradient and the per-block filter gradients, the next runs the transposed convolution and writes
the source gradient rows.

A channel group is one head of q, k or v (D channels); programs are (block of BT rows, head).

Mix stage: per token, the routing-weighted sum of its J slot outputs (read in place from the scan's sorted
output through ``rank``), the per-head RMSNorm and the swish output gate, in one pass; its backward recomputes
the sum and writes every slot's gradient row once (``rank`` is a permutation: no scatter-add).

Row offsets are int64: slots x channels overflows int32 at MoM sizes. The kernels also run on CPU under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BT = 32  # rows per program


@triton.jit
def _row_block(num_rows, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """This program's block: rows pid_t * BT .. + BT of ``num_rows``, the D columns of head program_id(1).

    Returns pid_t, row offsets (BT,), column offsets within the head (BD,), their masks, the (BT, BD) mask and the
    head's columns (BD,) in the (rows, heads x D) layout.
    """
    pid_t, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    mask_t, mask_d = offs_t < num_rows, offs_d < D
    return pid_t, offs_t, offs_d, mask_t, mask_d, mask_t[:, None] & mask_d[None, :], head * D + offs_d


@triton.jit
def _pre_activation(src, src_stride, rows, position, weight, offs_t, mask_t, col, mask_d,
                    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """(BT, BD) fp32 causal convolution of the rows ``offs_t`` inside their segments (zeros before the start)."""
    pos = tl.load(position + offs_t, mask=mask_t, other=0)
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for s in tl.static_range(W):  # tap W-1-s multiplies the input s rows back
        valid = mask_t & (pos >= s)
        # The row index is clamped arithmetically and loaded under the bounds mask alone: Triton 3.6 fails to
        # lower (layout conversion pass, sm90) a 1-D load whose mask derives from the loaded positions.
        r = tl.load(rows + tl.maximum(offs_t - s, 0), mask=mask_t, other=0).to(tl.int64)
        x = tl.load(src + r[:, None] * src_stride + col[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(weight + col * W + (W - 1 - s), mask=mask_d, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(src, src_stride, rows, position, weight, out, L, out_stride, eps,
                D: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    pid_t, offs_t, offs_d, mask_t, mask_d, mask, col = _row_block(L, D, BT, BD)
    pre = _pre_activation(src, src_stride, rows, position, weight, offs_t, mask_t, col, mask_d, W, BT, BD)
    a = pre * tl.sigmoid(pre)
    if NORM:
        a = a * tl.rsqrt(tl.sum(a * a, axis=1) + eps)[:, None]
    tl.store(out + offs_t[:, None] * out_stride + col[None, :], a.to(out.dtype.element_ty),
             mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _bwd_pre_kernel(src, src_stride, rows, position, weight, dout, dout_stride, dpre, dweight, L, eps,
                    C: tl.constexpr, D: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr):
    """Gradient of the pre-activation (L, C) and the filter gradient of this block of rows (W, C) fp32."""
    pid_t, offs_t, offs_d, mask_t, mask_d, mask, col = _row_block(L, D, BT, BD)
    pre = _pre_activation(src, src_stride, rows, position, weight, offs_t, mask_t, col, mask_d, W, BT, BD)
    sig = tl.sigmoid(pre)
    a = pre * sig
    g = tl.load(dout + offs_t[:, None] * dout_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # y = a r with r = (|a|^2 + eps)^-1/2:  da = r (dy - y <dy, y>)
        r = tl.rsqrt(tl.sum(a * a, axis=1) + eps)
        y = a * r[:, None]
        g = r[:, None] * (g - y * tl.sum(g * y, axis=1)[:, None])
    dp = g * sig * (1.0 + pre * (1.0 - sig))
    dp = tl.where(mask, dp, 0.0)
    tl.store(dpre + offs_t[:, None] * C + col[None, :], dp.to(dpre.dtype.element_ty), mask=mask)
    pos = tl.load(position + offs_t, mask=mask_t, other=0)
    for s in tl.static_range(W):
        valid = mask_t & (pos >= s)
        r_s = tl.load(rows + tl.maximum(offs_t - s, 0), mask=mask_t, other=0).to(tl.int64)  # as in _pre_activation
        x = tl.load(src + r_s[:, None] * src_stride + col[None, :], mask=valid[:, None] & mask_d[None, :],
                    other=0.0)
        part = tl.sum(dp * x.to(tl.float32), axis=0)  # (BD,)
        tl.store(dweight + (pid_t * W + (W - 1 - s)) * C + col, part, mask=mask_d)


@triton.jit
def _bwd_dx_kernel(dpre, position, weight, dst, dst_rows, dst_stride, L,
                   C: tl.constexpr, D: tl.constexpr, W: tl.constexpr, SCATTER: tl.constexpr,
                   BT: tl.constexpr, BD: tl.constexpr):
    """Transposed convolution: dx[t] = sum_s dpre[t+s] w[W-1-s] over rows t+s of t's segment."""
    pid_t, offs_t, offs_d, mask_t, mask_d, mask, col = _row_block(L, D, BT, BD)
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for s in tl.static_range(W):
        ahead = offs_t + s
        # Row t+s belongs to t's segment exactly when its position is at least s.
        valid = (ahead < L) & (tl.load(position + ahead, mask=ahead < L, other=0) >= s)
        d = tl.load(dpre + ahead[:, None] * C + col[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(weight + col * W + (W - 1 - s), mask=mask_d, other=0.0)
        acc += d.to(tl.float32) * w.to(tl.float32)[None, :]
    if SCATTER:
        out_rows = tl.load(dst_rows + offs_t, mask=mask_t, other=0).to(tl.int64)
    else:
        out_rows = offs_t
    tl.store(dst + out_rows[:, None] * dst_stride + col[None, :], acc.to(dst.dtype.element_ty),
             mask=mask_t[:, None] & mask_d[None, :])


def _launch_config(D: int) -> tuple[int, int]:
    bd = triton.next_power_of_2(D)
    return bd, 4 if bd <= 128 else 8


def conv_fwd(src: torch.Tensor, rows: torch.Tensor, position: torch.Tensor, weight: torch.Tensor, heads: int,
             dim: int, norm: bool, eps: float = 1e-6) -> torch.Tensor:
    """(L, heads, dim) SiLU(conv) [L2-normalised per head] of ``src[rows]`` (src (R, heads*dim), any row stride,
    unit column stride; weight (heads*dim, W) contiguous)."""
    length = rows.numel()
    out = torch.empty(length, heads, dim, device=src.device, dtype=src.dtype)
    if length == 0:
        return out
    bd, warps = _launch_config(dim)
    _fwd_kernel[(triton.cdiv(length, BT), heads)](
        src, src.stride(0), rows, position, weight, out, length, heads * dim, eps,
        D=dim, W=weight.shape[1], NORM=norm, BT=BT, BD=bd, num_warps=warps)
    return out


def conv_bwd(src: torch.Tensor, rows: torch.Tensor, position: torch.Tensor, weight: torch.Tensor,
             dout: torch.Tensor, heads: int, dim: int, norm: bool, dst: torch.Tensor,
             dst_rows: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """Backward of :func:`conv_fwd`: writes d src[rows] into ``dst`` (row ``dst_rows[i]``, or row i when None;
    unit column stride) and returns the filter gradient (heads*dim, W) fp32."""
    length = rows.numel()
    channels, width = heads * dim, weight.shape[1]
    blocks = triton.cdiv(length, BT)
    if length == 0:
        return torch.zeros(channels, width, device=src.device, dtype=torch.float32)
    dout = dout.reshape(length, channels)
    bd, warps = _launch_config(dim)
    dpre = torch.empty(length, channels, device=src.device, dtype=dout.dtype)
    dweight = torch.empty(blocks, width, channels, device=src.device, dtype=torch.float32)
    _bwd_pre_kernel[(blocks, heads)](
        src, src.stride(0), rows, position, weight, dout, dout.stride(0), dpre, dweight, length, eps,
        C=channels, D=dim, W=width, NORM=norm, BT=BT, BD=bd, num_warps=warps)
    _bwd_dx_kernel[(blocks, heads)](
        dpre, position, weight, dst, dst_rows if dst_rows is not None else rows, dst.stride(0), length,
        C=channels, D=dim, W=width, SCATTER=dst_rows is not None, BT=BT, BD=bd, num_warps=warps)
    return dweight.sum(0).t()  # (C, W)


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
    pid_t, offs_t, offs_d, mask_t, mask_d, mask, col = _row_block(N, D, BT, BD)
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
    pid_t, offs_t, offs_d, mask_t, mask_d, mask, col = _row_block(N, D, BT, BD)
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
            norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(N, H, D) gated RMSNorm of sum_j weight[:, j] o[rank[t*J + j]]; o (L, H, D) contiguous, weight (N, J),
    gate (N, H, D) contiguous or None, norm_weight (D,)."""
    num_tokens, slots = weight.shape
    heads, dim = o.shape[1], o.shape[2]
    out = torch.empty(num_tokens, heads, dim, device=o.device, dtype=o.dtype)
    if num_tokens == 0:
        return out
    bd, warps = _launch_config(dim)
    _mix_fwd_kernel[(triton.cdiv(num_tokens, BT), heads)](
        o, rank, weight, gate if gate is not None else o, norm_weight, out, num_tokens, eps, J=slots,
        HV=heads * dim, D=dim, HAS_GATE=gate is not None, BT=BT, BD=bd, num_warps=warps)
    return out


def mix_bwd(o, rank, weight, gate, norm_weight, dout, eps):
    """Gradients of :func:`mix_fwd`: (do (L, H, D), dweight (N, J) fp32, dgate or None, dnorm_weight (D,) fp32)."""
    num_tokens, slots = weight.shape
    heads, dim = o.shape[1], o.shape[2]
    blocks = triton.cdiv(num_tokens, BT)
    do = torch.empty_like(o)
    dweight = torch.empty(num_tokens, slots, heads, device=o.device, dtype=torch.float32)
    dgate = torch.empty_like(gate) if gate is not None else None
    dnorm = torch.empty(blocks, heads, dim, device=o.device, dtype=torch.float32)
    if num_tokens == 0:
        return do, dweight.sum(-1), dgate, dnorm.sum((0, 1))
    bd, warps = _launch_config(dim)
    _mix_bwd_kernel[(blocks, heads)](
        o, rank, weight, gate if gate is not None else o, norm_weight, dout.contiguous(), do, dweight,
        dgate if dgate is not None else do, dnorm, num_tokens, eps, J=slots, H=heads, HV=heads * dim, D=dim,
        HAS_GATE=gate is not None, BT=BT, BD=bd, num_warps=warps)
    return do, dweight.sum(-1), dgate, dnorm.sum((0, 1))
