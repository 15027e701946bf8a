"""Triton kernels of the slot stage: gather, short convolution, SiLU and L2 norm in one pass, and the slot sum.

Every sorted slot row ``i`` reads its pre-convolution inputs straight from the projections (``src[rows[i]]``: no
gathered copy; with ``rows=None`` the projections are in slot order already and row ``i`` is addressed directly,
without an index load), convolves along its segment (``position`` restarts at each segment start; the slot stage
of a training forward has no cached conv state), applies SiLU and, for q and k, the per-head L2 norm. The backward
recomputes the forward from the projections (nothing but the indices is kept) in two kernels: one writes the
pre-activation gradient (an elementwise pass over (block of rows, head) programs, which the L2 norm needs whole),
the next walks a span of rows per (span, block of channels) program, running the transposed convolution (the source
gradient rows) and accumulating the filter gradient in registers, reduced once per program.

A channel group is one head of q, k or v (D channels).

Slot sum: a token's gradient from its J slots, ``out[t] = sum_j src[rank[t * J + j]]`` (the slot stage's query
gradient, the grouped projection's input gradient), read in place through ``rank`` and summed in fp32 in one pass
instead of a gathered (N J, C) copy and a reduction over it.

Row offsets are int64: slots x channels overflows int32 at MoM sizes. The kernels also run on CPU under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mom_lit.ops.stage_launch import DEFAULT_LAUNCH, StageLaunchConfig, launch_config, row_block

__all__ = ["conv_bwd", "conv_fwd", "slot_sum"]


@triton.jit
def _mapped_rows(rows, offs, mask, MAPPED: tl.constexpr):
    """int64 rows (of a source, or of a gradient's destination) of the slot rows ``offs`` (>= 0): ``rows[offs]``,
    or ``offs`` itself when not MAPPED."""
    if MAPPED:
        return tl.load(rows + offs, mask=mask, other=0).to(tl.int64)
    return offs.to(tl.int64)


@triton.jit
def _tap_source(src, src_stride, rows, pos, offs_t, mask_t, col, mask_d, s: tl.constexpr, GATHER: tl.constexpr):
    """(BT, BD) source rows s back of the rows ``offs_t`` (positions ``pos``) inside their segments, zeros before a
    segment's start (in the source's dtype: callers convert, where their loads are scheduled as before)."""
    # The row index is clamped arithmetically and loaded under the bounds mask alone: Triton 3.6 fails to lower
    # (layout conversion pass, sm90) a 1-D load whose mask derives from the loaded positions.
    valid = mask_t & (pos >= s)
    r = _mapped_rows(rows, tl.maximum(offs_t - s, 0), mask_t, GATHER)
    return tl.load(src + r[:, None] * src_stride + col[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _pre_activation(src, src_stride, rows, position, weight, offs_t, mask_t, col, mask_d,
                    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, GATHER: tl.constexpr):
    """(BT, BD) fp32 causal convolution of the rows ``offs_t`` inside their segments (zeros before the start)."""
    pos = tl.load(position + offs_t, mask=mask_t, other=0)
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for s in tl.static_range(W):  # tap W-1-s multiplies the input s rows back
        x = _tap_source(src, src_stride, rows, pos, offs_t, mask_t, col, mask_d, s, GATHER)
        w = tl.load(weight + col * W + (W - 1 - s), mask=mask_d, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(src, src_stride, rows, position, weight, out, L, out_stride, eps,
                D: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                GATHER: tl.constexpr):
    pid_t, offs_t, offs_d, mask_t, mask_d, mask, col = row_block(L, D, BT, BD)
    pre = _pre_activation(src, src_stride, rows, position, weight, offs_t, mask_t, col, mask_d, W, BT, BD, GATHER)
    a = pre * tl.sigmoid(pre)
    if NORM:
        a = a * tl.rsqrt(tl.sum(a * a, axis=1) + eps)[:, None]
    tl.store(out + offs_t[:, None] * out_stride + col[None, :], a.to(out.dtype.element_ty),
             mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _bwd_pre_kernel(src, src_stride, rows, position, weight, dout, dout_stride, dpre, L, eps,
                    C: tl.constexpr, D: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, GATHER: tl.constexpr):
    """Gradient of the pre-activation (L, C), recomputed from the sources: elementwise but for the L2 norm."""
    pid_t, offs_t, offs_d, mask_t, mask_d, mask, col = row_block(L, D, BT, BD)
    pre = _pre_activation(src, src_stride, rows, position, weight, offs_t, mask_t, col, mask_d, W, BT, BD, GATHER)
    sig = tl.sigmoid(pre)
    g = tl.load(dout + offs_t[:, None] * dout_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # y = a r with r = (|a|^2 + eps)^-1/2:  da = r (dy - y <dy, y>)
        a = pre * sig
        r = tl.rsqrt(tl.sum(a * a, axis=1) + eps)
        y = a * r[:, None]
        g = r[:, None] * (g - y * tl.sum(g * y, axis=1)[:, None])
    dp = g * sig * (1.0 + pre * (1.0 - sig))
    tl.store(dpre + offs_t[:, None] * C + col[None, :], dp.to(dpre.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dx_dw_kernel(src, src_stride, rows, position, weight, dpre, dst, dst_rows, dst_stride, dweight, L, span,
                   C: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, SCATTER: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, GATHER: tl.constexpr):
    """Over rows [pid * span, + span) and BC channels: the transposed convolution
    dx[t] = sum_s dpre[t+s] w[W-1-s] (rows t+s of t's segment) and this span's filter gradient
    dw[W-1-s] = sum_t dpre[t] x[t-s] (rows t-s of t's segment), accumulated elementwise over the walk."""
    pid_r, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = pid_c * BC + tl.arange(0, BC)
    mask_c = cols < C
    taps = tl.arange(0, WP)  # tap s: s rows ahead (dx) or back (dw); taps >= W are padding
    mask_w = taps < W
    w = tl.load(weight + cols[None, :] * W + (W - 1 - taps)[:, None], mask=mask_w[:, None] & mask_c[None, :],
                other=0.0).to(tl.float32)  # (WP, BC)
    acc = tl.zeros((WP, BT, BC), dtype=tl.float32)
    start = pid_r * span
    for t0 in range(start, tl.minimum(start + span, L), BT):
        offs_t = t0 + tl.arange(0, BT)
        mask_t = offs_t < L
        # Transposed convolution: row t+s belongs to t's segment exactly when its position is at least s.
        ahead = offs_t[None, :] + taps[:, None]  # (WP, BT)
        in_range = mask_w[:, None] & (ahead < L)
        ok = in_range & (tl.load(position + ahead, mask=in_range, other=0) >= taps[:, None])
        d = tl.load(dpre + ahead[:, :, None] * C + cols[None, None, :], mask=ok[:, :, None] & mask_c[None, None, :],
                    other=0.0).to(tl.float32)  # (WP, BT, BC)
        dx = tl.sum(d * w[:, None, :], axis=0)  # (BT, BC)
        out_rows = _mapped_rows(dst_rows, offs_t, mask_t, SCATTER)
        tl.store(dst + out_rows[:, None] * dst_stride + cols[None, :], dx.to(dst.dtype.element_ty),
                 mask=mask_t[:, None] & mask_c[None, :])
        # Filter gradient: the input s rows back is inside the segment when the position is at least s; its
        # source row is clamped arithmetically and loaded under the bounds mask (see _tap_source).
        pos = tl.load(position + offs_t, mask=mask_t, other=0)
        back = mask_w[:, None] & mask_t[None, :] & (pos[None, :] >= taps[:, None])  # (WP, BT)
        src_row = _mapped_rows(rows, tl.maximum(offs_t[None, :] - taps[:, None], 0),
                               mask_w[:, None] & mask_t[None, :], GATHER)
        x = tl.load(src + src_row[:, :, None] * src_stride + cols[None, None, :],
                    mask=back[:, :, None] & mask_c[None, None, :], other=0.0).to(tl.float32)  # (WP, BT, BC)
        dp = tl.load(dpre + offs_t[:, None] * C + cols[None, :], mask=mask_t[:, None] & mask_c[None, :],
                     other=0.0).to(tl.float32)  # (BT, BC)
        acc += dp[None, :, :] * x
    tl.store(dweight + (pid_r * W + (W - 1 - taps))[:, None] * C + cols[None, :], tl.sum(acc, axis=1),
             mask=mask_w[:, None] & mask_c[None, :])


@triton.jit
def _dx_dw_tap(src, src_stride, rows, position, weight, dpre, dp, pos, offs_t, mask_t, cols, mask_c, L,
               s: tl.constexpr, C: tl.constexpr, W: tl.constexpr, GATHER: tl.constexpr):
    """Tap s (s rows ahead for dx, s rows back for dw) of one (rows, channels) block: returns the block's dx term
    dpre[t+s] w[W-1-s] and its filter-gradient term dpre[t] x[t-s], both (BT, BC) fp32, zero across a segment's
    start (row t+s is in t's segment when its position is at least s; row t-s when t's position is)."""
    w = tl.load(weight + cols * W + (W - 1 - s), mask=mask_c, other=0.0).to(tl.float32)
    ahead = offs_t + s
    in_range = ahead < L
    ok = in_range & (tl.load(position + ahead, mask=in_range, other=0) >= s)
    d = tl.load(dpre + ahead[:, None] * C + cols[None, :], mask=ok[:, None] & mask_c[None, :],
                other=0.0).to(tl.float32)
    x = _tap_source(src, src_stride, rows, pos, offs_t, mask_t, cols, mask_c, s, GATHER).to(tl.float32)
    return d * w[None, :], dp * x


@triton.jit
def _bwd_dx_dw_taps_kernel(src, src_stride, rows, position, weight, dpre, dst, dst_rows, dst_stride, dweight, L, span,
                           C: tl.constexpr, W: tl.constexpr, SCATTER: tl.constexpr, BT: tl.constexpr,
                           BC: tl.constexpr, GATHER: tl.constexpr):
    """As :func:`_bwd_dx_dw_kernel` for W <= 4, one tap at a time: every tile is (BT, BC), the tap sums are
    elementwise, and the filter gradient keeps one (BT, BC) accumulator per tap, reduced once per program (Triton
    has no arrays of tiles, so the four taps are written out)."""
    pid_r, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = pid_c * BC + tl.arange(0, BC)
    mask_c = cols < C
    acc0 = tl.zeros((BT, BC), dtype=tl.float32)
    acc1 = tl.zeros((BT, BC), dtype=tl.float32)
    acc2 = tl.zeros((BT, BC), dtype=tl.float32)
    acc3 = tl.zeros((BT, BC), dtype=tl.float32)
    start = pid_r * span
    for t0 in range(start, tl.minimum(start + span, L), BT):
        offs_t = t0 + tl.arange(0, BT)
        mask_t = offs_t < L
        pos = tl.load(position + offs_t, mask=mask_t, other=0)
        dp = tl.load(dpre + offs_t[:, None] * C + cols[None, :], mask=mask_t[:, None] & mask_c[None, :],
                     other=0.0).to(tl.float32)
        dx, dw = _dx_dw_tap(src, src_stride, rows, position, weight, dpre, dp, pos, offs_t, mask_t, cols, mask_c, L,
                            0, C, W, GATHER)
        acc0 += dw
        if W > 1:
            ddx, dw = _dx_dw_tap(src, src_stride, rows, position, weight, dpre, dp, pos, offs_t, mask_t, cols, mask_c,
                                 L, 1, C, W, GATHER)
            dx += ddx
            acc1 += dw
        if W > 2:
            ddx, dw = _dx_dw_tap(src, src_stride, rows, position, weight, dpre, dp, pos, offs_t, mask_t, cols, mask_c,
                                 L, 2, C, W, GATHER)
            dx += ddx
            acc2 += dw
        if W > 3:
            ddx, dw = _dx_dw_tap(src, src_stride, rows, position, weight, dpre, dp, pos, offs_t, mask_t, cols, mask_c,
                                 L, 3, C, W, GATHER)
            dx += ddx
            acc3 += dw
        out_rows = _mapped_rows(dst_rows, offs_t, mask_t, SCATTER)
        tl.store(dst + out_rows[:, None] * dst_stride + cols[None, :], dx.to(dst.dtype.element_ty),
                 mask=mask_t[:, None] & mask_c[None, :])
    base = dweight + pid_r * W * C + cols
    tl.store(base + (W - 1) * C, tl.sum(acc0, axis=0), mask=mask_c)
    if W > 1:
        tl.store(base + (W - 2) * C, tl.sum(acc1, axis=0), mask=mask_c)
    if W > 2:
        tl.store(base + (W - 3) * C, tl.sum(acc2, axis=0), mask=mask_c)
    if W > 3:
        tl.store(base + (W - 4) * C, tl.sum(acc3, axis=0), mask=mask_c)


def conv_fwd(src: torch.Tensor, rows: torch.Tensor | None, position: torch.Tensor, weight: torch.Tensor, heads: int,
             dim: int, norm: bool, eps: float = 1e-6, launch: StageLaunchConfig | None = None) -> torch.Tensor:
    """(L, heads, dim) SiLU(conv) [L2-normalised per head] of ``src[rows]`` (src (R, heads*dim), any row stride,
    unit column stride; rows None: src's first L rows, L = len(position); weight (heads*dim, W) contiguous)."""
    length = position.numel()
    out = torch.empty(length, heads, dim, device=src.device, dtype=src.dtype)
    if length == 0:
        return out
    bt, bd, warps = launch_config(dim, (launch or DEFAULT_LAUNCH).conv_fwd)
    _fwd_kernel[(triton.cdiv(length, bt), heads)](
        src, src.stride(0), position if rows is None else rows, position, weight, out, length, heads * dim, eps,
        D=dim, W=weight.shape[1], NORM=norm, BT=bt, BD=bd, GATHER=rows is not None, num_warps=warps)
    return out


def conv_bwd(src: torch.Tensor, rows: torch.Tensor | None, position: torch.Tensor, weight: torch.Tensor,
             dout: torch.Tensor, heads: int, dim: int, norm: bool, dst: torch.Tensor,
             dst_rows: torch.Tensor | None, eps: float = 1e-6,
             launch: StageLaunchConfig | None = None) -> torch.Tensor:
    """Backward of :func:`conv_fwd`: writes d src[rows] into ``dst`` (row ``dst_rows[i]``, or row i when None;
    unit column stride) and returns the filter gradient (heads*dim, W) fp32."""
    cfg = launch or DEFAULT_LAUNCH
    length = position.numel()
    gather = rows is not None
    rows = rows if gather else position  # a placeholder pointer that the kernels do not read
    channels, width = heads * dim, weight.shape[1]
    if length == 0:
        return torch.zeros(channels, width, device=src.device, dtype=torch.float32)
    dout = dout.reshape(length, channels)
    bt, bd, warps = launch_config(dim, cfg.conv_bwd_pre)
    dpre = torch.empty(length, channels, device=src.device, dtype=dout.dtype)
    _bwd_pre_kernel[(triton.cdiv(length, bt), heads)](
        src, src.stride(0), rows, position, weight, dout, dout.stride(0), dpre, length, eps,
        C=channels, D=dim, W=width, NORM=norm, BT=bt, BD=bd, GATHER=gather, num_warps=warps)
    spans = triton.cdiv(length, cfg.dx_span)
    dweight = torch.empty(spans, width, channels, device=src.device, dtype=torch.float32)
    args = (src, src.stride(0), rows, position, weight, dpre, dst, dst_rows if dst_rows is not None else rows,
            dst.stride(0), dweight, length, cfg.dx_span)
    warps = cfg.conv_bwd_dx.num_warps or (4 if cfg.dx_channels <= 128 else 8)
    options = dict(C=channels, W=width, SCATTER=dst_rows is not None, BT=cfg.conv_bwd_dx.rows,
                   BC=cfg.dx_channels, GATHER=gather, num_warps=warps)
    grid = (spans, triton.cdiv(channels, cfg.dx_channels))
    if cfg.dx_kernel == "taps" and width <= 4:
        _bwd_dx_dw_taps_kernel[grid](*args, **options)
    else:
        _bwd_dx_dw_kernel[grid](*args, WP=triton.next_power_of_2(width), **options)
    return dweight.sum(0).t()  # (C, W)


@triton.jit
def _slot_sum_kernel(src, rank, out, N, C: tl.constexpr, J: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pid_t, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    cols = pid_c * BC + tl.arange(0, BC)
    mask_t = offs_t < N
    mask = mask_t[:, None] & (cols[None, :] < C)
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(J):
        row = tl.load(rank + offs_t * J + j, mask=mask_t, other=0).to(tl.int64)
        acc += tl.load(src + row[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs_t[:, None] * C + cols[None, :], acc.to(out.dtype.element_ty), mask=mask)


def slot_sum(src: torch.Tensor, rank: torch.Tensor, num_tokens: int,
             launch: StageLaunchConfig | None = None) -> torch.Tensor:
    """(N, C) ``out[t] = sum_j src[rank[t * J + j]]`` of the (L, C) per-slot rows ``src`` (fp32 sum, src's dtype),
    ``rank`` (N * J,) holding the sorted position of every token-major slot; N = ``num_tokens``, J = L / N.

    The same as ``src[rank].view(N, J, C).sum(1)``, without the gathered copy."""
    length, channels = src.shape
    if rank.numel() != length or (num_tokens and length % num_tokens) or (length and not num_tokens):
        raise ValueError(f"rank ({rank.numel()} entries) must index every one of the {length} slots, J per token "
                         f"of {num_tokens}")
    out = torch.empty(num_tokens, channels, device=src.device, dtype=src.dtype)
    if num_tokens == 0 or channels == 0:
        return out.zero_()
    cfg = launch or DEFAULT_LAUNCH
    bc = min(cfg.slot_sum_channels, triton.next_power_of_2(channels))
    grid = (triton.cdiv(num_tokens, cfg.slot_sum.rows), triton.cdiv(channels, bc))
    _slot_sum_kernel[grid](src.contiguous(), rank, out, num_tokens, C=channels, J=length // num_tokens,
                           BT=cfg.slot_sum.rows, BC=bc, num_warps=cfg.slot_sum.num_warps or 4)
    return out
