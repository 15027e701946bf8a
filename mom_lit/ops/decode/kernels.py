"""``triton_decode_step``: one token per sequence through the MoM memories, as ONE Triton kernel.

One program per (sequence b, slot j, head h). Slot j of sequence b reads memory ``m = memory[b, j]``; the program

1. gathers that stream's pre-convolution q|k|v channels of head h from the per-stream projections,
2. runs the short causal convolution (+ SiLU) against the stream's conv state and shifts that state by one
   token in place (same rounding as the torch step: old entries pass through the input dtype),
3. L2-normalises q and k, computes the gates (``g = -exp(A_log) softplus(a + dt_bias)``, ``beta = sigmoid(b)``),
4. walks the (K, V) state of (b, m, h) in V blocks: decay, delta-rule correction, rank-1 update, stored back in
   place, and the output ``o = S^T q * scale`` of the slot.

A token selects distinct memories, so no two programs touch the same state or conv channels: every read of a
channel happens in the program that writes it (a barrier orders the reads of a program's threads before its
overwrites). Memories that no slot selected are never read or written. The cost is O(J H K V) per sequence,
independent of the context length, and nothing syncs with the host. The (K, V) state of one head is not split
across programs (the conv state of the q/k channels is shared by all V blocks and is rewritten in place), so a
batch of one runs J x H programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decode_step_kernel", "triton_decode_step"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_TILE = 8192  # elements of one (BK, BV) fp32 state tile held in registers


@triton.jit
def _conv_silu(base, conv_w, ch, mask, x, C: tl.constexpr, W: tl.constexpr, BW: tl.constexpr):
    """SiLU of the short convolution at the current token for channels ``ch``; shifts their conv state.

    ``base`` points at row 0 of a (W-1, C) conv state (oldest row first); ``x`` holds the new pre-convolution
    inputs (input dtype). The state keeps what the torch step keeps: old rows cast through the input dtype.
    """
    rw = tl.arange(0, BW)  # conv-state rows, BW >= W - 1
    tile = (rw[:, None] < W - 1) & mask[None, :]
    old = tl.load(base + rw[:, None] * C + ch[None, :], mask=tile, other=0.0).to(x.dtype)  # (BW, BK)
    taps = tl.load(conv_w + ch[None, :] * W + rw[:, None], mask=tile, other=0.0).to(tl.float32)
    acc = tl.sum(old.to(tl.float32) * taps, 0)
    acc += x.to(tl.float32) * tl.load(conv_w + ch * W + (W - 1), mask=mask, other=0.0).to(tl.float32)
    if W > 1:  # a one-tap convolution keeps no state
        # A channel can live in several threads (replicated layouts): all of them must have read the old rows
        # before any thread overwrites one.
        tl.debug_barrier()
        tl.store(base + (rw[:, None] - 1) * C + ch[None, :], old, mask=tile & (rw[:, None] >= 1))
        tl.store(base + (W - 2) * C + ch, x, mask=mask)
    return acc * tl.sigmoid(acc)


@triton.jit
def _l2_normalize(x, ROUND_TO):
    """x / ||x|| (eps 1e-6 as in ``mom_lit.norm.l2_normalize``), rounded through the input dtype."""
    y = x * (1.0 / tl.sqrt(tl.sum(x * x, 0) + 1e-6))
    return y.to(ROUND_TO).to(tl.float32)


@triton.jit
def _softplus(x):
    """log(1 + e^x) as torch computes it (x beyond 20 passes through), with an accurate log1p."""
    u = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + u
    # log1p(u) = log(w) * u / (w - 1): exact to a few ulps also where w rounds to 1 (Goldberg's trick).
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def decode_step_kernel(
    q_in, k_in, v_in, a_in, b_in, a_log, dt_bias, memory,
    conv, conv_sn, conv_ss, conv_w,
    state, state_sn, state_ss,
    out, scale,
    S: tl.constexpr, J: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    USE_GATE: tl.constexpr, USE_BETA: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr,
):
    pid = tl.program_id(0)  # over (B, J, H), h fastest
    h = pid % H
    bj = pid // H  # b * J + j
    b = (bj // J).to(tl.int64)
    m = tl.load(memory + bj).to(tl.int64)
    KD: tl.constexpr = H * K
    VD: tl.constexpr = H * V
    C: tl.constexpr = 2 * KD + VD
    in_dtype = q_in.dtype.element_ty
    stream = b * S + m  # row of (B, S, ...) per-stream inputs

    rk = tl.arange(0, BK)
    mk = rk < K
    xq = tl.load(q_in + b * KD + h * K + rk, mask=mk, other=0.0)
    xk = tl.load(k_in + stream * KD + h * K + rk, mask=mk, other=0.0)
    conv_base = conv + b * conv_sn + m * conv_ss
    if W > 0:
        q = _conv_silu(conv_base, conv_w, h * K + rk, mk, xq, C, W, BW)
        k = _conv_silu(conv_base, conv_w, KD + h * K + rk, mk, xk, C, W, BW)
    else:
        q = xq.to(tl.float32)
        q = q * tl.sigmoid(q)
        k = xk.to(tl.float32)
        k = k * tl.sigmoid(k)
    q = _l2_normalize(q, in_dtype) * scale
    k = _l2_normalize(k, in_dtype)
    q = tl.where(mk, q, 0.0)
    k = tl.where(mk, k, 0.0)

    if USE_GATE:
        a = tl.load(a_in + stream * H + h).to(tl.float32) + tl.load(dt_bias + h).to(tl.float32)
        decay = tl.exp(-tl.exp(tl.load(a_log + h).to(tl.float32)) * _softplus(a))
    if USE_BETA:
        beta = tl.sigmoid(tl.load(b_in + stream * H + h).to(tl.float32))

    s_base = state + b * state_sn + m * state_ss + h * (K * V)
    o_base = out + (bj * H + h).to(tl.int64) * V
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        mv = rv < V
        xv = tl.load(v_in + stream * VD + h * V + rv, mask=mv, other=0.0)
        if W > 0:
            v = _conv_silu(conv_base, conv_w, 2 * KD + h * V + rv, mv, xv, C, W, BW)
        else:
            v = xv.to(tl.float32)
            v = v * tl.sigmoid(v)
        v = v.to(in_dtype).to(tl.float32)  # the scan sees v in the input dtype too
        ptrs = s_base + rk[:, None] * V + rv[None, :]
        tile_mask = mk[:, None] & mv[None, :]
        s = tl.load(ptrs, mask=tile_mask, other=0.0)  # (BK, BV) fp32
        if USE_GATE:
            s = s * decay
        if USE_BETA:
            v = beta * (v - tl.sum(s * k[:, None], 0))
        s = s + k[:, None] * v[None, :]
        tl.debug_barrier()  # as in _conv_silu: every copy of the tile is read before it is overwritten
        tl.store(ptrs, s, mask=tile_mask)
        o = tl.sum(s * q[:, None], 0)
        tl.store(o_base + rv, o.to(out.dtype.element_ty), mask=mv)


def _inner_contiguous(t: torch.Tensor, dims: int) -> bool:
    """Whether the last ``dims`` dims of ``t`` are laid out contiguously (leading dims may have any stride)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[-dims:]), reversed(t.stride()[-dims:])):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def triton_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory: torch.Tensor,
    state: torch.Tensor,
    conv_state: torch.Tensor | None,
    conv_weight: torch.Tensor | None,
    *,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    a_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float,
) -> torch.Tensor:
    """One decoding step; ``state`` and ``conv_state`` are updated in place. Arguments as
    :func:`mom_lit.ops.decode.decode_step` (no per-key gate). Returns o (B, J, H, V) in q's dtype."""
    batch, slots = memory.shape
    _, streams, heads, key_dim, value_dim = state.shape
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float32, bfloat16 or float16, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if state.dtype != torch.float32 or not _inner_contiguous(state, 3):
        raise ValueError("the memory state must be fp32 with contiguous (H, K, V) dims to be updated in place")
    if (a is None) != (a_log is None) or (a is None) != (dt_bias is None):
        raise ValueError("the scalar gate needs a, a_log and dt_bias together")
    width = 0
    if conv_state is not None:
        width = conv_state.shape[2] + 1
        if conv_weight is None or conv_weight.shape != (conv_state.shape[3], width):
            raise ValueError(f"conv_weight must have shape (C, W) = {(conv_state.shape[3], width)}")
        if not _inner_contiguous(conv_state, 2):
            raise ValueError("the conv state must have contiguous (W-1, C) dims to be updated in place")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    a = a.contiguous() if a is not None else None
    b = b.contiguous() if b is not None else None
    memory = memory.contiguous()
    out = torch.empty(batch, slots, heads, value_dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_k = triton.next_power_of_2(key_dim)
    block_v = max(16, min(triton.next_power_of_2(value_dim), _STATE_TILE // block_k))
    if conv_state is None:
        conv_arg, conv_strides, weight_arg = state, (0, 0), state  # never read: W = 0
    else:
        # An empty (one-tap) conv state may have no storage to point at; it is never accessed then.
        conv_arg = conv_state if conv_state.numel() else state
        conv_strides, weight_arg = conv_state.stride()[:2], conv_weight.contiguous()
    decode_step_kernel[(batch * slots * heads,)](
        q, k, v, a if a is not None else q, b if b is not None else q,
        a_log if a_log is not None else q, dt_bias if dt_bias is not None else q, memory,
        conv_arg, conv_strides[0], conv_strides[1], weight_arg,
        state, state.stride(0), state.stride(1),
        out, scale,
        S=streams, J=slots, H=heads, K=key_dim, V=value_dim, W=width,
        USE_GATE=a is not None, USE_BETA=b is not None, BK=block_k, BV=block_v,
        BW=triton.next_power_of_2(max(width - 1, 2)),
        num_warps=4 if block_k * block_v <= 4096 else 8,
    )
    return out
