"""``triton_scan``: the chunked memory recurrence as Triton kernels, with a full Triton backward.

Supports the scalar-gate and ungated rules (gated_delta, delta, simple_gla, linear), packed varlen segments
(``cu_seqlens``, empty segments allowed), fp32 / bf16 / fp16 inputs, key dims up to 256 (the sequential passes
keep a (K, V-block) state in at most four register blocks of 64 rows) and any value dim. The per-key gate ``gk``
is not implemented here and is rejected with a ``ValueError``.

Intermediate buffers (W, U, per-chunk start states, and in the backward dU, dW and a partial dK for bf16 inputs)
are kept in the input precision; gates, the triangular inverse and every state carried from chunk to chunk stay
fp32 (the products with the inverse round their operands to bf16 for bf16 inputs, as the other products do:
``LaunchConfig.wy_products``). The forward keeps W, U and the inverse for the backward. The start state of every
chunk (NC x H x K x V elements, ~0.4 GiB at 49K scan tokens, 4 heads x 256, bf16: the largest buffer by far) is
by default not kept: the backward recomputes it with one more sequential pass that reads the stored U.
``recompute`` chooses (see :func:`triton_scan`): keep the states too, or rebuild W, U and the inverse as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton

from mom_lit.ops.scan.recurrent import check_scan_inputs
from mom_lit.ops.scan.triton import backward as bwd
from mom_lit.ops.scan.triton import forward as fwd
from mom_lit.ops.scan.triton.chunk_index import ChunkIndex, build_chunk_index
from mom_lit.ops.scan.triton.common import BT, dot_mode

__all__ = ["triton_scan"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_KEY_DIM = 4 * 64  # four (64, BV) register blocks of state in the sequential passes


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The default allocator of every buffer and result of the scan (``triton_scan(empty=...)``)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class Launch:
    """Warps and software-pipelining depth of one kernel, and for the per-chunk kernels (output, du_local, dqk,
    wy_bwd) their key and value tile widths (0: up to 64). Wider tiles mean fewer programs per chunk, each with more
    registers: output and du_local form Q K^T again in every value block's program, dqk forms dO U^T again in
    every key block's. For the sequential passes ``block_v`` is the V-block of their (K, BV) fp32 register state (0:
    ``LaunchConfig.state_block_v``); ``block_k`` does not apply."""

    num_warps: int
    num_stages: int
    block_k: int = 0
    block_v: int = 0

    def __post_init__(self) -> None:
        for name in ("block_k", "block_v"):
            value = getattr(self, name)
            if value and (value < 16 or value & (value - 1)):
                raise ValueError(f"Launch.{name} must be 0 or a power of two >= 16, got {value}")


@dataclass(frozen=True)
class LaunchConfig:
    """Launch settings of every kernel: the fastest of ``tools/bench_kernels.py --sweep`` (and ``--sweep-tiles`` for
    the per-chunk kernels' tile widths) on an H200, bf16, K = V = 256 (see BENCHMARKS.md); every setting there fits
    the shared memory of an H100/H200.

    Inputs in fp32 take exact (non tensor-core) products whose operand tiles need far more shared memory, so
    their loops are never software-pipelined (num_stages 1).
    """

    # V-block of the sequential passes (unless a pass's Launch.block_v says otherwise), whose (K, BV) fp32 state
    # lives in registers; with BV = 64 the backward pass's pipelined token tiles no longer fit an H200's shared memory
    # at K = 256
    state_block_v: int = 32
    # 2 warps (not among the sweep's settings, which apply to every per-chunk kernel at once): with the solve's rows
    # read from memory it took 0.122 ms at 8 x 2048, against 0.254 ms for 4 warps with the rows taken from registers
    # (the two changes were timed together)
    wy_solve: Launch = Launch(2, 2)
    wy_apply: Launch = Launch(4, 1)
    # the forward's pass, which also forms U = Uv - W S per chunk (two products per step), and the backward's
    # recomputation of the states from a kept U (one product per step); balanced and lean memory, which keep no U,
    # rerun the forward's pass in the backward. Each pass's own setting took their two launches at 8 x 2048 from
    # 0.681 to 0.613 ms against (4, 2) with 32 columns for both; (4, 3) with 64 columns exceeds the shared memory
    state_fwd: Launch = Launch(4, 3)
    state_recompute: Launch = Launch(4, 2, block_v=64)
    output: Launch = Launch(8, 3, block_k=64, block_v=128)
    du_local: Launch = Launch(8, 3, block_k=64, block_v=256)  # one program per chunk: Q K^T formed once
    state_bwd: Launch = Launch(4, 2)
    dqk: Launch = Launch(8, 3, block_k=128, block_v=64)  # two key-block programs per chunk
    wy_bwd: Launch = Launch(4, 2, block_k=64, block_v=128)
    # operands of the products with the chunk's triangular inverse (W, U and their gradients) for bf16 inputs:
    # "tf32" keeps them fp32, "input" rounds them to bf16, which took wy_bwd from 0.61 to 0.43 ms at 8 x 2048 for
    # ~10% more rounding error (BENCHMARKS.md), for key and value dims >= 64 (see _wy_low). fp16 inputs always keep
    # fp32 operands (fp16's range is too narrow for these gradients), fp32 inputs exact ones.
    wy_products: str = "input"

    def __post_init__(self) -> None:
        if self.wy_products not in ("tf32", "input"):
            raise ValueError(f"wy_products must be 'tf32' or 'input', got {self.wy_products!r}")


DEFAULT_LAUNCH = LaunchConfig()
"""The library's launch settings (``triton_scan(launch=None)``)."""

_RECOMPUTE = ("none", "states", "wy")


def _options(launch: Launch, mode: int) -> dict[str, int]:
    return {"num_warps": launch.num_warps, "num_stages": launch.num_stages if mode else 1}


def _block(dim: int, cap: int = 64) -> int:
    return min(cap, max(16, triton.next_power_of_2(dim)))


def _wy_low(cfg: LaunchConfig, dtype: torch.dtype, K: int, V: int) -> bool:
    """Whether the products with the triangular inverse round their operands to the input precision.

    Only with key and value dims of at least 64 (full 64-wide tiles): with Triton 3.6 on an H200, wy_apply's bf16
    products faulted (illegal memory access) at (K, V) = (32, 16), (48, 16), (64, 16), (64, 32) and (128, 16),
    while (32, 32), (32, 64) and every dim >= 64 ran correctly; narrower dims keep fp32 operands.
    """
    return cfg.wy_products == "input" and dtype == torch.bfloat16 and min(K, V) >= 64


def _chunk_blocks(K: int, V: int, block_k: int = 0, block_v: int = 0) -> tuple[int, int]:
    """Key and value tile widths of the per-chunk kernels: ``block_k`` / ``block_v`` (0: 64) capped at the padded
    dims; below a value dim of 64, value tiles are never narrower than key tiles (masked past V).

    With Triton 3.6 on an H200, bf16 inputs faulted (illegal memory access) at small head dims with value tiles
    narrower than key tiles: with :func:`_wy_low`'s guard alone, a kernel after wy_apply still faulted at (K, V) =
    (64, 32). With this rule too, (64, 32), (128, 32), (128, 16), (64, 16), (48, 16) and (32, 16) ran forward and
    backward without a fault, and the GPU test cases (32, 16), (64, 32), (16, 16), (128, 32) match the reference.
    64-wide tiles at K, V >= 64 (every shipped config) are unchanged."""
    BK = _block(K, block_k or 64)
    BV = _block(V, block_v or 64)
    return BK, max(BV, BK) if V < 64 else BV


def _state_block_v(V: int, launch: Launch, cfg: LaunchConfig) -> int:
    """V-block of a sequential pass: its launch's ``block_v``, else ``cfg.state_block_v``; at most 64 and the
    padded V."""
    return min(_block(V), launch.block_v or cfg.state_block_v)


def _tiles(launch: Launch, K: int, V: int) -> dict[str, int]:
    """BK and BV of a per-chunk kernel: :func:`_chunk_blocks` with the launch's tile widths."""
    BK, BV = _chunk_blocks(K, V, launch.block_k, launch.block_v)
    return {"BK": BK, "BV": BV}


def _forward(cfg, q, k, v, g, beta, scale, h0, cu, output_final_state, recompute, empty=_empty):
    """Packed inputs (T, H, *) -> o, final states, and what the backward needs."""
    T, H, K = q.shape
    V = v.shape[-1]
    index = build_chunk_index(cu, T, BT)
    NC = index.max_chunks
    use_g, is_delta = g is not None, beta is not None
    mode = dot_mode(q.dtype)
    dummy = q.new_empty(1, dtype=torch.float32)

    gamma, tinv = _solve(cfg, k, g, beta, index, cu, empty)
    w = u = None
    if is_delta:
        w, u = _wy_apply(cfg, k, v, beta, gamma, tinv, index, cu, empty)

    h, ht = _state_pass(cfg, k, v, w, u, gamma, h0, index, cu, output_final_state, u_final=False, empty=empty)
    o = empty(T, H, V, dtype=v.dtype, device=q.device)
    if NC > 0:
        tiles = _tiles(cfg.output, K, V)
        fwd.output_kernel[(NC * triton.cdiv(V, tiles["BV"]), H)](
            q, k, v, u if is_delta else dummy, gamma if use_g else dummy, h, o, index.chunk_seg, index.chunk_start,
            cu, scale,
            H=H, K=K, V=V, **tiles, USE_G=use_g, IS_DELTA=is_delta, MODE=mode,
            **_options(cfg.output, mode))
    keep_wy = recompute != "wy"
    saved = (index, gamma, tinv if keep_wy else None, w if keep_wy else None, u if keep_wy else None,
             h if recompute == "none" else None)
    return o, ht, saved


def _solve(cfg, k, g, beta, index, cu, empty=_empty):
    """The (T, H) fp32 in-chunk cumulative log-decay gamma (None without g) and, for the delta rules, the (T, H, BT)
    fp32 inverse of each chunk's unit lower-triangular system (None otherwise)."""
    T, H, K = k.shape
    use_g, is_delta = g is not None, beta is not None
    mode = dot_mode(k.dtype)
    dummy = k.new_empty(1, dtype=torch.float32)
    gamma = empty(T, H, dtype=torch.float32, device=k.device) if use_g else None
    tinv = empty(T, H, BT, dtype=torch.float32, device=k.device) if is_delta else None
    if (use_g or is_delta) and index.max_chunks > 0:
        fwd.wy_solve_kernel[(index.max_chunks, H)](
            k, g if use_g else dummy, beta if is_delta else dummy, gamma if use_g else dummy,
            tinv if is_delta else dummy, index.chunk_seg, index.chunk_start, cu,
            H=H, K=K, BK=_block(K), USE_G=use_g, IS_DELTA=is_delta, MODE=mode,
            **_options(cfg.wy_solve, mode))
    return gamma, tinv


def _wy_apply(cfg, k, v, beta, gamma, tinv, index, cu, empty=_empty):
    """W = Tinv diag(beta Gamma) K (T, H, K) and Uv = Tinv diag(beta) V (T, H, V), in the input precision."""
    T, H, K = k.shape
    V = v.shape[-1]
    w = empty(T, H, K, dtype=k.dtype, device=k.device)
    u = empty(T, H, V, dtype=k.dtype, device=k.device)
    mode = dot_mode(k.dtype)
    BK, BV = _chunk_blocks(K, V)
    if index.max_chunks > 0:
        fwd.wy_apply_kernel[(index.max_chunks, H)](
            k, v, beta, gamma if gamma is not None else k.new_empty(1, dtype=torch.float32), tinv, w, u,
            index.chunk_seg, index.chunk_start, cu,
            H=H, K=K, V=V, BK=BK, BV=BV, USE_G=gamma is not None, MODE=mode,
            LOW=_wy_low(cfg, k.dtype, K, V), **_options(cfg.wy_apply, mode))
    return w, u


def _state_pass(cfg, k, v, w, u, gamma, h0, index, cu, store_final, u_final, empty=_empty):
    """The sequential pass: (NC, H, K, V) start state of every chunk and the (N, H, K, V) fp32 final states.

    ``u_final=False`` (forward): u holds Uv and is turned into U = Uv - W S0 in place. ``u_final=True``: u already
    holds U (the backward's recomputation of the states, which leaves u as it is).
    """
    T, H, K = k.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    use_g, is_delta = gamma is not None, u is not None
    mode = dot_mode(k.dtype)
    dummy = k.new_empty(1, dtype=torch.float32)
    h = empty(index.max_chunks, H, K, V, dtype=k.dtype, device=k.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=k.device) if store_final else None
    launch = cfg.state_recompute if u_final else cfg.state_fwd
    kernel = fwd.state_recompute_kernel if u_final else fwd.state_fwd_kernel
    BVS = _state_block_v(V, launch, cfg)
    kernel[(N * H * triton.cdiv(V, BVS),)](
        k, v, w if is_delta else dummy, u if is_delta else dummy, gamma if use_g else dummy, h,
        h0 if h0 is not None else dummy, ht if ht is not None else dummy, index.chunk_offsets,
        index.longest_first, cu,
        H=H, K=K, V=V, BKS=_block(K), BV=BVS, USE_G=use_g, IS_DELTA=is_delta,
        HAS_H0=h0 is not None, STORE_HT=ht is not None, MODE=mode, **_options(launch, mode))
    return h, ht


def _backward(cfg, do, dht, q, k, v, g, beta, scale, h0, cu, saved, empty=_empty):
    index, gamma, tinv, w, u, h = saved
    index: ChunkIndex
    if beta is not None and w is None:  # W, U and Tinv were not kept: rebuild them, then U and the states in one pass
        tinv = _solve(cfg, k, g, beta, index, cu, empty)[1]
        w, u = _wy_apply(cfg, k, v, beta, gamma, tinv, index, cu, empty)
        h, _ = _state_pass(cfg, k, v, w, u, gamma, h0, index, cu, store_final=False, u_final=False, empty=empty)
    elif h is None:
        h, _ = _state_pass(cfg, k, v, w, u, gamma, h0, index, cu, store_final=False, u_final=True, empty=empty)
    T, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    NC = index.max_chunks
    use_g, is_delta = g is not None, beta is not None
    mode = dot_mode(q.dtype)
    dummy = q.new_empty(1, dtype=torch.float32)

    # dU, dW and the first part of dK pass between kernels in bf16 for bf16 inputs (halving the backward's largest
    # intermediate traffic; every product that reads them rounds its operands to bf16 or tf32 anyway), in fp32
    # otherwise (fp16's range is too narrow for gradients)
    grad_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    du = empty(T, H, V, dtype=grad_dtype, device=q.device)
    if NC > 0:
        tiles = _tiles(cfg.du_local, K, V)
        bwd.du_local_kernel[(NC * triton.cdiv(V, tiles["BV"]), H)](
            q, k, gamma if use_g else dummy, do, du, index.chunk_seg, index.chunk_start, cu, scale,
            H=H, K=K, V=V, **tiles, USE_G=use_g, MODE=mode,
            **_options(cfg.du_local, mode))
    dh = empty(NC, H, K, V, dtype=q.dtype, device=q.device)
    dh0 = empty(N, H, K, V, dtype=torch.float32, device=q.device) if h0 is not None else None
    BVS = _state_block_v(V, cfg.state_bwd, cfg)
    bwd.state_bwd_kernel[(N * H * triton.cdiv(V, BVS),)](
        q, k, w if is_delta else dummy, gamma if use_g else dummy, do, du, dh,
        dht if dht is not None else dummy, dh0 if dh0 is not None else dummy, index.chunk_offsets,
        index.longest_first, cu, scale,
        H=H, K=K, V=V, BKS=_block(K), BV=BVS, USE_G=use_g, IS_DELTA=is_delta,
        HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, MODE=mode, **_options(cfg.state_bwd, mode))

    dq = empty(*q.shape, dtype=q.dtype, device=q.device)
    dk = empty(T, H, K, dtype=grad_dtype if is_delta else k.dtype, device=q.device)
    dw = empty(T, H, K, dtype=grad_dtype, device=q.device) if is_delta else dummy
    dqk_tiles = _tiles(cfg.dqk, K, V)
    dgam_parts = triton.cdiv(K, dqk_tiles["BK"])  # dqk writes one dgamma slice per key block
    dgam = empty(dgam_parts, T, H, dtype=torch.float32, device=q.device) if use_g else dummy
    if NC > 0:
        bwd.dqk_kernel[(NC * dgam_parts, H)](
            q, k, u if is_delta else v, gamma if use_g else dummy, h, dh, do, du, dq, dk, dw, dgam,
            index.chunk_seg, index.chunk_start, cu, scale, T * H,
            H=H, K=K, V=V, **dqk_tiles, USE_G=use_g, IS_DELTA=is_delta, MODE=mode,
            **_options(cfg.dqk, mode))

    dg = empty(*g.shape, dtype=g.dtype, device=q.device) if use_g else None
    dbeta = empty(*beta.shape, dtype=beta.dtype, device=q.device) if is_delta else None
    dv = empty(*v.shape, dtype=v.dtype, device=q.device) if is_delta else du.to(v.dtype)
    dk_out = empty(*k.shape, dtype=k.dtype, device=q.device) if is_delta else dk
    if (use_g or is_delta) and NC > 0:
        bwd.wy_bwd_kernel[(NC, H)](
            k, v, beta if is_delta else dummy, gamma if use_g else dummy, tinv if is_delta else dummy,
            dw, du, dk, dgam, dk_out, dv, dbeta if is_delta else dummy, dg if use_g else dummy,
            index.chunk_seg, index.chunk_start, cu, T * H,
            H=H, K=K, V=V, **_tiles(cfg.wy_bwd, K, V), DGAM_PARTS=dgam_parts, USE_G=use_g, IS_DELTA=is_delta,
            MODE=mode, LOW=_wy_low(cfg, q.dtype, K, V), **_options(cfg.wy_bwd, mode))
    return dq, dk_out, dv, dg, dbeta, dh0


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, h0, cu, output_final_state, recompute, rebuild_qkv, cfg, empty):
        o, ht, saved = _forward(cfg, q, k, v, g, beta, scale, h0, cu, output_final_state, recompute, empty)
        if rebuild_qkv is None:
            qkv_or_sources, ctx.rebuild = (q, k, v), None
        else:  # keep what q, k, v are rebuilt from (the caller keeps those anyway), not q, k, v
            qkv_or_sources = rebuild_qkv.take_tensors()
            ctx.rebuild = (rebuild_qkv, len(qkv_or_sources))
        ctx.save_for_backward(*qkv_or_sources, g, beta, h0, cu, *saved[1:], *saved[0][1:])  # index tensors last
        ctx.max_chunks = saved[0].max_chunks
        ctx.scale = scale
        ctx.cfg = cfg
        ctx.empty = empty
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        tensors = ctx.saved_tensors
        if ctx.rebuild is None:
            (q, k, v), tensors = tensors[:3], tensors[3:]
        else:
            sources, count = ctx.rebuild
            (q, k, v), tensors = sources.rebuild(*tensors[:count]), tensors[count:]
        g, beta, h0, cu, gamma, tinv, w, u, h, *index_tensors = tensors
        index = ChunkIndex(ctx.max_chunks, *index_tensors)
        dq, dk, dv, dg, dbeta, dh0 = _backward(
            ctx.cfg, do.contiguous(), dht.contiguous() if dht is not None else None, q, k, v, g, beta, ctx.scale, h0, cu,
            (index, gamma, tinv, w, u, h), ctx.empty)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None, None, None, None


