"""Chunked (segment-sum) form of the memory recurrence: the reference that CPU training runs.

The sequence is cut into chunks of ``C`` tokens. Inside a chunk every quantity is a dense matmul; across chunks
only the (K, V) state is passed on. Notation for one chunk and head, with start state ``S0``, local inclusive
cumulative log-gate ``gamma_i`` and ``Gamma_i = exp(gamma_i)`` (a vector over K for per-key gates)::

    D(X, Y)_ij = sum_d X_id Y_jd Gamma_id / Gamma_jd        decayed scores, j <= i
    P = D(scale Q, K)                                       (C, C) query-key scores
    delta rule:  (I + A) U = diag(beta) (V - (Gamma * K) S0),   A = diag(beta) strict_lower(D(K, K))
                 so with W = (I + A)^-1 diag(beta) (Gamma * K) and Uv = (I + A)^-1 diag(beta) V: U = Uv - W S0
    additive:    U = V, W = 0
    O   = (Gamma * scale Q) S0 + P U       = (Gamma * scale Q - P W) S0 + P Uv
    S_C = Gamma_C S0 + (K * Gamma_C / Gamma)^T U = (Gamma_C - Kd^T W) S0 + Kd^T Uv,   Kd = K * Gamma_C / Gamma

Everything that does not depend on ``S0`` is computed for all chunks at once (``intra_chunk``); the state is then
passed through the chunks of every segment with one small matmul per chunk step (``pass_states``), and the
outputs are assembled for all chunks at once (``assemble_output``).

Decays are never formed as a difference of long cumulative sums: a decay from j to i inside a chunk is the exp of
a masked cumulative sum over (j, i] (``segsum``), the decay from the chunk start is a cumulative sum from the
start and the decay to the chunk end is a reversed cumulative sum; every exponent is <= 0.

Packed segments (``cu_seqlens``) are laid out chunk by chunk, each padded only to a multiple of ``C`` with
identity tokens (zero key, value and query, gate 0, beta 0), so segments never mix and no segment is padded to
the longest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from mom_lit.ops.recurrent import check_scan_inputs, compute_dtype

__all__ = ["ChunkKernels", "EAGER_KERNELS", "chunk_scan", "chunk_scan_with", "intra_chunk", "assemble_output",
           "segsum"]

# Sub-block length of the per-key-gate scores: the exact (sub, sub, K) segment sums are only formed on the
# diagonal blocks, keeping the memory of a chunk at C * sub * K instead of C * C * K.
_PER_KEY_SUB_BLOCK = 16


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sums along the last dim: ``out[..., i, j] = sum_{j < l <= i} x[..., l]``, -inf for j > i.

    (..., L) -> (..., L, L). Built by a masked cumulative sum, so short decays between late positions keep full
    precision however large the sums up to them are.
    """
    length = x.shape[-1]
    below = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    # repeated[..., i, j] = x[..., i], kept only where i > j, then summed over i
    repeated = x.unsqueeze(-1).expand(*x.shape, length).masked_fill(~below, 0.0)
    sums = repeated.cumsum(-2)
    return sums.masked_fill(~below.logical_or(torch.eye(length, dtype=torch.bool, device=x.device)), float("-inf"))


