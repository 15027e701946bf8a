"""One decoding step of the MoM memories: the torch reference and the dispatching ``decode_step``.

Per sequence b and slot j (routed picks, then the shared memory), memory ``m = memory[b, j]`` sees the token:
its pre-convolution q|k|v (q shared by all streams, k and v from stream m's projections) go through the short
convolution against m's conv state and a SiLU, q and k are L2-normalised, and the (H, K, V) state of m is
updated by the rule (decay ``exp(g)``, per-key decay ``exp(gk)``, delta correction with ``beta``, rank-1 write)
before it is read with ``q * scale``. Only the selected states and conv rows change, IN PLACE: a step costs
O(J H K V) whatever the context length, and a caller that wants to branch from a cache clones it first.

Backends (``backend`` as in :func:`mom_lit.ops.scan`): ``auto`` and ``triton`` run
:func:`mom_lit.ops.decode.kernels.triton_decode_step` on CUDA inputs; the per-key gate of the ``gla`` rule has no
Triton step and always takes the torch reference, as do CPU inputs and the ``compiled`` / ``eager`` backends.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from mom_lit.norm import l2_normalize

__all__ = ["decode_step", "decode_step_reference", "log_decode_choice"]

logger = logging.getLogger("mom_lit")


@functools.cache
def log_decode_choice(path: str, reason: str) -> None:
    """Log the decoding step's path and why, once per (path, reason) for the process
    (``log_decode_choice.cache_clear()`` logs the next choice again)."""
    logger.info("decode step: %s (%s)", path, reason)


def decode_step_reference(
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
    gk: torch.Tensor | None = None,
    a_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float,
) -> torch.Tensor:
    """The step in plain torch (arguments as :func:`decode_step`)."""
    batch, slots = memory.shape
    _, _, heads, key_dim, value_dim = state.shape
    rows = torch.arange(batch, device=memory.device).unsqueeze(1).expand(batch, slots)  # (B, J)
    qkv = torch.cat([q.unsqueeze(1).expand(batch, slots, -1), k[rows, memory], v[rows, memory]], dim=-1)  # (B, J, C)
    if conv_state is not None:
        window = torch.cat([conv_state[rows, memory].to(qkv.dtype), qkv.unsqueeze(2)], dim=2)  # (B, J, W, C)
        qkv = F.silu((window * conv_weight.t().to(qkv.dtype)).sum(2))
        conv_state[rows, memory] = window[:, :, 1:].to(conv_state.dtype)
    else:
        qkv = F.silu(qkv)
    qd = heads * key_dim
    qs, ks, vs = qkv.split([qd, qd, heads * value_dim], dim=-1)
    qs = l2_normalize(qs.reshape(batch, slots, heads, key_dim)).float()  # (B, J, H, K)
    ks = l2_normalize(ks.reshape(batch, slots, heads, key_dim)).float()
    vs = vs.reshape(batch, slots, heads, value_dim).float()  # (B, J, H, V)

    mem = state[rows, memory]  # (B, J, H, K, V) fp32 copy of the selected memories
    if a is not None:
        g = -a_log.float().exp() * F.softplus(a[rows, memory].float() + dt_bias.float())  # (B, J, H)
        mem = mem * g.exp()[..., None, None]
    if gk is not None:
        mem = mem * gk[rows, memory].float().view(batch, slots, heads, key_dim).exp().unsqueeze(-1)
    if b is not None:
        beta = torch.sigmoid(b[rows, memory].float()).unsqueeze(-1)  # (B, J, H, 1)
        vs = beta * (vs - torch.einsum("bjhkv,bjhk->bjhv", mem, ks))
    mem = mem + ks.unsqueeze(-1) * vs.unsqueeze(-2)
    o = torch.einsum("bjhkv,bjhk->bjhv", mem, qs * scale)
    state[rows, memory] = mem
    return o.to(q.dtype)


def decode_step(
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
    gk: torch.Tensor | None = None,
    a_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """One token of B sequences through their selected memories; ``state`` and ``conv_state`` change in place.

    Args:
        q: (B, H*K) pre-convolution query projection of each sequence's token (shared by its streams).
        k, v: (B, S, H*K), (B, S, H*V) pre-convolution key/value projections of every stream.
        memory: (B, J) int64 stream of each slot, distinct within a row.
        state: (B, S, H, K, V) fp32 memories (any strides for B and S).
        conv_state: (B, S, W-1, C) last W-1 pre-convolution q|k|v inputs of every stream (C = 2 H K + H V),
            or None without convolution (then ``conv_weight`` is None too).
        conv_weight: (C, W) depthwise causal convolution taps, the last one on the current token.
        a, b: (B, S, H) raw scalar-gate and beta logits of every stream, or None where the rule has none;
            ``g = -exp(a_log) * softplus(a + dt_bias)`` and ``beta = sigmoid(b)``.
        gk: (B, S, H*K) per-key log-decay of every stream (gla), or None.
        scale: query scale.
        backend: auto | compiled | eager | triton.
    Returns:
        (B, J, H, V) slot outputs in q's dtype.
    """
    kwargs = dict(a=a, b=b, a_log=a_log, dt_bias=dt_bias, scale=scale)
    if backend in ("auto", "triton") and gk is None and (q.is_cuda or backend == "triton"):
        from mom_lit.ops.decode.kernels import triton_decode_step

        log_decode_choice("triton", f"{backend}: CUDA inputs" if q.is_cuda else backend)
        return triton_decode_step(q, k, v, memory, state, conv_state, conv_weight, **kwargs)
    log_decode_choice("torch", "per-key gate (gla)" if gk is not None else f"{backend} on {q.device.type}")
    return decode_step_reference(q, k, v, memory, state, conv_state, conv_weight, gk=gk, **kwargs)
