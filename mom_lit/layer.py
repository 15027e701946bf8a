"""The Mixture-of-Memories layer.

Per token: the router picks ``topk`` of E memories with renormalised weights; each picked memory m, and the
always-active shared memory, gets its own key/value (and gate/beta) projections and a short convolution over its
own token stream; the memories are updated by the configured linear recurrence; the output is
``sum_j w_j o^(m_j) + o_shared``, then a per-head RMSNorm gated by ``swish(W_g2 x)`` and an output projection.

All (memory, sequence) segments of the batch go through ONE varlen scan (see ``layout.py``). Memories that a
token did not select never see it, in training and in decoding alike.

Next to the Triton scan (CUDA), the stages around it run as Triton kernels too (``ops/layer_triton.py``): the slot
stage reads each slot's inputs in place from the projections and convolves/normalises them in one pass, the mix
stage reads each token's slot outputs in place from the sorted scan output and applies the weighted sum and the
gated norm in one pass; both backwards recompute instead of keeping gathered copies and never scatter-add. The
plain-torch stages remain the reference (CPU, float64, prefill with a conv cache) and the tests' oracle.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mom_lit.config import MoMConfig
from mom_lit.layout import build_layout, unsort
from mom_lit.norm import GatedRMSNorm, l2_normalize, mix_gated_rms_norm
from mom_lit.ops import scan
from mom_lit.ops.conv import (SlotSourceShare, projected_slot_conv, rebuild_projected_qkv, slot_conv, slot_qkv,
                              varlen_short_conv)
from mom_lit.ops.grouped import grouped_mm_available
from mom_lit.ops.decode import decode_step
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


_FUSION = {"disabled": False}
# The Triton slot and mix stages (``mom_lit.ops.layer_triton``) run on CUDA next to the Triton scan: on an H100
# they passed the layer-against-reference tests (fp32 and bf16, all gradients) and cut the layer's fwd+bwd at
# 8x2048 from 15.7 to 11.6 ms and its peak memory from 4.1 to 2.8 GiB (BENCHMARKS.md). ``MOM_LIT_SLOT_KERNELS=0``
# falls back to the compiled reference stages. ``allow_cpu`` lets tests run them on CPU under TRITON_INTERPRET=1.
_SLOT_KERNELS = {"disabled": os.environ.get("MOM_LIT_SLOT_KERNELS", "1") == "0", "allow_cpu": False}
_SLOT_KERNELS_PROBED: set[tuple] = set()
PROJECTIONS = "auto"
"""How the Triton path projects the per-stream k, v and gates: ``"auto"`` only the streams each token selected (a
grouped product over the memory-sorted slots, J per token) wherever that applies (bf16 on a GPU with torch's
grouped kernels, sm90 / sm100; a token skipping some stream; no per-key gate: see
``MoMLayer._grouped_projection_applies``), ``"dense"`` every stream for every token (one matrix product, S streams
per token; for measurements)."""
_PROJECTIONS = ("auto", "dense")
logger = logging.getLogger("mom_lit")


def _projection_input(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype that its matrix products run in: autocast's where autocast is on for x's device, else x's."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return x.to(torch.get_autocast_dtype(kind))
    return x


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


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
        # Whether the elementwise stages around the scan may run as a torch.compile'd function on CUDA. Off under
        # FSDP, whose parameters are views of a flat parameter that dynamo cannot trace (also while checkpointed
        # blocks are recomputed in the backward); MoMLightningModule turns it off for its FSDP strategy, code that
        # wraps the model in FSDP itself must do the same.
        self.compile_stages = True
        self.reset_parameters()

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
        from mom_lit.ops.layer_triton import scalar_gates

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
    ) -> tuple[torch.Tensor, LayerAux]:
        """x: (B, T, D); seq_id: (B*T,) independent-sequence id of each token (rows or packed documents)."""
        batch, seq_len, hidden = x.shape
        H, V = self.num_heads, self.head_v_dim
        x_flat = x.reshape(batch * seq_len, hidden)  # (N_tok, D)
        routing, memory, weight = self._route(x_flat)
        gate = self.g_proj(x_flat).view(-1, H, V) if self.g_proj is not None else None
        mixed = None
        if seq_len == 1 and state is not None and num_sequences == batch and use_cache:  # in-place step
            o, new_state = self._decode_step(x_flat, memory, state)
        else:
            o, layout, new_state = self._scan_sorted(x_flat, memory, seq_id, num_sequences, state, use_cache)
            if self._mix_kernel_applies(o):
                mixed = mix_gated_rms_norm(o, layout.rank, weight, gate, self.o_norm.weight, self.o_norm.eps)
            else:
                o = unsort(o, layout).view(x_flat.shape[0], -1, H, V)  # (N_tok, J, H, V)
        if mixed is None:
            o = (o * weight.to(o.dtype)[:, :, None, None]).sum(1)  # (N_tok, J, H, V) -> (N_tok, H, V)
            mixed = self.o_norm(o, gate)
        out = self.o_proj(mixed.reshape(batch, seq_len, H * V))
        return out, LayerAux(routing=routing, state=new_state if use_cache else None)

    def _mix_kernel_applies(self, o: torch.Tensor) -> bool:
        """The Triton mix stage (weighted sum of the slots, gated RMSNorm) runs next to the Triton scan."""
        return ((o.is_cuda or _SLOT_KERNELS["allow_cpu"])
                and self.config.backend in ("auto", "triton") and o.dtype != torch.float64
                and self._layer_kernels_build(o.device, o.dtype))

    def _layer_kernels_build(self, device, dtype) -> bool:
        """Run the slot and mix kernels once, forward and backward, on a few tokens of this layer's dims. A Triton
        installation that cannot build them turns both stages off with one warning (the reference path stays).
        The choice is logged once (per device, dtype and dims when the kernels run)."""
        H, K, V, S = self.num_heads, self.head_dim, self.head_v_dim, self.num_streams
        width = self.conv_weight.shape[1] if self.conv_weight is not None else 0
        key = (str(device), dtype, H, K, V, S, width, self.g_proj is not None)
        if _SLOT_KERNELS["disabled"]:
            if not _SLOT_KERNELS.get("logged"):
                _SLOT_KERNELS["logged"] = True
                logger.info("MoM layer stages around the scan: the reference stages (Triton slot/mix kernels off)")
            return False
        if key in _SLOT_KERNELS_PROBED:
            return True
        _SLOT_KERNELS_PROBED.add(key)
        try:
            from mom_lit.ops.layer_triton import scalar_gates

            # Identity saved-tensor hooks shadow any outer ones: when the first forward runs inside an activation
            # checkpoint, the probe's tensors must not be recorded as the block's, or the recompute (which skips
            # the probe) would not match the original forward.
            with torch.inference_mode(False), torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
                gen = torch.Generator(device).manual_seed(0)  # leaves the global random streams alone

                def rand(*shape):
                    return torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_()

                num_tokens = 5
                memory = torch.arange(num_tokens, device=device).remainder(S).unsqueeze(1)  # (N_tok, 1)
                seq_id = torch.zeros(num_tokens, dtype=torch.int64, device=device)
                layout = build_layout(memory, seq_id, 1, S)
                outs = []
                if width:
                    inputs = [rand(num_tokens, H * K), rand(num_tokens * S, H * (K + V + 1)),
                              rand(H * (2 * K + V), width)]
                    outs += slot_conv(*inputs, layout.token, layout.token * S + layout.memory, layout.position,
                                      layout.rank, H, K, V, H)
                    decay, has_beta = self.a_proj is not None, self.b_proj is not None
                    # the probe's own gate parameters, not the layer's
                    gates = scalar_gates(rand(num_tokens * S, (decay + has_beta) * H), rand(H) if decay else None,
                                         rand(H) if decay else None, H, has_beta)
                    outs += [t for t in gates if t is not None]
                o = rand(num_tokens, H, V)
                gate = rand(num_tokens, H, V) if self.g_proj is not None else None
                outs.append(mix_gated_rms_norm(o, layout.rank, torch.ones(num_tokens, 1, device=device), gate,
                                               torch.ones(V, device=device, dtype=dtype), 1e-5))
                torch.autograd.backward([t.float().sum() for t in outs])
        except Exception as error:  # noqa: BLE001 - any build or launch failure keeps the reference path
            _SLOT_KERNELS["disabled"] = True
            warnings.warn(f"the Triton slot/mix kernels of the MoM layer failed to run ({type(error).__name__}: "
                          f"{error}); using the reference stages", RuntimeWarning, stacklevel=3)
            return False
        logger.info("MoM layer stages around the scan: Triton slot/mix kernels (%s, %s, %d heads x %d/%d)",
                    device, str(dtype).removeprefix("torch."), H, K, V)
        return True

    def _scan_segments(self, x_flat, memory, seq_id, num_sequences, state, use_cache):
        """All (memory, sequence) segments through one varlen scan. Returns (N_tok, J, H, V) slot outputs."""
        o, layout, new_state = self._scan_sorted(x_flat, memory, seq_id, num_sequences, state, use_cache)
        return unsort(o, layout).view(x_flat.shape[0], -1, self.num_heads, self.head_v_dim), new_state

    def _scan_sorted(self, x_flat, memory, seq_id, num_sequences, state, use_cache):
        """The scan of :meth:`_scan_segments`; returns the segment-sorted (L, H, V) slot outputs and the layout."""
        c = self.config
        H, K, V, S = self.num_heads, self.head_dim, self.head_v_dim, self.num_streams
        layout = build_layout(memory, seq_id, num_sequences, S)
        conv_init = None
        if state is not None and state.conv is not None:
            conv_init = state.conv.transpose(0, 1).reshape(S * num_sequences, *state.conv.shape[2:])
        rebuild_qkv = None
        if self._slot_kernels_apply(x_flat, conv_init, use_cache):
            q, k, v, g, gk, beta, rebuild_qkv = self._prepare_slots_triton(x_flat, layout)
            conv_final = None
        else:
            fused = self._fused_stages(x_flat)
            prepare = fused if fused is not None else self._prepare_slots
            q, k, v, g, gk, beta, conv_final = prepare(x_flat, layout.token, layout.memory, layout.segment,
                                                       layout.position, layout.cu_seqlens, conv_init, use_cache,
                                                       fused is not None)
        initial = state.memory.transpose(0, 1).reshape(S * num_sequences, H, K, V) if state is not None else None
        o, final = scan(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
            g=None if g is None else g.unsqueeze(0),
            gk=None if gk is None else gk.unsqueeze(0),
            beta=None if beta is None else beta.unsqueeze(0),
            scale=K ** -0.5,
            initial_state=initial,
            cu_seqlens=layout.cu_seqlens,
            output_final_state=use_cache,
            backend=c.backend,
            chunk_size=c.chunk_size,
            rebuild_qkv=rebuild_qkv,
            recompute="wy" if c.activation_memory in ("lean", "balanced") else None,
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

    def _slot_kernels_apply(self, x_flat, conv_init, use_cache) -> bool:
        """The Triton slot stage covers a training-style forward: a short convolution, no cached conv state in or
        out, next to the Triton scan."""
        return ((x_flat.is_cuda or _SLOT_KERNELS["allow_cpu"])
                and self.config.backend in ("auto", "triton") and self.conv_weight is not None
                and conv_init is None and not use_cache and x_flat.dtype != torch.float64
                and self._layer_kernels_build(x_flat.device, x_flat.dtype))

    def _prepare_slots_triton(self, x_flat, layout):
        """The scan's inputs from the projections in one Triton pass per q/k/v: no gathered (L, C) copies, and a
        backward that recomputes the convolution instead of keeping its inputs (``ops.conv.slot_conv``). Also
        returns the scan's ``rebuild_qkv`` (None with ``activation_memory="fast"``). Where the grouped product
        applies, each slot is projected for its own memory only (``ops.conv.projected_slot_conv``); with ``lean``
        the backward recomputes those projections instead of keeping them, with ``balanced`` the scan rebuilds q, k,
        v from the kept ones."""
        H, K, S = self.num_heads, self.head_dim, self.num_streams
        num_tokens, hidden = x_flat.shape
        # The projections' operands in autocast's dtype, cast once: autocast would keep a copy of x per product, and
        # the grouped product (bf16 only, not covered by autocast) then applies under mixed precision too.
        x_flat = _projection_input(x_flat)
        # Rows of a multiple of 16 elements: the slot kernels' loads of a projection row are then aligned and
        # vectorised (rows of 2 K + 2 heads elements are not; 4 x 256 dims: 2056 -> 2064).
        w_stream = self._stream_weights(align=16).to(x_flat.dtype)  # (S, P, D)
        gk = None
        slots = layout.rank.numel() // max(num_tokens, 1)  # J per token
        extra = (self.b_proj is not None) + (self.a_proj is not None)
        weight = self.conv_weight.to(x_flat.dtype).contiguous()
        dims = dict(heads=H, key_dim=K, value_dim=self.head_v_dim)
        activation_memory = self.config.activation_memory
        if self._grouped_projection_applies(x_flat, w_stream.shape[1], slots):
            ends = layout.cu_seqlens[layout.num_sequences::layout.num_sequences].to(torch.int32)  # (S,) group ends
            q_weight = self.q_proj.weight.to(x_flat.dtype)
            sources = (x_flat, q_weight, w_stream, weight, layout.token, ends, layout.position)
            # lean keeps no projection (the backward rebuilds them once, for scan and stage through ``share``);
            # balanced has the scan keep the slot stage's own kept projections instead of q, k, v
            lean, balanced = activation_memory == "lean", activation_memory == "balanced"
            share = SlotSourceShare() if lean else None
            q, k, v, rest, *kept = projected_slot_conv(*sources, layout.rank, share, H, K, self.head_v_dim, extra * H,
                                                       keep=not lean, expose=balanced)
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
                                  self.head_v_dim, extra * H)
        g, beta = self._gates_fused(rest)
        rebuild_qkv = None
        if activation_memory != "fast":  # slot_conv keeps these for its own backward anyway
            rebuild_qkv = (functools.partial(slot_qkv, **dims),
                           (q_src, kv_src, weight, layout.token, kv_rows, layout.position))
        return q, k, v, g, gk, beta, rebuild_qkv

    def _grouped_projection_applies(self, x_flat, out_features: int, slots: int) -> bool:
        """Project the sorted slots by one grouped product (J per token) rather than every stream for every token
        (S per token) wherever a token skips some stream (S > J). At E = 4, top-2 + shared (S / J = 5 / 3) on an
        H200 it took the 12-layer bf16 step from 116.7 to 114.5 ms (graphed) and its memory from 18.4 to 16.9 GiB,
        the layer from 8.13 to 7.92 ms (BENCHMARKS.md). With ``activation_memory="lean"`` the backward recomputes
        these J projections instead of keeping them. ``PROJECTIONS="dense"`` turns it off."""
        if PROJECTIONS not in _PROJECTIONS:
            raise ValueError(f"mom_lit.layer.PROJECTIONS must be one of {_PROJECTIONS}, got {PROJECTIONS!r}")
        return (PROJECTIONS == "auto" and self.gk_down is None and self.num_streams > slots
                and grouped_mm_available(x_flat, out_features))

    def _fused_stages(self, x_flat):
        """On CUDA next to the Triton scan, the elementwise work around it (gathers, convolution, norms, gates)
        runs as a ``torch.compile``d function, so that it costs a few fused kernels instead of dozens of passes
        over the (slots x channels) activations. None where that does not apply or compilation is unavailable."""
        if (not x_flat.is_cuda or not self.compile_stages or self.config.backend not in ("auto", "triton")
                or _FUSION["disabled"]):
            return None
        if "prepare" not in self.__dict__:
            try:
                self.__dict__["prepare"] = torch.compile(self._prepare_slots)
            except Exception as error:  # pragma: no cover - depends on the installation
                _FUSION["disabled"] = True
                warnings.warn(f"torch.compile is unavailable ({error}); the MoM layer runs its elementwise stages "
                              "eagerly", RuntimeWarning, stacklevel=2)
                return None
        return self.__dict__["prepare"]

    def _decode_step(self, x_flat, memory, state: LayerState):
        """One token per sequence: update only the selected memories (and the shared one), IN PLACE in ``state``.

        x_flat: (B, D); memory: (B, J). Returns (B, J, H, V) slot outputs and ``state`` (its tensors updated).
        O(1) in the context: per-stream projections are plain matrix-vector products over the stacked weights
        (no weight concatenation), and ``mom_lit.ops.decode.decode_step`` does the rest (one Triton kernel on
        CUDA; the torch reference elsewhere and for the per-key gate of ``gla``).
        """
        c = self.config
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
                        scale=self.head_dim ** -0.5, backend=c.backend)
        return o, state

    def empty_state(self, num_sequences: int, device, dtype=torch.float32) -> LayerState:
        S, H, K, V = self.num_streams, self.num_heads, self.head_dim, self.head_v_dim
        conv = None
        if self.conv_weight is not None:
            conv = torch.zeros(num_sequences, S, self.config.conv_size - 1, self.conv_channels, device=device, dtype=dtype)
        return LayerState(memory=torch.zeros(num_sequences, S, H, K, V, device=device, dtype=torch.float32), conv=conv)
