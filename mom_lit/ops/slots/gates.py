"""Gated DeltaNet's per-head beta and log-decay of every slot from its gate columns, one Triton kernel each way
(the parameters' gradients as per-block partial sums, added once). The reference is the plain-torch
``sigmoid(b)`` and ``-exp(A_log) softplus(a + dt_bias)`` of the layer's reference slot stage. The kernels also run on
CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["scalar_gates"]


@triton.jit
def _softplus(z):
    """log(1 + exp(z)) in fp32 without overflow, and with log1p's accuracy where exp(z) is small."""
    u = tl.exp(-tl.abs(z))
    w = 1.0 + u
    # log(w) u / (w - 1) cancels the rounding of w (Goldberg's log1p); w == 1 leaves log1p(u) = u
    log1p = tl.where(w == 1.0, u, tl.log(w) * u / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.maximum(z, 0.0) + log1p


@triton.jit
def _gates_fwd_kernel(rest, rest_stride, a_log, dt_bias, g, beta, L, H: tl.constexpr, HAS_BETA: tl.constexpr,
                      HAS_DECAY: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    offs_t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    offs_h = tl.arange(0, BH)
    mask_h = offs_h < H
    mask = (offs_t < L)[:, None] & mask_h[None, :]
    src = rest + offs_t[:, None] * rest_stride + offs_h[None, :]
    out = offs_t[:, None] * H + offs_h[None, :]
    if HAS_BETA:
        b = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        tl.store(beta + out, tl.sigmoid(b), mask=mask)
        src += H
    if HAS_DECAY:
        z = tl.load(src, mask=mask, other=0.0).to(tl.float32) + \
            tl.load(dt_bias + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        rate = tl.exp(tl.load(a_log + offs_h, mask=mask_h, other=0.0).to(tl.float32))
        tl.store(g + out, -rate[None, :] * _softplus(z), mask=mask)


@triton.jit
def _gates_bwd_kernel(rest, rest_stride, a_log, dt_bias, beta, g, dbeta, dg, drest, dparams, L, H: tl.constexpr,
                      HAS_BETA: tl.constexpr, HAS_DECAY: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """d rest (L, extra) in rest's dtype and this block's partial sums of dA_log and d dt_bias (2, H) fp32."""
    pid = tl.program_id(0).to(tl.int64)
    offs_t = pid * BT + tl.arange(0, BT)
    offs_h = tl.arange(0, BH)
    mask_h = offs_h < H
    mask = (offs_t < L)[:, None] & mask_h[None, :]
    out = offs_t[:, None] * H + offs_h[None, :]
    dst = drest + offs_t[:, None] * (HAS_BETA * H + HAS_DECAY * H) + offs_h[None, :]
    if HAS_BETA:
        s = tl.load(beta + out, mask=mask, other=0.0)
        d = tl.load(dbeta + out, mask=mask, other=0.0)
        tl.store(dst, (d * s * (1.0 - s)).to(drest.dtype.element_ty), mask=mask)
        dst += H
    if HAS_DECAY:
        col = rest + offs_t[:, None] * rest_stride + offs_h[None, :] + HAS_BETA * H
        z = tl.load(col, mask=mask, other=0.0).to(tl.float32) + \
            tl.load(dt_bias + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        rate = tl.exp(tl.load(a_log + offs_h, mask=mask_h, other=0.0).to(tl.float32))
        d = tl.load(dg + out, mask=mask, other=0.0)
        # g = -exp(A_log) softplus(z):  dg/dz = -exp(A_log) sigmoid(z),  dg/dA_log = g
        dz = -rate[None, :] * tl.sigmoid(z) * d
        tl.store(dst, dz.to(drest.dtype.element_ty), mask=mask)
        gv = tl.load(g + out, mask=mask, other=0.0)
        tl.store(dparams + pid * 2 * H + offs_h, tl.sum(d * gv, axis=0), mask=mask_h)
        tl.store(dparams + pid * 2 * H + H + offs_h, tl.sum(dz, axis=0), mask=mask_h)


_GATE_ROWS = 256


class _ScalarGates(torch.autograd.Function):
    """Gated DeltaNet's per-head gates of every slot in one pass: ``beta = sigmoid(b)`` and the log-decay
    ``g = -exp(A_log) softplus(a + dt_bias)`` from the gate columns ``rest = [b | a]`` (either may be absent)."""

    @staticmethod
    def forward(ctx, rest, a_log, dt_bias, heads, has_beta, has_decay):
        length = rest.shape[0]
        g = torch.empty(length, heads, device=rest.device, dtype=torch.float32) if has_decay else None
        beta = torch.empty(length, heads, device=rest.device, dtype=torch.float32) if has_beta else None
        grid = (triton.cdiv(length, _GATE_ROWS),)
        if length:
            _gates_fwd_kernel[grid](rest, rest.stride(0), a_log if has_decay else rest, dt_bias if has_decay else rest,
                                    g if has_decay else beta, beta if has_beta else g, length, H=heads,
                                    HAS_BETA=has_beta, HAS_DECAY=has_decay, BT=_GATE_ROWS,
                                    BH=triton.next_power_of_2(heads), num_warps=4)
        ctx.save_for_backward(rest, a_log, dt_bias, beta, g)
        ctx.meta = (heads, has_beta, has_decay)
        return g, beta

    @staticmethod
    def backward(ctx, dg, dbeta):
        rest, a_log, dt_bias, beta, g = ctx.saved_tensors
        heads, has_beta, has_decay = ctx.meta
        length = rest.shape[0]
        blocks = triton.cdiv(length, _GATE_ROWS)
        drest = torch.empty(length, (has_beta + has_decay) * heads, device=rest.device, dtype=rest.dtype)
        # every block writes its partial sums (all of them: nothing to zero unless there is no block)
        dparams = rest.new_empty(blocks, 2, heads, dtype=torch.float32) if length else \
            rest.new_zeros(1, 2, heads, dtype=torch.float32)
        # an output without a gradient (unused downstream) contributes none
        if has_decay and dg is None:
            dg = torch.zeros_like(g)
        if has_beta and dbeta is None:
            dbeta = torch.zeros_like(beta)
        if length:
            some = g if has_decay else beta  # a placeholder pointer for the absent gate's tensors (never read)
            _gates_bwd_kernel[(blocks,)](
                rest, rest.stride(0), a_log if has_decay else rest, dt_bias if has_decay else rest,
                beta if has_beta else some, g if has_decay else some, dbeta.contiguous() if has_beta else some,
                dg.contiguous() if has_decay else some, drest, dparams, length, H=heads, HAS_BETA=has_beta,
                HAS_DECAY=has_decay, BT=_GATE_ROWS, BH=triton.next_power_of_2(heads), num_warps=4)
        if not has_decay:
            return drest, None, None, None, None, None
        dparams = dparams.sum(0)  # (2, H)
        return drest, dparams[0].to(a_log.dtype), dparams[1].to(dt_bias.dtype), None, None, None


def scalar_gates(rest: torch.Tensor, a_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
                 heads: int, has_beta: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(g, beta), each (L, heads) fp32 or None, of the gate columns ``rest`` (L, extra): b's ``heads`` columns
    first when ``has_beta``, then a's when ``a_log`` is given; any row stride, unit column stride. One kernel forward,
    one backward (plus the sum of the parameters' per-block partial gradients), instead of a dozen elementwise
    passes each way."""
    has_decay = a_log is not None
    if not (has_beta or has_decay):
        return None, None
    if rest.dim() != 2 or rest.stride(1) != 1 or rest.shape[1] != (has_beta + has_decay) * heads:
        raise ValueError(f"scalar_gates: rest must be (L, {(has_beta + has_decay) * heads}) with unit column stride, "
                         f"got shape {tuple(rest.shape)} and strides {rest.stride()}")
    return _ScalarGates.apply(rest, a_log, dt_bias, heads, has_beta, has_decay)
