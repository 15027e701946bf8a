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

so a chunk maps its start state affinely, ``S_C = M S0 + B``, with M = Gamma_C - Kd^T W (a (K, K) matrix for the
delta rule, the decay Gamma_C for additive rules) and B = Kd^T Uv. Everything that does not depend on ``S0`` is
computed for all chunks at once (``intra_chunk``); the states are then passed through the chunks of every segment
with one small matmul per chunk step (``pass_states``), and the outputs are assembled for all chunks at once
(``assemble_output``).

Decays are never formed as a difference of long fp32 cumulative sums: a decay from j to i inside a chunk is the
exp of the sum over (j, i], for a scalar gate the difference of two float64 cumulative sums (``scalar_decays``,
exact to fp32 rounding), for a per-key gate a masked cumulative sum (``segsum``); decays from the chunk start are
cumulative sums from the start and decays to the chunk end are sums over (j, C] (the last row of the segment
sums, or a reversed cumulative sum per key); every exponent is <= 0.

Packed segments (``cu_seqlens``) are laid out chunk by chunk, each padded only to a multiple of ``C`` with
identity tokens (zero key, value and query, gate 0, beta 0), so segments never mix and no segment is padded to
the longest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from mom_lit.ops.scan.recurrent import check_scan_inputs, compute_dtype

__all__ = ["ChunkKernels", "EAGER_KERNELS", "assemble_output", "chunk_layout", "chunk_scan", "chunk_scan_with",
           "intra_chunk", "pass_states", "scalar_decays", "segsum"]

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


def scalar_decays(g: torch.Tensor) -> torch.Tensor:
    """``exp(segsum(g))`` for a scalar log-gate: (..., C) -> (..., C, C), ``Gamma_i / Gamma_j`` for j <= i, 0 above.

    Each segment sum is the difference of two cumulative sums taken in float64: for fp32 gates (and any chunk
    length in use) the difference is exact to far below fp32 rounding, so this matches :func:`segsum` while
    costing one elementwise pass over (C, C) instead of a cumulative sum over it (and the same in the backward).
    """
    length = g.shape[-1]
    sums = g.to(torch.float64).cumsum(-1)  # (..., C)
    diff = (sums.unsqueeze(-1) - sums.unsqueeze(-2)).to(g.dtype)  # (..., i, j) = sum_{j < l <= i} g_l
    above = torch.ones(length, length, dtype=torch.bool, device=g.device).triu(1)
    return diff.masked_fill(above, float("-inf")).exp()


