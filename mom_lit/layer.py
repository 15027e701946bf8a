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

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mom_lit.config import MoMConfig
from mom_lit.layout import build_layout, unsort
from mom_lit.norm import GatedRMSNorm, l2_normalize
from mom_lit.ops.scan import scan
from mom_lit.ops.slots import (SlotSourceShare, projected_slot_conv, rebuild_projected_qkv, slot_conv, slot_qkv,
                              varlen_short_conv)
from mom_lit.ops.decode import decode_step
from mom_lit.ops.mix import mix_gated_rms_norm, mix_reference
from mom_lit.plan import ExecutionPlan, PlanCache, compute_dtype
from mom_lit.router import Router, Routing


@dataclass
class LayerState:
    """Recurrent state of one layer for N independent sequences."""

    memory: torch.Tensor
    """(N, S, H, K, V) fp32 matrix memories (S streams: routed memories, then the shared one)."""
    conv: torch.Tensor | None
    """(N, S, W-1, C) last W-1 pre-convolution q|k|v inputs of each stream, or None without convolution."""


@dataclass
class LayerAux:
    routing: Routing | None
    state: LayerState | None


def _projection_input(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype that its matrix products run in: autocast's where autocast is on for x's device, else x's."""
    return x.to(compute_dtype(x)) if x.is_floating_point() else x


def _uses_beta(rule: str) -> bool:
    return rule in ("gated_delta", "delta")


def _uses_scalar_gate(rule: str) -> bool:
    return rule in ("gated_delta", "simple_gla")


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
        self.b_proj = nn.Parameter(torch.empty(streams, c.num_heads, hidden)) if _uses_beta(self.rule) else None
        if _uses_scalar_gate(self.rule):
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

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        std = c.initializer_range
        for w in (self.q_proj.weight, self.k_proj, self.v_proj, self.b_proj, self.a_proj, self.gk_down,
                  self.g_proj.weight if self.g_proj is not None else None,
                  self.router.weight if self.router is not None else None):
            if w is not None:
                nn.init.normal_(w, std=std)
        if self.gk_up is not None:
            nn.init.normal_(self.gk_up, std=1.0 / math.sqrt(c.gla_gate_rank))
        # Residual-branch output: scaled down with depth (GPT-2 style).
        nn.init.normal_(self.o_proj.weight, std=std / math.sqrt(2 * c.num_layers))
        if self.A_log is not None:
            self.A_log.copy_(torch.empty(c.num_heads).uniform_(1, 16).log())
            dt = torch.exp(torch.rand(c.num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        if self.conv_weight is not None:
            bound = 1.0 / math.sqrt(c.conv_size)
            nn.init.uniform_(self.conv_weight, -bound, bound)

    # ---------------------------------------------------------------------------------------------------------
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
        """Gather each slot's pre-convolution q|k|v (L, C) and its gates from the projections of its token.

        Per-stream projections are computed for every stream and then gathered per slot: one matmul, no loop
        over memories, at (S / J) times the projection FLOPs of a grouped matmul over the sorted layout.
        """
        c = self.config
        num_tokens, hidden = x_flat.shape
        w_stream = self._stream_weights()
        per_stream = (x_flat @ w_stream.reshape(-1, hidden).to(x_flat.dtype).t()).view(num_tokens, self.num_streams, -1)
        gk = self._per_key_gate(per_stream, token, memory)
        slot_proj = per_stream[token, memory]  # (L, P)
        k, v, rest = slot_proj.split([c.key_dim, c.value_dim, slot_proj.shape[1] - c.key_dim - c.value_dim], dim=1)
        qkv = torch.cat([self.q_proj(x_flat)[token], k, v], dim=1)  # (L, C)
        g, beta = self._gates(rest)
        return qkv, g, gk, beta

    def _per_key_gate(self, per_stream: torch.Tensor, token: torch.Tensor, memory: torch.Tensor):
        """GLA's low-rank per-key log-gate (L, H, K) of each slot, or None for the other rules."""
        if self.gk_down is None:
            return None
        c = self.config
        # Up-project every stream's rank-R code, then gather (no (L, H*K, R) temporary).
        down = per_stream[..., -c.gla_gate_rank:].float()  # (N_tok, S, R)
        gk_logit = torch.einsum("nsr,skr->nsk", down, self.gk_up.float()) + self.gk_bias.float()
        return (F.logsigmoid(gk_logit) / c.gla_gate_normalizer)[token, memory].view(-1, self.num_heads, self.head_dim)

    def _gates(self, rest: torch.Tensor):
        """Log-decay g and beta (L, H) fp32 from the b | a projection columns of each slot."""
        H = self.num_heads
        beta = g = None
        if self.b_proj is not None:
            beta = torch.sigmoid(rest[:, :H].float())  # (L, H)
        if self.a_proj is not None:
            a = rest[:, H:2 * H] if self.b_proj is not None else rest[:, :H]
            g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # (L, H)
        return g, beta

    def _gates_fused(self, rest: torch.Tensor):
        """:meth:`_gates` by one Triton kernel each way (the slot stage's path)."""
        from mom_lit.ops.slots.gates import scalar_gates

        return scalar_gates(rest, self.A_log, self.dt_bias, self.num_heads, self.b_proj is not None)

    def _split_qkv(self, qkv: torch.Tensor):
        c, H, K, V = self.config, self.num_heads, self.head_dim, self.head_v_dim
        q, k, v = qkv.split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
        lead = qkv.shape[:-1]
        return (l2_normalize(q.reshape(*lead, H, K)), l2_normalize(k.reshape(*lead, H, K)), v.reshape(*lead, H, V))

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
        routing, memory, weight = self._route(x_flat)
        gate = self.g_proj(x_flat).view(-1, H, V) if self.g_proj is not None else None
        if seq_len == 1 and state is not None and num_sequences == batch and use_cache:  # in-place step
            o, new_state = self._decode_step(x_flat, memory, state, plan)
            mixed = self._mix_reference(o, weight, gate)
        else:
            o, layout, new_state = self._scan_sorted(x_flat, memory, seq_id, num_sequences, state, use_cache, plan)
            if plan.mix == "triton":
                mixed = mix_gated_rms_norm(o, layout.rank, weight, gate, self.o_norm.weight, self.o_norm.eps,
                                           launch=plan.stage_launch)
            else:
                mixed = self._mix_reference(unsort(o, layout).view(x_flat.shape[0], -1, H, V), weight, gate)
        out = self.o_proj(mixed.reshape(batch, seq_len, H * V))
        return out, LayerAux(routing=routing, state=new_state if use_cache else None)

    def _mix_reference(self, o: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """(N_tok, J, H, V) slot outputs -> (N_tok, H, V): routing-weighted sum, then the gated RMSNorm."""
        return mix_reference(o, weight, gate, self.o_norm)

    def _scan_segments(self, x_flat, memory, seq_id, num_sequences, state, use_cache, plan=None):
        """All (memory, sequence) segments through one varlen scan. Returns (N_tok, J, H, V) slot outputs."""
        plan = plan if plan is not None else self.plans.for_input(x_flat)
        o, layout, new_state = self._scan_sorted(x_flat, memory, seq_id, num_sequences, state, use_cache, plan)
        return unsort(o, layout).view(x_flat.shape[0], -1, self.num_heads, self.head_v_dim), new_state

    def _scan_sorted(self, x_flat, memory, seq_id, num_sequences, state, use_cache, plan: ExecutionPlan):
        """The scan of :meth:`_scan_segments`; returns the segment-sorted (L, H, V) slot outputs and the layout."""
        H, K, V, S = self.num_heads, self.head_dim, self.head_v_dim, self.num_streams
        layout = build_layout(memory, seq_id, num_sequences, S)
        conv_init = None
        if state is not None and state.conv is not None:
            conv_init = state.conv.transpose(0, 1).reshape(S * num_sequences, *state.conv.shape[2:])
        rebuild_qkv = None
        slots = plan.slots if conv_init is None and not use_cache else plan.cached_slots
        if slots in ("grouped", "gathered"):
            q, k, v, g, gk, beta, rebuild_qkv = self._prepare_slots_triton(x_flat, layout, slots == "grouped", plan)
            conv_final = None
        else:
            prepare = self._compiled_prepare_slots() if slots == "compiled" else self._prepare_slots
            q, k, v, g, gk, beta, conv_final = prepare(x_flat, layout.token, layout.memory, layout.segment,
                                                       layout.position, layout.cu_seqlens, conv_init, use_cache,
                                                       slots == "compiled")
        initial = state.memory.transpose(0, 1).reshape(S * num_sequences, H, K, V) if state is not None else None
        triton = {}
        if plan.scan == "triton":
            triton = dict(rebuild_qkv=rebuild_qkv, recompute=plan.scan_recompute, launch=plan.scan_launch)
        o, final = scan(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
            g=None if g is None else g.unsqueeze(0),
            gk=None if gk is None else gk.unsqueeze(0),
            beta=None if beta is None else beta.unsqueeze(0),
            scale=K ** -0.5,
            initial_state=initial,
            cu_seqlens=layout.cu_seqlens,
            output_final_state=use_cache,
            backend=plan.scan_backend,
            chunk_size=plan.chunk_size,
            **triton,
        )
        new_state = None
        if use_cache:
            new_state = LayerState(
                memory=final.view(S, num_sequences, H, K, V).transpose(0, 1),
                conv=None if conv_final is None else conv_final.view(S, num_sequences, *conv_final.shape[1:]).transpose(0, 1),
            )
        return o.squeeze(0), layout, new_state

    def _prepare_slots(self, x_flat, token, memory, segment, position, cu_seqlens, conv_init, use_cache, shifted):
        """Projections, short convolution, normalisation and gates of every sorted slot: the scan's inputs."""
        qkv, g, gk, beta = self._slot_inputs(x_flat, token, memory)
        conv_final = None
        if self.conv_weight is not None:
            qkv, conv_final = varlen_short_conv(qkv, self.conv_weight.to(qkv.dtype), segment, position, cu_seqlens,
                                                conv_init, output_final_state=use_cache, shifted=shifted)
        else:
            qkv = F.silu(qkv)
        q, k, v = self._split_qkv(qkv)
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

    def _prepare_slots_triton(self, x_flat, layout, grouped: bool, plan: ExecutionPlan):
        """The scan's inputs from the projections in one Triton pass per q/k/v: no gathered (L, C) copies, and a
        backward that recomputes the convolution instead of keeping its inputs (``ops.slots.slot_conv``). Also
        returns the scan's ``rebuild_qkv`` (None with ``activation_memory="fast"``). ``grouped``: each slot is
        projected for its own memory only (``ops.slots.projected_slot_conv``); with ``lean`` the backward recomputes
        those projections instead of keeping them, with ``balanced`` the scan rebuilds q, k, v from the kept ones."""
        H, K, S = self.num_heads, self.head_dim, self.num_streams
        num_tokens, hidden = x_flat.shape
        launch = plan.stage_launch
        # The projections' operands in autocast's dtype, cast once: autocast would keep a copy of x per product, and
        # the grouped product (bf16 only, not covered by autocast) then applies under mixed precision too.
        x_flat = _projection_input(x_flat)
        # Rows of a multiple of 16 elements: the slot kernels' loads of a projection row are then aligned and
        # vectorised (rows of 2 K + 2 heads elements are not; 4 x 256 dims: 2056 -> 2064).
        w_stream = self._stream_weights(align=16).to(x_flat.dtype)  # (S, P, D)
        gk = None
        extra = (self.b_proj is not None) + (self.a_proj is not None)
        weight = self.conv_weight.to(x_flat.dtype).contiguous()
        dims = dict(heads=H, key_dim=K, value_dim=self.head_v_dim, launch=launch)
        activation_memory = plan.activation_memory
        if grouped:
            ends = layout.cu_seqlens[layout.num_sequences::layout.num_sequences].to(torch.int32)  # (S,) group ends
            q_weight = self.q_proj.weight.to(x_flat.dtype)
            sources = (x_flat, q_weight, w_stream, weight, layout.token, ends, layout.position)
            # lean keeps no projection (the backward rebuilds them once, for scan and stage through ``share``);
            # balanced has the scan keep the slot stage's own kept projections instead of q, k, v
            lean, balanced = activation_memory == "lean", activation_memory == "balanced"
            share = SlotSourceShare() if lean else None
            q, k, v, rest, *kept = projected_slot_conv(*sources, layout.rank, share, H, K, self.head_v_dim, extra * H,
                                                       keep=not lean, expose=balanced, launch=launch)
            rebuild_qkv = None
            if lean:
                rebuild_qkv = (functools.partial(rebuild_projected_qkv, share=share, **dims), sources)
            elif balanced:  # kept = (q_src, kv_src)
                rebuild_qkv = (functools.partial(slot_qkv, **dims),
                               (*kept, weight, layout.token, None, layout.position))
            g, beta = self._gates_fused(rest)
            return q, k, v, g, gk, beta, rebuild_qkv
        kv_src = x_flat @ w_stream.reshape(-1, hidden).t()  # (N_tok, S * P)
        gk = self._per_key_gate(kv_src.view(num_tokens, S, -1), layout.token, layout.memory)
        kv_src = kv_src.view(num_tokens * S, -1)  # (N_tok * S, P): row t * S + s
        kv_rows = layout.token * S + layout.memory
        q_src = self.q_proj(x_flat)
        q, k, v, rest = slot_conv(q_src, kv_src, weight, layout.token, kv_rows, layout.position, layout.rank, H, K,
                                  self.head_v_dim, extra * H, launch=launch)
        g, beta = self._gates_fused(rest)
        rebuild_qkv = None
        if activation_memory != "fast":  # slot_conv keeps these for its own backward anyway
            rebuild_qkv = (functools.partial(slot_qkv, **dims),
                           (q_src, kv_src, weight, layout.token, kv_rows, layout.position))
        return q, k, v, g, gk, beta, rebuild_qkv

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
        if self.gk_down is not None:
            down = per_stream(self.gk_down).float()  # (B, S, R)
            gk = F.logsigmoid(torch.einsum("bsr,skr->bsk", down, self.gk_up.float()) + self.gk_bias.float())
            gk = gk / c.gla_gate_normalizer  # (B, S, H*K)
        conv_weight = self.conv_weight.to(x_flat.dtype) if self.conv_weight is not None else None
        o = decode_step(self.q_proj(x_flat), per_stream(self.k_proj), per_stream(self.v_proj), memory,
                        state.memory, state.conv, conv_weight, a=per_stream(self.a_proj),
                        b=per_stream(self.b_proj), gk=gk, a_log=self.A_log, dt_bias=self.dt_bias,
                        scale=self.head_dim ** -0.5, backend="triton" if plan.decode == "triton" else "eager")
        return o, state

    def empty_state(self, num_sequences: int, device, dtype=torch.float32) -> LayerState:
        S, H, K, V = self.num_streams, self.num_heads, self.head_dim, self.head_v_dim
        conv = None
        if self.conv_weight is not None:
            conv = torch.zeros(num_sequences, S, self.config.conv_size - 1, self.conv_channels, device=device, dtype=dtype)
        return LayerState(memory=torch.zeros(num_sequences, S, H, K, V, device=device, dtype=torch.float32), conv=conv)