def _suffix_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``out_j = sum_{l > j} x_l`` along ``dim`` (exclusive reversed cumulative sum, no subtraction)."""
    inclusive = x.flip(dim).cumsum(dim).flip(dim)
    shifted = inclusive.narrow(dim, 1, x.shape[dim] - 1)
    return torch.cat([shifted, torch.zeros_like(x.narrow(dim, 0, 1))], dim)


def _masked_scores(scores: torch.Tensor, strict: bool) -> torch.Tensor:
    return scores.tril(-1) if strict else scores.tril()


def _scalar_gate_scores(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None, strict: bool) -> torch.Tensor:
    """D(x, y) for a scalar (or no) gate: x, y (N, H, C, K), g (N, H, C) -> (N, H, C, C)."""
    scores = x @ y.transpose(-1, -2)
    if g is not None:
        scores = scores * segsum(g).exp()
    return _masked_scores(scores, strict)


def _per_key_gate_scores(x: torch.Tensor, y: torch.Tensor, gk: torch.Tensor, strict: bool) -> torch.Tensor:
    """D(x, y) for a per-key gate: x, y, gk (N, H, C, K) -> (N, H, C, C).

    Diagonal sub-blocks use exact per-dimension segment sums. For a key in an earlier sub-block J and a query in
    sub-block I, the decay factors into (query side: from the start of I) x (whole blocks strictly between J and
    I) x (key side: to the end of J); each factor has a non-positive exponent, so nothing overflows.
    """
    n, h, chunk, dim = x.shape
    sub = _PER_KEY_SUB_BLOCK if chunk % _PER_KEY_SUB_BLOCK == 0 else chunk
    blocks = chunk // sub
    xb, yb, gb = (t.reshape(n, h, blocks, sub, dim) for t in (x, y, gk))  # (N, H, nb, sub, K)

    seg = segsum(gb.transpose(-1, -2)).exp()  # (N, H, nb, K, sub, sub)
    diag = torch.einsum("nhbik,nhbjk,nhbkij->nhbij", xb, yb, seg)  # (N, H, nb, sub, sub)
    diag = _masked_scores(diag, strict)
    if blocks == 1:
        return diag.reshape(n, h, chunk, chunk)

    from_start = gb.cumsum(-2).exp()  # (N, H, nb, sub, K)
    to_end = _suffix_sums(gb, -2).exp()  # (N, H, nb, sub, K)
    totals = gb.sum(-2).transpose(-1, -2)  # (N, H, K, nb)
    through = segsum(totals)  # [I, J] = sum over blocks J < b <= I
    # shift rows by one: [I, J] = sum over blocks strictly between J and I, -inf unless J < I
    between = torch.cat([torch.full_like(through[..., :1, :], float("-inf")), through[..., :-1, :]], -2).exp()
    off = torch.einsum("nhIik,nhkIJ,nhJjk->nhIiJj", xb * from_start, between, yb * to_end)
    eye = torch.eye(blocks, dtype=x.dtype, device=x.device)
    full = off + torch.einsum("nhbij,bc->nhbicj", diag, eye)  # (N, H, nb, sub, nb, sub)
    return full.reshape(n, h, chunk, chunk)


class IntraChunk(NamedTuple):
    """Per-chunk pieces that do not depend on the chunk start state (all in compute precision)."""

    q_state: torch.Tensor  # (NC, H, C, K): O = o_local + q_state @ S0
    o_local: torch.Tensor  # (NC, H, C, V)
    key_state: torch.Tensor | None  # (NC, H, K, K): S_C = decay * S0 - key_state @ S0 + value_state (delta)
    value_state: torch.Tensor  # (NC, H, K, V)
    decay: torch.Tensor | None  # (NC, H) scalar gate, (NC, H, K) per-key gate, None without gate


def intra_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    gk: torch.Tensor | None,
    beta: torch.Tensor | None,
    scale: float,
) -> IntraChunk:
    """All state-independent work of every chunk at once.

    q, k: (NC, C, H, K); v: (NC, C, H, V); g, beta: (NC, C, H); gk: (NC, C, H, K). Padded tokens are zeros.
    """
    dtype = compute_dtype(q, k, v, g, gk, beta)
    q = q.transpose(1, 2).to(dtype) * scale  # (NC, H, C, K)
    k = k.transpose(1, 2).to(dtype)  # (NC, H, C, K)
    v = v.transpose(1, 2).to(dtype)  # (NC, H, C, V)
    if g is not None:
        g = g.transpose(1, 2).to(dtype)  # (NC, H, C)
        from_start = g.cumsum(-1).exp().unsqueeze(-1)  # (NC, H, C, 1)
        to_end = _suffix_sums(g, -1).exp().unsqueeze(-1)  # (NC, H, C, 1)
        decay = g.sum(-1).exp()  # (NC, H)
        scores = lambda x, y, strict: _scalar_gate_scores(x, y, g, strict)  # noqa: E731
    elif gk is not None:
        gk = gk.transpose(1, 2).to(dtype)  # (NC, H, C, K)
        from_start = gk.cumsum(-2).exp()
        to_end = _suffix_sums(gk, -2).exp()
        decay = gk.sum(-2).exp()  # (NC, H, K)
        scores = lambda x, y, strict: _per_key_gate_scores(x, y, gk, strict)  # noqa: E731
    else:
        from_start = to_end = decay = None
        scores = lambda x, y, strict: _scalar_gate_scores(x, y, None, strict)  # noqa: E731

    q_decayed = q if from_start is None else q * from_start
    k_to_end = k if to_end is None else k * to_end  # Kd
    p = scores(q, k, False)  # (NC, H, C, C)
    if beta is None:
        return IntraChunk(q_decayed, p @ v, None, k_to_end.transpose(-1, -2) @ v, decay)

    b = beta.transpose(1, 2).to(dtype).unsqueeze(-1)  # (NC, H, C, 1)
    a = b * scores(k, k, True)  # strictly lower; the unit diagonal of (I + A) is implied below
    k_decayed = k if from_start is None else k * from_start
    rhs = torch.cat([b * k_decayed, b * v], -1)  # (NC, H, C, K + V)
    solved = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
    w, u_v = solved.split([k.shape[-1], v.shape[-1]], -1)
    k_to_end_t = k_to_end.transpose(-1, -2)  # (NC, H, K, C)
    return IntraChunk(q_decayed - p @ w, p @ u_v, k_to_end_t @ w, k_to_end_t @ u_v, decay)


def assemble_output(o_local: torch.Tensor, q_state: torch.Tensor, start_states: torch.Tensor) -> torch.Tensor:
    """(NC, H, C, V) + (NC, H, C, K) @ (NC, H, K, V) -> chunk-major outputs (NC, C, H, V)."""
    return (o_local + q_state @ start_states).transpose(1, 2)


class ChunkKernels(NamedTuple):
    """The two batched stages of the chunked scan; swapped for compiled versions by the dispatcher."""

    intra: Callable[..., IntraChunk]
    output: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


EAGER_KERNELS = ChunkKernels(intra_chunk, assemble_output)


@dataclass(frozen=True)
class ChunkLayout:
    """Where every token sits in the chunked layout, and which chunk every segment visits at each step.

    ``gather``/``scatter`` are None for equal-length rows (a plain pad + reshape suffices).
    """

    num_chunks: int  # NC
    steps: int  # J, the most chunks of any segment
    chunk_map: torch.Tensor  # (N, J) chunk index per (segment, step); NC marks an identity step
    gather: torch.Tensor | None  # (NC * C,) token index per slot; T marks a padding slot
    scatter: torch.Tensor | None  # (T,) slot index per token
    start_order: torch.Tensor | None  # (NC,) position of each chunk in the (J, N) stack of start states


def _dense_layout(batch: int, seq_len: int, chunk: int, device: torch.device) -> ChunkLayout:
    steps = -(-seq_len // chunk)
    chunk_map = torch.arange(batch * steps, device=device).view(batch, steps)
    return ChunkLayout(batch * steps, steps, chunk_map, None, None, None)


def _varlen_layout(cu_seqlens: torch.Tensor, seq_len: int, chunk: int, device: torch.device) -> ChunkLayout:
    offsets = cu_seqlens.to("cpu", torch.int64)  # the one host copy of a scan call
    lengths = offsets[1:] - offsets[:-1]  # (N,)
    segments = lengths.numel()
    counts = (lengths + chunk - 1) // chunk  # chunks per segment
    first = torch.cumsum(counts, 0) - counts  # first chunk of each segment
    num_chunks = int(counts.sum())
    steps = int(counts.max())

    segment_of_chunk = torch.repeat_interleave(torch.arange(segments), counts)  # (NC,)
    step_of_chunk = torch.arange(num_chunks) - first[segment_of_chunk]
    tokens = (offsets[segment_of_chunk] + step_of_chunk * chunk).unsqueeze(1) + torch.arange(chunk)  # (NC, C)
    gather = torch.where(tokens < offsets[segment_of_chunk + 1].unsqueeze(1), tokens, seq_len).reshape(-1)

    segment_of_token = torch.repeat_interleave(torch.arange(segments), lengths)  # (T,)
    scatter = first[segment_of_token] * chunk + torch.arange(seq_len) - offsets[segment_of_token]

    step = torch.arange(steps)
    chunk_map = torch.where(step < counts.unsqueeze(1), first.unsqueeze(1) + step, num_chunks)  # (N, J)
    start_order = step_of_chunk * segments + segment_of_chunk
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return ChunkLayout(num_chunks, steps, to(chunk_map), to(gather), to(scatter), to(start_order))


def _to_chunks(x: torch.Tensor | None, layout: ChunkLayout, chunk: int) -> torch.Tensor | None:
    """(B, T, ...) -> (NC, C, ...) with identity (zero) padding."""
    if x is None:
        return None
    if layout.gather is None:
        batch, seq_len = x.shape[:2]
        pad = layout.steps * chunk - seq_len
        if pad:
            x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, pad])
        return x.reshape(layout.num_chunks, chunk, *x.shape[2:])
    flat = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])])  # (T + 1, ...): the last row is the padding token
    return flat[layout.gather].view(layout.num_chunks, chunk, *x.shape[2:])


def pass_states(intra: IntraChunk, layout: ChunkLayout, initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry the state through every segment's chunks; all segments advance together, one chunk per step.

    Returns the start state of every chunk (NC, H, K, V) and the final state of every segment (N, H, K, V).
    """
    key_state, value_state, decay = intra.key_state, intra.value_state, intra.decay
    if layout.gather is not None:
        # one identity chunk at index NC for the steps past a segment's end: no decay, no write
        value_state = torch.cat([value_state, value_state.new_zeros(1, *value_state.shape[1:])])
        if key_state is not None:
            key_state = torch.cat([key_state, key_state.new_zeros(1, *key_state.shape[1:])])
        if decay is not None:
            decay = torch.cat([decay, decay.new_ones(1, *decay.shape[1:])])

    state = initial
    starts = []
    for step in range(layout.steps):
        index = layout.chunk_map[:, step]  # (N,)
        starts.append(state)
        update = value_state[index]
        if key_state is not None:
            update = update - key_state[index] @ state
        if decay is not None:
            step_decay = decay[index]
            # (N, H) -> (N, H, 1, 1) for a scalar gate; (N, H, K) -> (N, H, K, 1) per key
            state = state * (step_decay[..., None, None] if step_decay.dim() == 2 else step_decay[..., None])
        state = state + update

    stacked = torch.stack(starts)  # (J, N, H, K, V)
    if layout.start_order is None:
        start_states = stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:])  # chunk order is (row, step)
    else:
        start_states = stacked.flatten(0, 1)[layout.start_order]
    return start_states, state