def _suffix_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``out_j = sum_{l > j} x_l`` along ``dim`` (exclusive reversed cumulative sum, no subtraction)."""
    inclusive = x.flip(dim).cumsum(dim).flip(dim)
    shifted = inclusive.narrow(dim, 1, x.shape[dim] - 1)
    return torch.cat([shifted, torch.zeros_like(x.narrow(dim, 0, 1))], dim)


def _per_key_gate_scores(x: torch.Tensor, y: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
    """D(x, y) for a per-key gate, lower triangular incl. the diagonal.

    x: (..., N, H, C, K) (extra leading dims share the keys and gates); y, gk: (N, H, C, K) -> (..., N, H, C, C).

    Diagonal sub-blocks use exact per-dimension segment sums. For a key in an earlier sub-block J and a query in
    sub-block I, the decay factors into (query side: from the start of I) x (whole blocks strictly between J and
    I) x (key side: to the end of J); each factor has a non-positive exponent, so nothing overflows.
    """
    n, h, chunk, dim = y.shape
    lead = x.shape[:-4]
    sub = _PER_KEY_SUB_BLOCK if chunk % _PER_KEY_SUB_BLOCK == 0 else chunk
    blocks = chunk // sub
    xb = x.reshape(*lead, n, h, blocks, sub, dim)  # (..., N, H, nb, sub, K)
    yb, gb = (t.reshape(n, h, blocks, sub, dim) for t in (y, gk))

    # exact decays inside each sub-block; exp(-inf) = 0 above the diagonal
    seg = segsum(gb.transpose(-1, -2)).permute(0, 1, 2, 4, 5, 3).exp()  # (N, H, nb, sub_i, sub_j, K)
    diag = (xb.unsqueeze(-2) * (yb.unsqueeze(-3) * seg)).sum(-1)  # (..., N, H, nb, sub, sub)
    if blocks == 1:
        return diag.reshape(*lead, n, h, chunk, chunk)

    from_start = gb.cumsum(-2).exp()  # (N, H, nb, sub, K)
    to_end = _suffix_sums(gb, -2).exp()  # (N, H, nb, sub, K)
    totals = gb.sum(-2).transpose(-1, -2)  # (N, H, K, nb)
    through = segsum(totals)  # [I, J] = sum over blocks J < b <= I
    # shift rows by one: [I, J] = sum over blocks strictly between J and I, -inf unless J < I
    between = torch.cat([torch.full_like(through[..., :1, :], float("-inf")), through[..., :-1, :]], -2).exp()
    # query side decayed to the end of every key block J: (..., N, H, J, I*sub, K)
    q_side = (xb * from_start).unsqueeze(-4) * between.permute(0, 1, 4, 3, 2).unsqueeze(-2)
    q_side = q_side.reshape(*lead, n, h, blocks, chunk, dim)
    k_side = (yb * to_end).transpose(-1, -2)  # (N, H, J, K, sub)
    off = (q_side @ k_side).view(*lead, n, h, blocks, blocks, sub, sub)  # (..., N, H, J, I, sub_i, sub_j)
    off = off.movedim(-4, -2)  # (..., N, H, I, sub_i, J, sub_j)
    on_diagonal = torch.eye(blocks, dtype=x.dtype, device=x.device)[:, None, :, None]  # (I, 1, J, 1)
    full = off + diag.unsqueeze(-2) * on_diagonal  # (..., N, H, nb, sub, nb, sub)
    return full.reshape(*lead, n, h, chunk, chunk)


class IntraChunk(NamedTuple):
    """State-independent pieces of every chunk (compute precision).

    The state-passing pieces are in step order: row ``j * N + n`` belongs to step j of segment n; steps past a
    segment's end are identity steps. A step maps its start state S0 to
    ``transition @ S0 + value`` (delta rule) or ``decay * S0 + value`` (additive rules; no decay when ungated).
    """

    q_state: torch.Tensor  # (NC, H, C, K): O = o_local + q_state @ S0
    o_local: torch.Tensor  # (NC, H, C, V)
    transition_steps: torch.Tensor | None  # (J*N, H, K, K), delta rule
    value_steps: torch.Tensor  # (J*N, H, K, V)
    decay_steps: torch.Tensor | None  # (J*N, H, 1, 1) scalar gate, (J*N, H, K, 1) per-key gate; additive rules


def _place_rows(x: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base`` with row ``index[i]`` replaced by ``x[i]`` (one-to-one ``index``): (M, ...) into (R, ...).

    Differentiable in ``x`` (its gradient is the plain gather ``grad[index]``); ``base`` holds the rows no ``x``
    lands on (padding tokens, identity steps) and may be an expanded constant.
    """
    return torch.index_copy(base.to(x.dtype), 0, index, x)


class _ScatterRows(torch.autograd.Function):
    """Rows of ``x`` placed at the one-to-one ``index`` of ``rows`` zero rows; the backward is the plain gather
    ``grad[index]``, never an accumulating scatter (as for its adjoint, :class:`_GatherRows`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return x.new_zeros(rows, *x.shape[1:]).index_copy_(0, index, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class _GatherRows(torch.autograd.Function):
    """``x[index]`` for a one-to-one ``index`` into the ``len(x)`` rows; the backward places the gradient rows back
    (zero where no row was read), never an accumulating scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


def to_chunks(x: torch.Tensor | None, layout: ChunkLayout) -> torch.Tensor | None:
    """(L, H, ...) flat tokens -> (NC, C, H, ...) chunk slots; padding slots are zero identity tokens.

    Kept out of the compiled stage on purpose: a gather fused into its consumers is recomputed in every inner loop.
    """
    if x is None:
        return None
    slots = _ScatterRows.apply(x, layout.scatter, layout.gather.numel())  # (NC*C, H, ...)
    return slots.view(*layout.gather.shape, *x.shape[1:])


