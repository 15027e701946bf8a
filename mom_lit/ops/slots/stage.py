"""The slot stage in Triton: the scan's q, k, v (and the raw gate columns) of every memory-sorted slot, straight
from the projections, with autograd functions whose backwards recompute instead of keeping gathered copies.

:func:`slot_conv` reads the per-(token, stream) projections of every stream in place; :func:`projected_slot_conv`
projects each slot for its own memory only by one grouped product (``grouped.py``). Both equal gathering the inputs,
the reference short convolution (``conv.py``: :func:`varlen_short_conv`) and the L2 norm of q and k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mom_lit.ops.slots.grouped import project_slots, project_slots_backward

__all__ = ["QKVSources", "ScanInputs", "SlotInputs", "projected_slot_conv", "slot_conv", "slot_qkv", "triton_slots"]


def _slot_stage_grads(q_src, kv_src, w, q_rows, kv_rows, position, rank, dims, dq, dk, dv, dgates, dkv, dkv_rows,
                      launch):
    """Backward of the slot stage: returns d q_src (N_tok, HK) and the filter gradient; writes d kv_src into
    ``dkv``, slot i's row at ``dkv_rows[i]`` (row i when None). Columns of dkv it does not write keep their values.
    ``kv_rows`` None: kv_src is in slot order."""
    from mom_lit.ops.slots import kernels as kern  # Triton is imported only where its kernels run

    heads, key_dim, value_dim, extra, weight_dtype = dims
    HK, HV = heads * key_dim, heads * value_dim
    length = q_rows.numel()

    def grad(t, dim):  # an unused output has no gradient
        return t.contiguous() if t is not None else q_src.new_zeros(length, heads, dim)

    dw_k = kern.conv_bwd(kv_src[:, :HK], kv_rows, position, w[HK:2 * HK], grad(dk, key_dim), heads, key_dim,
                         True, dkv[:, :HK], dkv_rows, launch=launch)
    dw_v = kern.conv_bwd(kv_src[:, HK:HK + HV], kv_rows, position, w[2 * HK:], grad(dv, value_dim), heads,
                         value_dim, False, dkv[:, HK:HK + HV], dkv_rows, launch=launch)
    if dgates is not None and extra:
        gate_cols = slice(HK + HV, HK + HV + extra)
        if dkv_rows is None:
            dkv[:, gate_cols] = dgates.to(dkv.dtype)
        else:  # one slot per (token, stream): no collision
            dkv[dkv_rows, gate_cols] = dgates.to(dkv.dtype)
    dq_slot = torch.empty(length, HK, device=q_src.device, dtype=q_src.dtype)
    dw_q = kern.conv_bwd(q_src, q_rows, position, w[:HK], grad(dq, key_dim), heads, key_dim, True, dq_slot, None,
                         launch=launch)
    # Each token owns exactly J slots: read them through the inverse permutation and add (no scatter-add).
    dq_src = kern.slot_sum(dq_slot, rank, q_src.shape[0], launch)  # (L, HK) -> (N_tok, HK)
    return dq_src, torch.cat([dw_q, dw_k, dw_v]).to(weight_dtype)


class _SlotConv(torch.autograd.Function):
    """Triton slot stage: q, k, v of every sorted slot straight from the projections (see ``kernels.py``)."""

    @staticmethod
    def forward(ctx, q_src, kv_src, weight, q_rows, kv_rows, position, rank, heads, key_dim, value_dim, extra,
                launch):
        HK, HV = heads * key_dim, heads * value_dim
        w = weight.contiguous()
        q, k, v = slot_qkv(q_src, kv_src, w, q_rows, kv_rows, position, heads=heads, key_dim=key_dim,
                           value_dim=value_dim, launch=launch)
        gates = kv_src[kv_rows, HK + HV:HK + HV + extra]  # (L, extra) pre-activation gate logits
        ctx.save_for_backward(q_src, kv_src, w, q_rows, kv_rows, position, rank)
        ctx.dims = (heads, key_dim, value_dim, extra, weight.dtype)
        ctx.launch = launch
        return q, k, v, gates

    @staticmethod
    def backward(ctx, dq, dk, dv, dgates):
        q_src, kv_src, w, q_rows, kv_rows, position, rank = ctx.saved_tensors
        dkv = torch.zeros_like(kv_src)  # streams a token did not select get no gradient
        dq_src, dweight = _slot_stage_grads(q_src, kv_src, w, q_rows, kv_rows, position, rank, ctx.dims, dq, dk, dv,
                                            dgates, dkv, kv_rows, ctx.launch)
        return dq_src, dkv, dweight, None, None, None, None, None, None, None, None, None


class QKVSources:
    """The slot stage's hand-off to the scan: what the scan's backward rebuilds q, k, v from, so that the scan keeps
    these tensors instead of q, k, v (``triton_scan(rebuild_qkv=...)``, with ``activation_memory`` balanced or lean).

    ``projections``: the slot stage's own kept projections ``(q_src, kv_src, weight, q_rows, kv_rows, position)``;
    the rebuild is the slot kernels' forward (:func:`slot_qkv`). ``inputs`` (lean, grouped projections): the layer
    input and weights ``(x, q_weight, kv_weight, weight, token, ends, position)``; the rebuild projects again and
    leaves the projections here for the slot stage's backward, which autograd runs right after the scan's: one
    rebuild serves both, and nothing is held between the two steps.
    """

    def __init__(self, kind: str, tensors: tuple, heads: int, key_dim: int, value_dim: int, launch=None) -> None:
        if kind not in ("projections", "inputs"):
            raise ValueError(f"QKVSources kind must be 'projections' or 'inputs', got {kind!r}")
        self.kind, self._tensors = kind, tuple(tensors)
        self.dims = dict(heads=heads, key_dim=key_dim, value_dim=value_dim, launch=launch)
        self._projections: tuple[torch.Tensor, torch.Tensor] | None = None

    def take_tensors(self) -> tuple:
        """The tensors to keep for the rebuild, handed over once (the scan saves them for its backward)."""
        tensors, self._tensors = self._tensors, ()
        return tensors

    def rebuild(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v exactly as the slot stage's forward computed them, from the kept tensors."""
        if self.kind == "projections":
            return slot_qkv(*tensors, **self.dims)
        x, q_weight, kv_weight, weight, token, ends, position = tensors
        q_src, kv_src = _project_sources(x, q_weight, kv_weight, token, ends)
        self._projections = (q_src, kv_src)
        return _projected_qkv(q_src, kv_src, weight.contiguous(), token, position, **self.dims)

    def take_projections(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The projections that :meth:`rebuild` made, once (None if it did not run)."""
        projections, self._projections = self._projections, None
        return projections


def _project_sources(x, q_weight, kv_weight, token, ends):
    """(N_tok, HK) query projections and (L, P) per-slot projections of the sorted slots, without autograd."""
    return x @ q_weight.t(), project_slots(x, kv_weight, token, ends)


def _projected_qkv(q_src, kv_src, weight, token, position, heads, key_dim, value_dim, launch=None):
    """q, k, v of the slot stage from the query projections and the slot-ordered projections (row i = slot i)."""
    return slot_qkv(q_src, kv_src, weight, token, None, position, heads=heads, key_dim=key_dim, value_dim=value_dim,
                    launch=launch)


class _ProjectedSlotConv(torch.autograd.Function):
    """Query and grouped slot projections + slot stage; keeps the projections for the backward (``keep``) or x and
    the weights only, the backward recomputing them (or taking the scan's rebuild of them from ``sources``)."""

    @staticmethod
    def forward(ctx, x, q_weight, kv_weight, weight, token, ends, position, rank, keep, sources, heads, key_dim,
                value_dim, extra, launch):
        HK, HV = heads * key_dim, heads * value_dim
        q_src, kv_src = _project_sources(x, q_weight, kv_weight, token, ends)
        w = weight.contiguous()
        q, k, v = _projected_qkv(q_src, kv_src, w, token, position, heads, key_dim, value_dim, launch)
        gates = kv_src[:, HK + HV:HK + HV + extra].clone()  # a copy: a view would keep kv_src alive
        kept = (q_src, kv_src) if keep else ()
        ctx.save_for_backward(x, q_weight, kv_weight, w, token, ends, position, rank, *kept)
        ctx.dims = (heads, key_dim, value_dim, extra, weight.dtype)
        ctx.sources, ctx.launch = sources, launch
        if keep and sources is not None:  # the scan keeps the very same projections to rebuild q, k, v from
            sources._tensors = (q_src, kv_src, w, token, None, position)
        return q, k, v, gates

    @staticmethod
    def backward(ctx, dq, dk, dv, dgates):
        x, q_weight, kv_weight, w, token, ends, position, rank, *kept = ctx.saved_tensors
        HK, HV = ctx.dims[0] * ctx.dims[1], ctx.dims[0] * ctx.dims[2]
        sources = tuple(kept) or (ctx.sources.take_projections() if ctx.sources is not None else None)
        q_src, kv_src = sources if sources else _project_sources(x, q_weight, kv_weight, token, ends)
        dkv = torch.empty_like(kv_src)  # every row is a slot: only the columns past k and v need zeros
        dkv[:, HK + HV:].zero_()  # gate columns without a gradient and the zero padding rows' columns
        dq_src, dweight = _slot_stage_grads(q_src, kv_src, w, token, None, position, rank, ctx.dims, dq, dk, dv,
                                            dgates, dkv, None, ctx.launch)
        del q_src, kv_src, kept, sources
        dx, dkv_weight = project_slots_backward(dkv, x, kv_weight, token, rank, ends, ctx.launch)
        dx = dx.addmm_(dq_src, q_weight)  # both products' input gradients in one buffer
        dq_weight = dq_src.t() @ x
        return (dx, dq_weight, dkv_weight, dweight, None, None, None, None, None, None, None, None, None, None,
                None, None)


def projected_slot_conv(x: torch.Tensor, q_weight: torch.Tensor, kv_weight: torch.Tensor, weight: torch.Tensor,
                        token: torch.Tensor, ends: torch.Tensor, position: torch.Tensor, rank: torch.Tensor,
                        heads: int, key_dim: int, value_dim: int, extra: int, keep: bool = True,
                        sources: QKVSources | None = None, launch=None):
    """:func:`slot_conv` of ``q_src = x @ q_weight^T`` and of the grouped projections of the sorted slots
    (``mom_lit.ops.slots.grouped.project_slots``): each slot projected for its own memory only. ``keep=False``: the
    backward recomputes the projections from x instead of keeping them (per layer N_tok x HK + L x P elements less
    saved for one more set of products in the backward), or takes the scan's rebuild of them from ``sources``.
    With ``keep``, ``sources`` (kind ``projections``) receives the kept projections for the scan.

    Args:
        x: (N_tok, D); q_weight: (HK, D); kv_weight: (S, P, D) per-stream projections (key | value | gate
            columns), x's dtype; weight: (2HK + HV, W) filter; token, position: (L,) of the sorted slots;
            ends: (S,) int32 group ends of the memories' slots; rank: (N_tok * J,).
    Returns:
        q, k (L, H, K), v (L, H, V) in x's dtype, gates (L, extra).
    """
    if sources is not None and sources.kind != ("projections" if keep else "inputs"):
        raise ValueError(f"projected_slot_conv: keep={keep} hands the scan its "
                         f"{'projections' if keep else 'inputs'}, got QKVSources of kind {sources.kind!r}")
    return _ProjectedSlotConv.apply(x, q_weight, kv_weight, weight, token, ends, position, rank, keep, sources,
                                    heads, key_dim, value_dim, extra, launch)


def slot_qkv(q_src: torch.Tensor, kv_src: torch.Tensor, weight: torch.Tensor, q_rows: torch.Tensor,
             kv_rows: torch.Tensor | None, position: torch.Tensor, *, heads: int, key_dim: int,
             value_dim: int, launch=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k (L, H, K) and v (L, H, V) of :func:`slot_conv` by its forward kernels, without autograd (weight
    contiguous; ``kv_rows`` None: kv_src is in slot order). Deterministic, so a backward can rebuild them instead
    of keeping them (``triton_scan(rebuild_qkv=...)``)."""
    from mom_lit.ops.slots import kernels as kern  # Triton is imported only where its kernels run

    HK, HV = heads * key_dim, heads * value_dim
    q = kern.conv_fwd(q_src, q_rows, position, weight[:HK], heads, key_dim, True, launch=launch)
    k = kern.conv_fwd(kv_src[:, :HK], kv_rows, position, weight[HK:2 * HK], heads, key_dim, True, launch=launch)
    v = kern.conv_fwd(kv_src[:, HK:HK + HV], kv_rows, position, weight[2 * HK:], heads, value_dim, False,
                      launch=launch)
    return q, k, v


def slot_conv(q_src: torch.Tensor, kv_src: torch.Tensor, weight: torch.Tensor, q_rows: torch.Tensor,
              kv_rows: torch.Tensor, position: torch.Tensor, rank: torch.Tensor, heads: int, key_dim: int,
              value_dim: int, extra: int, launch=None):
    """Slot stage of a MoM layer in Triton: per sorted slot i, SiLU(causal conv) of ``q_src[q_rows[i]] |
    kv_src[kv_rows[i], :2HK+HV]`` inside its segment (zeros before the segment start, no cached state), with q
    and k L2-normalised per head, plus the raw gate columns ``kv_src[kv_rows[i], 2HK+HV:][:extra]``.

    Same function as gathering ``q_src[q_rows] | kv_src[kv_rows]`` and calling :func:`varlen_short_conv` and the
    L2 norm, without materialising the gathered (L, C) inputs; the backward recomputes them and adds the q
    gradients of a token's J slots through ``rank`` (token-major slot -> sorted position), never by scatter-add.

    Args:
        q_src: (N_tok, H*K) query projections; kv_src: (R, >= H*K + H*V + extra) per-(token, stream) projections,
            key | value | gate columns; both with unit column stride.
        weight: (2HK + HV, W) filter, channels q | k | v. q_rows, kv_rows, position: (L,) int64; rank: (N_tok*J,).
    Returns:
        q, k (L, H, K), v (L, H, V) in the input dtype, gates (L, extra).
    """
    return _SlotConv.apply(q_src, kv_src, weight, q_rows, kv_rows, position, rank, heads, key_dim, value_dim,
                           extra, launch)


@dataclass
class SlotInputs:
    """The Triton slot stage's results: the scan's q, k (L, H, K) and v (L, H, V), the raw gate columns (L, extra),
    the dense per-stream projections (N_tok, S, P) where every stream was projected (None with the grouped product),
    and the hand-off to the scan (None where the scan keeps q, k, v itself)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gates: torch.Tensor
    dense: torch.Tensor | None
    sources: QKVSources | None


def triton_slots(x: torch.Tensor, q_weight: torch.Tensor, stream_weight: torch.Tensor, conv_weight: torch.Tensor,
                 layout, heads: int, key_dim: int, value_dim: int, extra: int, grouped: bool,
                 activation_memory: str = "fast", launch=None) -> SlotInputs:
    """The slot stage of a MoM layer in Triton, from the layer input to the scan's inputs.

    Args:
        x: (N_tok, D) in the dtype of the products; q_weight: (HK, D); stream_weight: (S, P, D) per-stream
            projections (key | value | gate columns | padding), x's dtype; conv_weight: (2HK + HV, W), x's dtype.
        layout: the memory-sorted slot layout (``mom_lit.layout.build_layout``).
        grouped: project each slot for its own memory only (:func:`projected_slot_conv`), else every stream for
            every token (:func:`slot_conv`).
        activation_memory: ``fast`` (the scan keeps q, k, v), ``balanced`` (the scan rebuilds them from the kept
            projections), ``lean`` (with ``grouped``, the projections are not kept either: the scan's backward
            rebuilds them once, for itself and for the slot stage).
    """
    num_tokens, hidden = x.shape
    num_streams = stream_weight.shape[0]
    weight = conv_weight.contiguous()
    dims = dict(heads=heads, key_dim=key_dim, value_dim=value_dim, launch=launch)
    if grouped:
        ends = layout.cu_seqlens[layout.num_sequences::layout.num_sequences].to(torch.int32)  # (S,) group ends
        inputs = (x, q_weight, stream_weight, weight, layout.token, ends, layout.position)
        sources = None
        if activation_memory == "lean":
            sources = QKVSources("inputs", inputs, **dims)
        elif activation_memory == "balanced":
            sources = QKVSources("projections", (), **dims)  # filled with the kept projections by the forward
        q, k, v, gates = projected_slot_conv(*inputs, layout.rank, heads, key_dim, value_dim, extra,
                                             keep=activation_memory != "lean", sources=sources, launch=launch)
        return SlotInputs(q, k, v, gates, None, sources)
    dense = x @ stream_weight.reshape(-1, hidden).t()  # (N_tok, S * P)
    kv_src = dense.view(num_tokens * num_streams, -1)  # (N_tok * S, P): row t * S + s
    kv_rows = layout.token * num_streams + layout.memory
    q_src = torch.nn.functional.linear(x, q_weight)
    q, k, v, gates = slot_conv(q_src, kv_src, weight, layout.token, kv_rows, layout.position, layout.rank, heads,
                               key_dim, value_dim, extra, launch=launch)
    sources = None
    if activation_memory != "fast":  # slot_conv keeps these for its own backward anyway
        sources = QKVSources("projections", (q_src, kv_src, weight, layout.token, kv_rows, layout.position), **dims)
    return SlotInputs(q, k, v, gates, dense.view(num_tokens, num_streams, -1), sources)


@dataclass
class ScanInputs:
    """The slot stage's results, the scan's inputs of every memory-sorted slot: q, k (L, H, K), v (L, H, V), the
    log-decay g and beta (L, H) or None, the per-key log-decay gk (L, H, K) or None, the final conv state (S*N, W-1,
    C) of a forward that writes a cache, and the hand-off from which the Triton scan rebuilds q, k, v."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor | None
    gk: torch.Tensor | None
    beta: torch.Tensor | None
    conv_final: torch.Tensor | None = None
    sources: QKVSources | None = None