def triton_scan(
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
    chunk_size: int = 64,
    recompute: str | None = None,
    launch: LaunchConfig | None = None,
    rebuild_qkv=None,
    empty: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked scan in Triton; arguments and results as :func:`mom_lit.ops.scan.recurrent.recurrent_scan`.

    ``recompute``: what the backward rebuilds instead of the forward keeping it (None: ``"states"``):
    ``"states"`` the chunk start states (one more sequential pass), ``"wy"`` also W, U and the chunks' triangular
    inverses of the delta rules (the solve and W/U kernels again and a heavier pass; 2 (K + V) bytes in bf16 and
    4 x 64 bytes of fp32 inverse less per scanned token and head),
    ``"none"`` nothing (fastest backward, most memory).

    ``launch``: warps, pipelining and tile widths of every kernel (None: ``DEFAULT_LAUNCH``).

    ``rebuild_qkv``: an object with ``take_tensors()`` (the tensors to keep, handed over once) and
    ``rebuild(*tensors)`` (the packed (B*T, H, K|V) q, k, v exactly), such as the MoM slot stage's
    ``mom_lit.ops.slots.QKVSources``; the forward then keeps those tensors instead of q, k, v (for a caller that keeps
    them anyway: 2K + V elements per token and head less). It holds no tensor after ``take_tensors``, so that
    activation checkpointing sees every saved tensor.

    ``empty``: the allocator of every buffer and result, forward and backward, called as
    ``empty(*shape, dtype=..., device=...)`` (None: ``torch.empty``). Kernel tests pass one that fills with NaN,
    so that a row no kernel writes cannot pass as zeros.

    q, k: (B, T, H, K); v: (B, T, H, V); g, beta: (B, T, H) or None; initial_state: (N, H, K, V) or None;
    cu_seqlens: (N + 1,) int offsets with B = 1. Returns o (B, T, H, V) in v's dtype and the (N, H, K, V) fp32
    final states (or None). Differentiable in q, k, v, g, beta and initial_state. Never synchronises the host.
    """
    if gk is not None:
        raise ValueError("gk (per-key gate) is not supported by the Triton scan; use the chunked reference")
    if chunk_size != BT:
        raise ValueError(f"chunk_size must be {BT} for the Triton scan, got {chunk_size!r}")
    recompute = "states" if recompute is None else recompute
    if recompute not in _RECOMPUTE:
        raise ValueError(f"recompute must be one of {_RECOMPUTE}, got {recompute!r}")
    shapes = check_scan_inputs(q, k, v, g, None, beta, initial_state, cu_seqlens, scale)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16 for the Triton scan, got {tensor.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, K, V = shapes.batch, shapes.seq_len, shapes.num_heads, shapes.key_dim, shapes.value_dim
    if K > _MAX_KEY_DIM:
        raise ValueError(f"the key dim of q and k must be at most {_MAX_KEY_DIM} for the Triton scan, got {K}")
    scale = K ** -0.5 if scale is None else float(scale)

    if cu_seqlens is None:
        cu = (torch.arange(B + 1, device=q.device) * T).to(torch.int32)  # rows as B equal segments
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    flat = lambda x, *tail: None if x is None else x.reshape(B * T, H, *tail).contiguous()  # noqa: E731
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    o, ht = _TritonScan.apply(flat(q, K), flat(k, K), flat(v, V), flat(g), flat(beta), scale, h0, cu,
                              output_final_state, recompute, rebuild_qkv,
                              DEFAULT_LAUNCH if launch is None else launch, _empty if empty is None else empty)
    return o.view(B, T, H, V), ht