def to_tokens(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """(NC*C, H, ...) chunk slots -> (L, H, ...) flat tokens (padding slots dropped)."""
    return _GatherRows.apply(x, layout.scatter)


def intra_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    gk: torch.Tensor | None,
    beta: torch.Tensor | None,
    start_order: torch.Tensor,
    step_slots: torch.Tensor,
    scale: float,
) -> IntraChunk:
    """All state-independent work of every chunk at once.

    q, k: (NC, C, H, K); v: (NC, C, H, V); g, beta: (NC, C, H); gk: (NC, C, H, K), padding slots zero.
    start_order: (NC,) row of each chunk in the (J*N) step order; step_slots: any (J*N,) tensor (its length is
    the number of step rows; the rows no chunk lands on are identity steps).
    """
    dtype = compute_dtype(q, k, v, g, gk, beta)

    def chunked(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).transpose(1, 2)  # (NC, C, H, ...) -> (NC, H, C, ...)

    q, k, v = chunked(q) * scale, chunked(k), chunked(v)  # (NC, H, C, K|V)
    key_dim, h, steps = k.shape[-1], k.shape[1], step_slots.shape[0]
    b = None if beta is None else chunked(beta).unsqueeze(-1)  # (NC, H, C, 1)
    # Scored against the keys: the queries, and for the delta rule the beta-scaled keys (the rows of A).
    # A = diag(beta) strict_lower(D(K, K)): the solve reads only the strictly lower triangle of A (unit diagonal
    # implied) and projects its gradient onto it, so the diagonal needs no masking.
    if g is not None:
        g = chunked(g)  # (NC, H, C)
        decays = scalar_decays(g)  # (NC, H, C, C): Gamma_i / Gamma_j, 0 above the diagonal
        p = (q @ k.transpose(-1, -2)) * decays  # (NC, H, C, C)
        a = None if b is None else ((b * k) @ k.transpose(-1, -2)) * decays
        # Gamma_i = exp(g_0) * decays[i, 0];  Gamma_C / Gamma_j = decays[C-1, j]
        from_start = (decays[..., :, 0] * g[..., :1].exp()).unsqueeze(-1)  # (NC, H, C, 1)
        to_end = decays[..., -1, :].unsqueeze(-1)  # (NC, H, C, 1)
        chunk_decay = from_start[..., -1:, :]  # (NC, H, 1, 1)
    elif gk is not None:
        gk = chunked(gk)  # (NC, H, C, K)
        rows = q.unsqueeze(0) if b is None else torch.stack([q, b * k])  # (R, NC, H, C, K)
        scores = _per_key_gate_scores(rows, k, gk)  # (R, NC, H, C, C)
        p, a = scores[0], (None if b is None else scores[1])
        from_start = gk.cumsum(-2).exp()  # (NC, H, C, K)
        to_end = _suffix_sums(gk, -2).exp()  # (NC, H, C, K)
        chunk_decay = from_start[..., -1, :].unsqueeze(-1)  # (NC, H, K, 1)
    else:
        p = (q @ k.transpose(-1, -2)).tril()
        a = None if b is None else (b * k) @ k.transpose(-1, -2)
        from_start = to_end = chunk_decay = None

    q_decayed = q if from_start is None else q * from_start
    k_to_end_t = (k if to_end is None else k * to_end).transpose(-1, -2)  # Kd^T: (NC, H, K, C)
    if b is None:
        value_steps = _place_rows(k_to_end_t @ v, start_order, v.new_zeros(()).expand(steps, h, key_dim, v.shape[-1]))
        decay_steps = (None if chunk_decay is None else
                       _place_rows(chunk_decay, start_order, v.new_ones(()).expand(steps, *chunk_decay.shape[1:])))
        return IntraChunk(q_decayed, p @ v, None, value_steps, decay_steps)

    k_decayed = k if from_start is None else k * from_start
    rhs = torch.cat([b * k_decayed, b * v], -1)  # (NC, H, C, K + V)
    solved = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)  # [W | Uv]
    p_solved = p @ solved  # [P W | P Uv]
    k_solved = k_to_end_t @ solved  # [Kd^T W | Kd^T Uv]: (NC, H, K, K + V)
    eye = torch.eye(key_dim, dtype=dtype, device=q.device)
    start_map = eye if chunk_decay is None else chunk_decay * eye  # Gamma_C as a (K, K) diagonal
    transition = start_map - k_solved[..., :key_dim]  # (NC, H, K, K)
    transition_steps = _place_rows(transition, start_order, eye.expand(steps, h, key_dim, key_dim))
    value_steps = _place_rows(k_solved[..., key_dim:], start_order, v.new_zeros(()).expand(steps, h, key_dim,
                                                                                          v.shape[-1]))
    return IntraChunk(q_decayed - p_solved[..., :key_dim], p_solved[..., key_dim:], transition_steps, value_steps,
                      None)


