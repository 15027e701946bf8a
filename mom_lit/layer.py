"""The Mixture-of-Memories layer.

Per token: the router picks ``topk`` of E memories with renormalised weights; each picked memory m, and the
always-active shared memory, gets its own key/value (and gate/beta) projections and a short convolution over its
own token stream; the memories are updated by the configured linear recurrence; the output is
``sum_j w_j o^(m_j) + o_shared``, then a per-head RMSNorm gated by ``swish(W_g2 x)`` and an output projection.

All (memory, sequence) segments of the batch go through ONE varlen scan (see ``layout.py``). Memories that a
token did not select never see it, in training and in decoding alike.

Next to the Triton scan (CUDA), the stages around it run as Triton kernels too (``ops/slots/``, ``ops/mix/``): the slot
stage reads each slot's inputs in place from the projections and convolves/normalises them in one pass, the mix
stage reads each token's slot outputs in place from the sorted scan output and applies the weighted sum and the
gated norm in one pass; both backwards recompute instead of keeping gathered copies and never scatter-add. The
plain-torch stages remain the reference (CPU, float64, prefill with a conv cache) and the tests' oracle.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mom_lit.config import MoMConfig
from mom_lit.initialization import init_layer
from mom_lit.layout import build_layout, unsort
from mom_lit.norm import GatedRMSNorm
from mom_lit.ops.scan import scan
from mom_lit.ops.slots import ScanInputs, triton_slots, varlen_short_conv
from mom_lit.ops.slots.reference import per_key_log_decay, qkv_heads, scalar_gates_reference
from mom_lit.ops.decode import decode_step
from mom_lit.ops.mix import mix_gated_rms_norm, mix_reference
from mom_lit.plan import ExecutionPlan, PlanCache, compute_dtype
from mom_lit.router import Router, Routing
from mom_lit.state import LayerState

__all__ = ["LayerAux", "LayerState", "MoMLayer"]


@dataclass
class LayerAux:
    routing: Routing | None
    state: LayerState | None


class MoMLayer(nn.Module):
    def __init__(self, config: MoMConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        c = config
        self.num_heads, self.head_dim, self.head_v_dim = c.num_heads, c.head_dim, c.head_v_dim
        self.num_streams = c.num_streams
        self.rule = c.update_rule
        streams, hidden = c.num_streams, c.hidden_size

        self.router = Router(hidden, c.num_memories, c.topk) if c.has_router else None
        self.q_proj = nn.Linear(hidden, c.key_dim, bias=False)
        # Per-stream projections, stacked (stream-major) so that no Python loop over memories is needed.
        self.k_proj = nn.Parameter(torch.empty(streams, c.key_dim, hidden))
        self.v_proj = nn.Parameter(torch.empty(streams, c.value_dim, hidden))
        self.b_proj = nn.Parameter(torch.empty(streams, c.num_heads, hidden)) if c.has_beta else None
        if c.has_scalar_gate:
            self.a_proj = nn.Parameter(torch.empty(streams, c.num_heads, hidden))
            self.A_log = nn.Parameter(torch.empty(c.num_heads))
            self.dt_bias = nn.Parameter(torch.empty(c.num_heads))
            self.A_log._no_weight_decay = True
            self.dt_bias._no_weight_decay = True
        else:
            self.a_proj = self.A_log = self.dt_bias = None
        if self.rule == "gla":
            self.gk_down = nn.Parameter(torch.empty(streams, c.gla_gate_rank, hidden))
            self.gk_up = nn.Parameter(torch.empty(streams, c.key_dim, c.gla_gate_rank))
            self.gk_bias = nn.Parameter(torch.zeros(streams, c.key_dim))
            self.gk_bias._no_weight_decay = True
        else:
            self.gk_down = self.gk_up = self.gk_bias = None
        self.conv_channels = 2 * c.key_dim + c.value_dim
        self.conv_weight = (nn.Parameter(torch.empty(self.conv_channels, c.conv_size)) if c.conv_size > 0 else None)
        self.g_proj = nn.Linear(hidden, c.value_dim, bias=False) if c.use_output_gate else None
        self.o_norm = GatedRMSNorm(c.head_v_dim, eps=c.norm_eps)
        self.o_proj = nn.Linear(c.value_dim, hidden, bias=False)
        # The plans of a layer run on its own (a model hands its plan to every layer).
        self.plans = PlanCache(config)
        self.reset_parameters()

    def configure_paths(self, **overrides) -> None:
        """Paths of this layer run on its own other than its config chooses (as
        :meth:`mom_lit.model.MoMForCausalLM.configure_paths`)."""
        self.plans = PlanCache(self.config, **overrides)

    def reset_parameters(self) -> None:
        """(Re)initialise every parameter in place (:func:`mom_lit.initialization.init_layer`)."""
        init_layer(self)

    def forward(
        self,
        x: torch.Tensor,
        seq_id: torch.Tensor,
        num_sequences: int,
        state: LayerState | None = None,
        use_cache: bool = False,
        plan: ExecutionPlan | None = None,
    ) -> tuple[torch.Tensor, LayerAux]:
        """x: (B, T, D); seq_id: (B*T,) independent-sequence id of each token (rows or packed documents).
        ``plan``: the implementation of every stage (default: this layer's plan for x's device and dtype)."""
        plan = plan if plan is not None else self.plans.for_input(x)
        batch, seq_len, hidden = x.shape
        H, V = self.num_heads, self.head_v_dim
        x_flat = x.reshape(batch * seq_len, hidden)  # (N_tok, D)
        routing, memory, weight = self._route(x_flat)  # (N_tok, J) memory and mixing weight of every slot
        gate = self.g_proj(x_flat).view(-1, H, V) if self.g_proj is not None else None
        if seq_len == 1 and state is not None and num_sequences == batch and use_cache:  # in-place step
            o, new_state = self._decode_step(x_flat, memory, state, plan)  # (B, J, H, V)
            mixed = mix_reference(o, weight, gate, self.o_norm)
        else:
            layout = build_layout(memory, seq_id, num_sequences, self.num_streams)
            inputs = self._slots(x_flat, layout, state, use_cache, plan)
            o, new_state = self._scan(inputs, layout, state, use_cache, plan)  # (L, H, V) in segment order
            mixed = self._mix(o, layout, weight, gate, plan)  # (N_tok, H, V)
        out = self.o_proj(mixed.reshape(batch, seq_len, H * V))
        return out, LayerAux(routing=routing, state=new_state if use_cache else None)

    # Stages ----------------------------------------------------------------------------------------------------
    def _slots(self, x_flat, layout, state, use_cache, plan: ExecutionPlan) -> ScanInputs:
        """The scan's inputs of every memory-sorted slot: projections, short convolution, norms and gates."""
        conv_init = state.scan_conv() if state is not None else None  # (S * N, W-1, C) or None
        path = plan.slots if conv_init is None and not use_cache else plan.cached_slots
        if path in ("grouped", "gathered"):
            return self._slots_triton(x_flat, layout, path == "grouped", plan)
        prepare = self._compiled_prepare_slots() if path == "compiled" else self._prepare_slots
        return ScanInputs(*prepare(x_flat, layout.token, layout.memory, layout.segment, layout.position,
                                   layout.cu_seqlens, conv_init, use_cache, path == "compiled"))

    def _scan(self, inputs: ScanInputs, layout, state, use_cache, plan: ExecutionPlan):
        """All (memory, sequence) segments through one varlen scan: (L, H, V) slot outputs and the new state."""
        initial = state.scan_memory() if state is not None else None  # (S * N, H, K, V) or None
        triton = {}
        if plan.scan == "triton":
            triton = dict(rebuild_qkv=inputs.sources, recompute=plan.scan_recompute, launch=plan.scan_launch)
        batched = [None if t is None else t.unsqueeze(0) for t in (inputs.g, inputs.gk, inputs.beta)]
        o, final = scan(inputs.q.unsqueeze(0), inputs.k.unsqueeze(0), inputs.v.unsqueeze(0), g=batched[0],
                        gk=batched[1], beta=batched[2], scale=self.head_dim ** -0.5, initial_state=initial,
                        cu_seqlens=layout.cu_seqlens, output_final_state=use_cache, backend=plan.scan_backend,
                        chunk_size=plan.chunk_size, **triton)
        new_state = None
        if use_cache:
            new_state = LayerState.from_scan(final, inputs.conv_final, self.num_streams, layout.num_sequences)
        return o.squeeze(0), new_state

    def _mix(self, o, layout, weight, gate, plan: ExecutionPlan) -> torch.Tensor:
        """(L, H, V) sorted slot outputs -> (N_tok, H, V): routing-weighted sum per token, then the gated norm."""
        if plan.mix == "triton":
            return mix_gated_rms_norm(o, layout.rank, weight, gate, self.o_norm.weight, self.o_norm.eps,
                                      launch=plan.stage_launch)
        o = unsort(o, layout).view(weight.shape[0], -1, self.num_heads, self.head_v_dim)  # (N_tok, J, H, V)
        return mix_reference(o, weight, gate, self.o_norm)

    def _route(self, x_flat: torch.Tensor) -> tuple[Routing | None, torch.Tensor, torch.Tensor]:
        """Memory index (N_tok, J) and mixing weight (N_tok, J) of every slot, shared memory included."""
        num_tokens = x_flat.shape[0]
        if self.router is None:
            routing = None
            memory = torch.zeros(num_tokens, 1, dtype=torch.int64, device=x_flat.device)
            weight = torch.ones(num_tokens, 1, device=x_flat.device)
        else:
            routing = self.router(x_flat)
            memory, weight = routing.memory, routing.weight
        if self.config.shared_memory:
            memory = F.pad(memory, (0, 1), value=self.num_streams - 1)  # the shared stream is the last one
            weight = F.pad(weight, (0, 1), value=1.0)
        return routing, memory, weight

    def _stream_weights(self, align: int = 1) -> torch.Tensor:
        """(S, P, D) all per-stream projections that read x, concatenated along P: k | v | beta, gate logits |
        zero rows up to a multiple of ``align`` | GLA's gate code (last, where ``_per_key_gate`` reads it)."""
        parts = [self.k_proj, self.v_proj] + [p for p in (self.b_proj, self.a_proj) if p is not None]
        pad = -sum(p.shape[1] for p in parts) % align
        if pad:
            parts.append(self.k_proj.new_zeros(self.num_streams, pad, self.k_proj.shape[2]))
        if self.gk_down is not None:
            parts.append(self.gk_down)
        return torch.cat(parts, dim=1)

    def _slot_inputs(self, x_flat: torch.Tensor, token: torch.Tensor, memory: torch.Tensor):
        """Gather each slot's pre-convolution q (L, HK) and k|v (L, HK + HV) and its gates from the projections of
        its token (q and k|v apart: concatenating them would copy every slot's inputs once more).

        Per-stream projections are computed for every stream and then gathered per slot: one matmul, no loop
        over memories, at (S / J) times the projection FLOPs of a grouped matmul over the sorted layout.
        """
        c = self.config
        num_tokens, hidden = x_flat.shape
        w_stream = self._stream_weights()
        per_stream = (x_flat @ w_stream.reshape(-1, hidden).to(x_flat.dtype).t()).view(num_tokens, self.num_streams, -1)
        gk = self._per_key_gate(per_stream, token, memory)
        # Gathers as index_select of whole rows: their backward is an index_add, not an accumulating index_put.
        slot_proj = per_stream.view(num_tokens * self.num_streams, -1).index_select(
            0, token * self.num_streams + memory)  # (L, P): row (token, memory) of per_stream
        kv, rest = slot_proj.split([c.key_dim + c.value_dim, slot_proj.shape[1] - c.key_dim - c.value_dim], dim=1)
        q = self.q_proj(x_flat).index_select(0, token)  # (L, HK)
        g, beta = scalar_gates_reference(rest, self.A_log, self.dt_bias, self.num_heads, self.b_proj is not None)
        return q, kv, g, gk, beta

    def _per_key_gate(self, per_stream: torch.Tensor, token: torch.Tensor, memory: torch.Tensor):
        """GLA's low-rank per-key log-gate (L, H, K) of each slot from every stream's projections (N_tok, S, P)
        (up-projected per stream, then gathered), or None for the other rules."""
        if self.gk_down is None:
            return None
        c = self.config
        gk = per_key_log_decay(per_stream[..., -c.gla_gate_rank:], self.gk_up, self.gk_bias, c.gla_gate_normalizer)
        return gk[token, memory].view(-1, self.num_heads, self.head_dim)

    # Slot stage: the reference (plain torch, also compiled) and the Triton kernels --------------------------------
    def _prepare_slots(self, x_flat, token, memory, segment, position, cu_seqlens, conv_init, use_cache, shifted):
        """Projections, short convolution, normalisation and gates of every sorted slot: the scan's inputs."""
        q, kv, g, gk, beta = self._slot_inputs(x_flat, token, memory)
        conv_final = None
        if self.conv_weight is not None:
            # channels q | k | v of the filter and of the cached inputs (S*N, W-1, C)
            HK = q.shape[1]
            weight = self.conv_weight.to(q.dtype)
            init_q = init_kv = None
            if conv_init is not None:
                init_q, init_kv = conv_init[..., :HK], conv_init[..., HK:]
            conv = dict(output_final_state=use_cache, shifted=shifted)
            q, final_q = varlen_short_conv(q, weight[:HK], segment, position, cu_seqlens, init_q, **conv)
            kv, final_kv = varlen_short_conv(kv, weight[HK:], segment, position, cu_seqlens, init_kv, **conv)
            if use_cache:
                conv_final = torch.cat([final_q, final_kv], dim=-1)  # (S*N, W-1, C)
        else:
            q, kv = F.silu(q), F.silu(kv)
        q, k, v = qkv_heads(q, kv, self.num_heads, self.head_dim, self.head_v_dim)
        return q, k, v, g, gk, beta, conv_final

    def _compiled_prepare_slots(self):
        """:meth:`_prepare_slots` as one ``torch.compile``d function (CUDA, next to the Triton scan): a few fused
        kernels instead of dozens of passes over the (slots x channels) activations. Compiled once per layer; where
        compilation is unavailable, the eager function with one warning."""
        if "prepare" not in self.__dict__:
            try:
                self.__dict__["prepare"] = torch.compile(self._prepare_slots)
            except Exception as error:  # pragma: no cover - depends on the installation
                warnings.warn(f"torch.compile is unavailable ({error}); the MoM layer runs its elementwise stages "
                              "eagerly", RuntimeWarning, stacklevel=2)
                self.__dict__["prepare"] = self._prepare_slots
        return self.__dict__["prepare"]

    def _slots_triton(self, x_flat, layout, grouped: bool, plan: ExecutionPlan) -> ScanInputs:
        """The Triton slot stage (``mom_lit.ops.slots.triton_slots``) on this layer's weights, then the gates."""
        # The projections' operands in autocast's dtype, cast once: autocast would keep a copy of x per product, and
        # the grouped product (bf16 only, not covered by autocast) then applies under mixed precision too.
        x_flat = x_flat.to(compute_dtype(x_flat))
        # Rows of a multiple of 16 elements: the slot kernels' loads of a projection row are then aligned and
        # vectorised (rows of 2 K + 2 heads elements are not; 4 x 256 dims: 2056 -> 2064).
        w_stream = self._stream_weights(align=16).to(x_flat.dtype)  # (S, P, D)
        extra = (self.b_proj is not None) + (self.a_proj is not None)
        out = triton_slots(x_flat, self.q_proj.weight.to(x_flat.dtype), w_stream, self.conv_weight.to(x_flat.dtype),
                           layout, self.num_heads, self.head_dim, self.head_v_dim, extra * self.num_heads, grouped,
                           plan.activation_memory, plan.stage_launch)
        from mom_lit.ops.slots.gates import scalar_gates  # Triton is imported only where its kernels run

        gk = None if out.dense is None else self._per_key_gate(out.dense, layout.token, layout.memory)
        g, beta = scalar_gates(out.gates, self.A_log, self.dt_bias, self.num_heads, self.b_proj is not None)
        return ScanInputs(out.q, out.k, out.v, g, gk, beta, None, out.sources)

    def _decode_step(self, x_flat, memory, state: LayerState, plan: ExecutionPlan | None = None):
        """One token per sequence: update only the selected memories (and the shared one), IN PLACE in ``state``.

        x_flat: (B, D); memory: (B, J). Returns (B, J, H, V) slot outputs and ``state`` (its tensors updated).
        O(1) in the context: per-stream projections are plain matrix-vector products over the stacked weights
        (no weight concatenation), and ``mom_lit.ops.decode.decode_step`` does the rest (one Triton kernel on
        CUDA; the torch reference elsewhere and for the per-key gate of ``gla``).
        """
        c = self.config
        plan = plan if plan is not None else self.plans.for_input(x_flat)
        batch, hidden = x_flat.shape

        def per_stream(weight):  # (S, P, D) -> (B, S, P)
            if weight is None:
                return None
            return F.linear(x_flat, weight.reshape(-1, hidden).to(x_flat.dtype)).view(batch, self.num_streams, -1)

        gk = None
        if self.gk_down is not None:  # (B, S, H*K)
            gk = per_key_log_decay(per_stream(self.gk_down), self.gk_up, self.gk_bias, c.gla_gate_normalizer)
        conv_weight = self.conv_weight.to(x_flat.dtype) if self.conv_weight is not None else None
        o = decode_step(self.q_proj(x_flat), per_stream(self.k_proj), per_stream(self.v_proj), memory,
                        state.memory, state.conv, conv_weight, a=per_stream(self.a_proj),
                        b=per_stream(self.b_proj), gk=gk, a_log=self.A_log, dt_bias=self.dt_bias,
                        scale=self.head_dim ** -0.5, backend="triton" if plan.decode == "triton" else "eager")
        return o, state

    def empty_state(self, num_sequences: int, device, dtype=torch.float32) -> LayerState:
        return LayerState.empty(self.config, num_sequences, device, dtype)