def chunk_scan_with(
    kernels: ChunkKernels,
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_scan`` running its batched stages through ``kernels`` (eager or compiled)."""
    shapes = check_scan_inputs(q, k, v, g, gk, beta, initial_state, cu_seqlens, scale)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    B, T, H, K, V, N = (shapes.batch, shapes.seq_len, shapes.num_heads, shapes.key_dim, shapes.value_dim,
                        shapes.num_states)
    scale = K ** -0.5 if scale is None else float(scale)
    dtype = compute_dtype(q, k, v, g, gk, beta, initial_state)

    if initial_state is None:
        initial = torch.zeros(N, H, K, V, dtype=dtype, device=q.device)
    else:
        initial = initial_state.to(dtype)
    if cu_seqlens is None:
        layout = _dense_layout(B, T, chunk_size, q.device)
    else:
        layout = _varlen_layout(cu_seqlens, T, chunk_size, q.device)
    if layout.num_chunks == 0:  # no tokens at all: every final state is its initial state
        return v.new_zeros(B, T, H, V), (initial if output_final_state else None)

    chunks = [_to_chunks(x, layout, chunk_size) for x in (q, k, v, g, gk, beta)]
    intra = kernels.intra(*chunks, scale)
    start_states, final = pass_states(intra, layout, initial)
    o = kernels.output(intra.o_local, intra.q_state, start_states)  # (NC, C, H, V)

    if layout.scatter is None:
        o = o.reshape(B, layout.steps * chunk_size, H, V)[:, :T]
    else:
        o = o.reshape(layout.num_chunks * chunk_size, H, V)[layout.scatter].unsqueeze(0)  # (1, T, H, V)
    return o.to(v.dtype), (final if output_final_state else None)


def chunk_scan(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form of :func:`mom_lit.ops.recurrent.recurrent_scan` (same arguments and results), eager.

    ``chunk_size`` is the chunk length ``C``; any positive value works, 64 balances the O(C^2) intra-chunk work
    against the number of sequential state steps.
    """
    return chunk_scan_with(EAGER_KERNELS, q, k, v, g=g, gk=gk, beta=beta, scale=scale, initial_state=initial_state,
                           cu_seqlens=cu_seqlens, output_final_state=output_final_state, chunk_size=chunk_size)
