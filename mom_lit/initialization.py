"""Initial weights of the MoM model: normal projections of std ``initializer_range``, residual-branch outputs
scaled down with depth (GPT-2 style), Mamba-style scalar-gate parameters, uniform short-convolution taps."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["init_layer", "init_model"]


@torch.no_grad()
def init_layer(layer) -> None:
    """(Re)initialise every parameter of a :class:`mom_lit.layer.MoMLayer` in place."""
    c = layer.config
    std = c.initializer_range
    for w in (layer.q_proj.weight, layer.k_proj, layer.v_proj, layer.b_proj, layer.a_proj, layer.gk_down,
              layer.g_proj.weight if layer.g_proj is not None else None,
              layer.router.weight if layer.router is not None else None):
        if w is not None:
            nn.init.normal_(w, std=std)
    if layer.gk_up is not None:
        nn.init.normal_(layer.gk_up, std=1.0 / math.sqrt(c.gla_gate_rank))
    # Residual-branch output: scaled down with depth (GPT-2 style).
    nn.init.normal_(layer.o_proj.weight, std=std / math.sqrt(2 * c.num_layers))
    if layer.A_log is not None:
        layer.A_log.copy_(torch.empty(c.num_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(c.num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        layer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    if layer.conv_weight is not None:
        bound = 1.0 / math.sqrt(c.conv_size)
        nn.init.uniform_(layer.conv_weight, -bound, bound)


@torch.no_grad()
def init_model(model) -> None:
    """(Re)initialise every parameter of a :class:`mom_lit.model.MoMForCausalLM` in place, layer by layer."""
    std = model.config.initializer_range
    nn.init.normal_(model.embed.weight, std=std)
    nn.init.normal_(model.lm_head.weight, std=std)
    for block in model.blocks:
        nn.init.normal_(block.mlp.gate_up.weight, std=std)
        nn.init.normal_(block.mlp.down.weight, std=std / math.sqrt(2 * model.config.num_layers))
        block.attn.reset_parameters()