def pass_states(intra: IntraChunk, initial: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry the states of all N segments through their chunks, one chunk of every segment per step.

    initial: (N, H, K, V). Returns the start state of every (step, segment) (J*N, H, K, V) and the final states.
    """
    num_states = initial.shape[0]

    def per_step(x: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
        # the rows are already in step order: each step only takes a view
        return None if x is None else x.view(steps, num_states, *x.shape[1:]).unbind(0)

    values, transitions, decays = (per_step(x) for x in (intra.value_steps, intra.transition_steps,
                                                            intra.decay_steps))
    state = initial
    starts = []
    for step in range(steps):
        starts.append(state)
        if transitions is not None:
            state = transitions[step] @ state
        elif decays is not None:
            state = decays[step] * state
        state = state + values[step]
    return torch.stack(starts).flatten(0, 1), state


def assemble_output(
    o_local: torch.Tensor,
    q_state: torch.Tensor,
    start_steps: torch.Tensor,
    start_order: torch.Tensor,
) -> torch.Tensor:
    """Outputs of every chunk slot: (NC, H, C, V) + (NC, H, C, K) @ S0 -> (NC*C, H, V).

    start_order: (NC,) row of each chunk in the (J*N) step-ordered start states.
    """
    o = o_local + q_state @ start_steps[start_order]  # (NC, H, C, V)
    return o.transpose(1, 2).flatten(0, 1)


class ChunkKernels(NamedTuple):
    """The two batched stages of the chunked scan; swapped for compiled versions by the dispatcher."""

    intra: Callable[..., IntraChunk]
    output: Callable[..., torch.Tensor]


EAGER_KERNELS = ChunkKernels(intra_chunk, assemble_output)


@dataclass(frozen=True)
class ChunkLayout:
    """Where every token sits in the chunked layout, and which chunk every segment visits at each step."""

    steps: int  # J, the most chunks of any segment
    gather: torch.Tensor  # (NC, C) flat token index per chunk slot; L marks a padding slot
    scatter: torch.Tensor  # (L,) slot index (into NC*C) per token
    step_chunks: torch.Tensor  # (J*N,) chunk index per (step, segment); NC marks an identity step
    start_order: torch.Tensor  # (NC,) row of each chunk in the (J*N) step order

    @property
    def num_chunks(self) -> int:
        return self.gather.shape[0]


def chunk_layout(offsets: torch.Tensor, chunk: int, device: torch.device) -> ChunkLayout:
    """Layout of segments ``[offsets[n], offsets[n+1])`` of the flat tokens; ``offsets`` is a CPU int64 tensor.

    Each segment is padded only up to a multiple of ``chunk``; empty segments own no chunk.
    """
    num_tokens = int(offsets[-1])
    lengths = offsets[1:] - offsets[:-1]  # (N,)
    segments = lengths.numel()
    counts = (lengths + chunk - 1) // chunk  # chunks per segment
    first = torch.cumsum(counts, 0) - counts  # first chunk of each segment
    num_chunks = int(counts.sum())
    steps = int(counts.max()) if segments else 0

    segment_of_chunk = torch.repeat_interleave(torch.arange(segments), counts)  # (NC,)
    step_of_chunk = torch.arange(num_chunks) - first[segment_of_chunk]
    tokens = (offsets[segment_of_chunk] + step_of_chunk * chunk).unsqueeze(1) + torch.arange(chunk)  # (NC, C)
    gather = torch.where(tokens < offsets[segment_of_chunk + 1].unsqueeze(1), tokens, num_tokens)

    segment_of_token = torch.repeat_interleave(torch.arange(segments), lengths)  # (L,)
    scatter = first[segment_of_token] * chunk + torch.arange(num_tokens) - offsets[segment_of_token]

    step = torch.arange(steps).unsqueeze(1)  # (J, 1)
    step_chunks = torch.where(step < counts, first + step, num_chunks).reshape(-1)  # (J*N,) step-major
    start_order = step_of_chunk * segments + segment_of_chunk
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return ChunkLayout(steps, to(gather), to(scatter), to(step_chunks), to(start_order))


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
    initial = (torch.zeros(N, H, K, V, dtype=dtype, device=q.device) if initial_state is None
               else initial_state.to(dtype))

    if cu_seqlens is None:
        offsets = torch.arange(B + 1) * T  # rows are B equal segments of the flat B*T tokens
    else:
        offsets = cu_seqlens.to("cpu", torch.int64)  # the one host copy of a scan call
    layout = chunk_layout(offsets, chunk_size, q.device)
    if layout.num_chunks == 0:  # no tokens at all: every final state is its initial state
        return v.new_zeros(B, T, H, V), (initial if output_final_state else None)

    flat = lambda x: None if x is None else x.flatten(0, 1)  # noqa: E731  (B, T, ...) -> (B*T, ...)
    chunks = [to_chunks(flat(x), layout) for x in (q, k, v, g, gk, beta)]  # (NC, C, H, ...)
    intra = kernels.intra(*chunks, layout.start_order, layout.step_chunks, scale)
    start_steps, final = pass_states(intra, initial, layout.steps)
    o = to_tokens(kernels.output(intra.o_local, intra.q_state, start_steps, layout.start_order), layout)  # (L, H, V)
    return o.view(B, T, H, V).to(v.dtype), (final if output_final_state else None)


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
    """Chunked form of :func:`mom_lit.ops.scan.recurrent.recurrent_scan` (same arguments and results), eager.

    ``chunk_size`` is the chunk length ``C``; any positive value works, 64 balances the O(C^2) intra-chunk work
    against the number of sequential state steps.
    """
    return chunk_scan_with(EAGER_KERNELS, q, k, v, g=g, gk=gk, beta=beta, scale=scale, initial_state=initial_state,
                           cu_seqlens=cu_seqlens, output_final_state=output_final_state, chunk_size=chunk_size)
