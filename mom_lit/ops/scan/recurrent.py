"""Token-by-token reference of the unified memory recurrence (the oracle every other form is tested against).

One op covers every update rule of a memory, selected by which optional inputs are given:

=============  =========  ===========  ==========
rule           ``g``      ``gk``       ``beta``
=============  =========  ===========  ==========
gated_delta    (B,T,H)    -            (B,T,H)
delta          -          -            (B,T,H)
simple_gla     (B,T,H)    -            -
gla            -          (B,T,H,K)    -
linear         -          -            -
=============  =========  ===========  ==========

Per segment, with an fp32 state ``S`` of shape (K, V)::

    S' = exp(g_t) S_{t-1}              (or diag(exp(gk_t)) S_{t-1}, or S_{t-1} without a gate)
    delta:    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T
    additive: S_t = S' + k_t v_t^T
    o_t = S_t^T (scale q_t)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ScanShapes", "check_scan_inputs", "compute_dtype", "recurrent_scan"]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 for every input precision up to fp32; fp64 when any input is fp64 (gradcheck, high-precision oracles)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


@dataclass(frozen=True)
class ScanShapes:
    """Sizes of a scan call, derived once from validated inputs."""

    batch: int
    seq_len: int
    num_heads: int
    key_dim: int
    value_dim: int
    num_states: int  # B, or the number of segments with cu_seqlens


def check_scan_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    gk: torch.Tensor | None,
    beta: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float | None,
) -> ScanShapes:
    """Validate shapes, dtypes and devices of a scan call; raise ``ValueError`` naming the bad argument.

    Only shape/dtype metadata is inspected for device tensors; the values of ``cu_seqlens`` (first 0, last T,
    non-decreasing) are checked only when it lives on the CPU, so that GPU calls never synchronise here.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, K), got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, T, H, V) = ({B}, {T}, {H}, V), got shape {tuple(v.shape)}")
    V = v.shape[3]
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    if g is not None and gk is not None:
        raise ValueError("pass at most one of g (scalar log-decay per head) and gk (per-key-dimension log-decay)")
    for name, tensor, shape in (("g", g, (B, T, H)), ("gk", gk, (B, T, H, K)), ("beta", beta, (B, T, H))):
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")

    num_states = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D tensor of N+1 >= 2 offsets, got shape "
                             f"{tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (segments are packed along T), got B={B}")
        if cu_seqlens.device.type == "cpu":
            offsets = cu_seqlens.tolist()
            if offsets[0] != 0 or offsets[-1] != T:
                raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {offsets[0]} .. {offsets[-1]}")
            if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
                raise ValueError("cu_seqlens must be non-decreasing")
        num_states = cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (num_states, H, K, V)
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must have shape (N, H, K, V) = {expected}, got "
                             f"{tuple(initial_state.shape)}")
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be floating-point, got dtype {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return ScanShapes(B, T, H, K, V, num_states)


def recurrent_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the recurrence one token at a time, in fp32 (fp64 for fp64 inputs).

    Args:
        q, k: (B, T, H, K) queries and keys (not normalised here).
        v: (B, T, H, V) values.
        g: (B, T, H) scalar log-decay per head (<= 0), or None.
        gk: (B, T, H, K) per-key-dimension log-decay (<= 0), or None. Exclusive with ``g``.
        beta: (B, T, H) delta-rule write strength; None selects the additive update.
        scale: query scale, ``K ** -0.5`` by default.
        initial_state: (N, H, K, V) start states, zeros when None.
        cu_seqlens: (N+1,) int offsets of N packed segments along T (B must be 1); segments may be empty.
        output_final_state: return the (N, H, K, V) fp32 final states, else None.

    Returns:
        o: (B, T, H, V) in ``v.dtype``; final_state: (N, H, K, V) float32 (float64 if any input is float64) or
        None.
    """
    shapes = check_scan_inputs(q, k, v, g, gk, beta, initial_state, cu_seqlens, scale)
    B, T, H, K, V, N = (shapes.batch, shapes.seq_len, shapes.num_heads, shapes.key_dim, shapes.value_dim,
                        shapes.num_states)
    scale = K ** -0.5 if scale is None else float(scale)

    if cu_seqlens is None:
        # (batch row, start, end) of every independent sequence
        segments = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        segments = [(0, offsets[n], offsets[n + 1]) for n in range(N)]

    dtype = compute_dtype(q, k, v, g, gk, beta, initial_state)
    outputs = []
    finals = []
    for n, (row, start, end) in enumerate(segments):
        if initial_state is None:
            state = q.new_zeros(H, K, V, dtype=dtype)
        else:
            state = initial_state[n].to(dtype)
        for t in range(start, end):
            q_t = q[row, t].to(dtype) * scale  # (H, K)
            k_t = k[row, t].to(dtype)  # (H, K)
            v_t = v[row, t].to(dtype)  # (H, V)
            if g is not None:
                state = state * g[row, t].to(dtype).exp()[:, None, None]
            elif gk is not None:
                state = state * gk[row, t].to(dtype).exp()[:, :, None]
            if beta is not None:
                predicted = torch.einsum("hkv,hk->hv", state, k_t)
                update = beta[row, t].to(dtype)[:, None] * (v_t - predicted)  # (H, V)
            else:
                update = v_t
            state = state + k_t[:, :, None] * update[:, None, :]
            outputs.append((row, t, torch.einsum("hkv,hk->hv", state, q_t)))
        finals.append(state)

    o = torch.zeros(B, T, H, V, dtype=dtype, device=v.device)
    if outputs:
        rows = torch.tensor([r for r, _, _ in outputs], device=v.device)
        times = torch.tensor([t for _, t, _ in outputs], device=v.device)
        # index_put keeps autograd intact without in-place writes into a leaf
        o = o.index_put((rows, times), torch.stack([out for _, _, out in outputs]))
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final_state
