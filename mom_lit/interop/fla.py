"""Checkpoints of flash-linear-attention (fla): ``MomForCausalLM`` and ``GatedDeltaNetForCausalLM``.

An fla checkpoint is a Hugging Face directory: ``config.json`` (``model_type`` ``"mom"`` or ``"gated_deltanet"``)
and ``model.safetensors`` (or shards with an index). The layout, as of fla 0.6.0:

=========================================  ======================================================================
fla                                        mom_lit
=========================================  ======================================================================
``model.embeddings.weight``                ``embed.weight``
``model.layers.{i}.attn_norm.weight``      ``blocks.{i}.attn_norm.weight`` (also ``mlp_norm``)
``...attn.gate.weight`` (E, D)             ``blocks.{i}.attn.router.weight`` (absent when E = 1)
``...attn.{k,v,b,a}_proj.{m}.weight``      row m of the stacked ``blocks.{i}.attn.{k,v,b,a}_proj`` (S, P, D)
``...attn.shared_{k,v,b,a}.weight``        row S-1 (the shared memory) of the same stacks
``...attn.{k,v,b,a}_proj.weight`` (GDN)    row 0 of the stacks (one memory, no router, no shared memory)
``...attn.{q,k,v}_conv1d.weight`` (P,1,W)  ``blocks.{i}.attn.conv_weight`` (C, W), channels q | k | v
``...mlp.gate_proj``, ``...mlp.up_proj``   ``blocks.{i}.mlp.gate_up.weight`` = cat(gate, up) (2I, D)
``...mlp.down_proj.weight``                ``blocks.{i}.mlp.down.weight``
``model.norm.weight``, ``lm_head.weight``  ``norm.weight``, ``lm_head.weight`` (absent when tied)
=========================================  ======================================================================

``q_proj``, ``A_log``, ``dt_bias``, ``g_proj``, ``o_norm`` and ``o_proj`` keep their names. Both convolutions put
the current input in the last tap, so the filters copy over unchanged.

Numerics in inference mode agree with fla: the short convolution of each memory restarts at the memory's first
token (fla does so in inference; its training path runs it across memory boundaries), every RMSNorm of fla 0.6.0
(block, final and the per-head output norm) takes the one ``norm_eps`` of the config, q/k are L2-normalised with
eps 1e-6 and the gate is ``-exp(A_log) * softplus(a + dt_bias)``. One known departure is fla's own: its MoM
prefill groups tokens by memory with ``argsort``, which does not promise to keep time order inside a memory;
where the sort reorders them (the CPU sort does), fla's output is not the time-ordered recurrence that mom_lit
computes. With a stable sort the two agree to float32 rounding, in fla's chunked and fused-recurrent prefill and in
decoding alike (``tools/verify_fla_interop.py`` shows both; ``--device cpu`` runs fla's layer code on plain-torch
stand-ins for its kernels).

fla options without a mom_lit equivalent are refused with a ``ValueError``: hybrid attention layers (``attn``),
attention residuals (``attnres_block_size``), ``single_kv_proj``, ``allow_neg_eigval``, grouped value heads
(``num_v_heads``), a sigmoid output gate and MLP activations other than swish.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from mom_lit.config import MoMConfig
from mom_lit.interop.io import (build_model, read_json, read_safetensors_dir, require_directory,
                                save_safetensors)
from mom_lit.model import MoMForCausalLM

__all__ = ["FLA_GDN", "FLA_MODEL_TYPES", "FLA_MOM", "config_from_fla", "config_to_fla", "fla_model_type_for",
           "load_fla", "save_fla", "state_dict_from_fla", "state_dict_to_fla"]

FLA_MOM = "mom"
FLA_GDN = "gated_deltanet"
FLA_MODEL_TYPES = (FLA_MOM, FLA_GDN)
_ARCHITECTURES = {FLA_MOM: "MomForCausalLM", FLA_GDN: "GatedDeltaNetForCausalLM"}

# fla's constructor defaults: Hugging Face writes only the fields that differ from them into config.json.
_COMMON_DEFAULTS = dict(hidden_size=2048, conv_size=4, head_dim=256, use_short_conv=True, hidden_ratio=4,
                        intermediate_size=None, hidden_act="swish", norm_eps=1e-6, attn=None,
                        tie_word_embeddings=False, initializer_range=0.02, vocab_size=32000,
                        attnres_block_size=None)
_DEFAULTS = {
    FLA_MOM: dict(_COMMON_DEFAULTS, num_heads=4, expand_v=1.0, use_output_gate=True, num_hidden_layers=24,
                  num_memories=4, topk=2, shared_mem=True, single_kv_proj=False, mom_backend="gated_deltanet",
                  aux_loss_scale=0.01),
    FLA_GDN: dict(_COMMON_DEFAULTS, num_heads=6, expand_v=2.0, use_gate=True, num_hidden_layers=21,
                  num_v_heads=None, allow_neg_eigval=False, output_gate_activation="swish"),
}
_MLP_MULTIPLE = 256  # fla rounds a derived MLP width up to a multiple of 256
_STACKED = ("k_proj", "v_proj", "b_proj", "a_proj")  # per-memory projections; fla's shared ones: shared_{k,v,b,a}
_SAME_NAME = ("attn_norm.weight", "mlp_norm.weight", "attn.q_proj.weight", "attn.A_log", "attn.dt_bias",
              "attn.o_norm.weight", "attn.o_proj.weight")


# Configuration --------------------------------------------------------------------------------------------------
def _fla_intermediate_size(values: Mapping) -> int:
    if values["intermediate_size"] is not None:
        return int(values["intermediate_size"])
    ratio = 4 if values["hidden_ratio"] is None else values["hidden_ratio"]
    width = int(values["hidden_size"] * ratio * 2 / 3)
    return _MLP_MULTIPLE * math.ceil(width / _MLP_MULTIPLE)


def _resolve(fla_config: Mapping) -> tuple[str, dict]:
    model_type = fla_config.get("model_type")
    if model_type not in FLA_MODEL_TYPES:
        raise ValueError(f"fla config model_type must be one of {FLA_MODEL_TYPES}, got {model_type!r}")
    return model_type, {**_DEFAULTS[model_type], **fla_config}


def _check_supported(model_type: str, c: Mapping) -> None:
    def refuse(what: str) -> None:
        raise ValueError(f"fla {model_type} checkpoint with {what} has no mom_lit equivalent")

    if c["attn"] is not None:
        refuse(f"hybrid attention layers (attn={c['attn']!r})")
    if c["attnres_block_size"] is not None:
        refuse(f"attention residuals (attnres_block_size={c['attnres_block_size']!r})")
    if c["hidden_act"] != "swish":
        refuse(f"hidden_act={c['hidden_act']!r} (only the swish MLP)")
    if c["use_short_conv"] and (not isinstance(c["conv_size"], int) or c["conv_size"] < 1):
        refuse(f"use_short_conv=True and conv_size={c['conv_size']!r}")
    if model_type == FLA_MOM:
        if c["single_kv_proj"]:
            refuse("single_kv_proj=True (one k/v projection for all memories)")
        if c["mom_backend"] != "gated_deltanet":
            refuse(f"mom_backend={c['mom_backend']!r}")
        if not c["use_short_conv"]:
            refuse("use_short_conv=False (fla's MoM layer cannot be built without its short convolution)")
    else:
        if c["allow_neg_eigval"]:
            refuse("allow_neg_eigval=True")
        if c["num_v_heads"] not in (None, c["num_heads"]):
            refuse(f"num_v_heads={c['num_v_heads']} != num_heads={c['num_heads']} (grouped value heads)")
        if c["output_gate_activation"] not in ("swish", "silu"):
            refuse(f"output_gate_activation={c['output_gate_activation']!r}")


def config_from_fla(fla_config: Mapping) -> MoMConfig:
    """The :class:`MoMConfig` of an fla ``config.json`` dict (fla's defaults fill absent fields)."""
    model_type, c = _resolve(fla_config)
    _check_supported(model_type, c)
    if model_type == FLA_MOM:
        memories = dict(num_memories=c["num_memories"], topk=c["topk"], shared_memory=bool(c["shared_mem"]),
                        use_output_gate=bool(c["use_output_gate"]), aux_loss_coef=float(c["aux_loss_scale"]))
    else:
        memories = dict(num_memories=1, topk=1, shared_memory=False, use_output_gate=bool(c["use_gate"]))
    return MoMConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_heads"], head_dim=c["head_dim"], expand_v=float(c["expand_v"]),
        intermediate_size=_fla_intermediate_size(c), update_rule="gated_delta",
        conv_size=c["conv_size"] if c["use_short_conv"] else 0, norm_eps=float(c["norm_eps"]),
        tie_embeddings=bool(c["tie_word_embeddings"]), initializer_range=float(c["initializer_range"]),
        **memories)


def fla_model_type_for(config: MoMConfig) -> str:
    """``"gated_deltanet"`` for a single-memory config (one memory, no router, no shared memory), else ``"mom"``."""
    single = config.num_memories == 1 and config.topk == 1 and not config.shared_memory
    return FLA_GDN if single else FLA_MOM


def config_to_fla(config: MoMConfig, model_type: str | None = None) -> dict:
    """fla's ``config.json`` dict for ``config``; ``model_type`` defaults to :func:`fla_model_type_for`."""
    model_type = fla_model_type_for(config) if model_type is None else model_type
    if model_type not in FLA_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {FLA_MODEL_TYPES}, got {model_type!r}")
    if config.update_rule != "gated_delta":
        raise ValueError(f"fla's {model_type} models use the gated delta rule; config.update_rule is "
                         f"{config.update_rule!r}")
    if model_type == FLA_MOM and config.conv_size == 0:
        raise ValueError("fla's MoM layer always has a short convolution; config.conv_size is 0")
    if model_type == FLA_GDN and fla_model_type_for(config) != FLA_GDN:
        raise ValueError("a gated_deltanet checkpoint holds one memory: config needs num_memories=1, topk=1 and "
                         f"shared_memory=False, got {config.num_memories}, {config.topk}, {config.shared_memory}")
    ratio = config.mlp_ratio
    values = dict(
        model_type=model_type, architectures=[_ARCHITECTURES[model_type]], vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_layers, num_heads=config.num_heads,
        head_dim=config.head_dim, expand_v=config.expand_v,
        hidden_ratio=int(ratio) if float(ratio).is_integer() else ratio,
        intermediate_size=config.mlp_hidden_size, hidden_act="swish",
        use_short_conv=config.conv_size > 0, conv_size=config.conv_size or _DEFAULTS[model_type]["conv_size"],
        norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.initializer_range, attn=None, attnres_block_size=None, attn_mode="chunk",
        fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True, use_cache=True,
    )
    if model_type == FLA_MOM:
        values.update(use_output_gate=config.use_output_gate, num_memories=config.num_memories, topk=config.topk,
                      shared_mem=config.shared_memory, single_kv_proj=False, mom_backend="gated_deltanet",
                      capacity=1.0, aux_loss_scale=config.aux_loss_coef, use_layer_wise_balance=True)
    else:
        values.update(use_gate=config.use_output_gate, num_v_heads=None, allow_neg_eigval=False,
                      output_gate_activation="swish", use_l2warp=False, fuse_linear_cross_entropy=False)
    return values


# Parameters -----------------------------------------------------------------------------------------------------
def _memory_names(config: MoMConfig, model_type: str, proj: str) -> list[str]:
    """fla's name (below ``attn.``) of each row of our stacked ``proj`` (S, P, D), in stream order."""
    if model_type == FLA_GDN:
        return [f"{proj}.weight"]
    names = [f"{proj}.{m}.weight" for m in range(config.num_memories)]
    if config.shared_memory:
        names.append(f"shared_{proj[0]}.weight")
    return names


def state_dict_to_fla(state: Mapping[str, torch.Tensor], config: MoMConfig,
                      model_type: str | None = None) -> dict[str, torch.Tensor]:
    """Our parameter dict (``MoMForCausalLM.state_dict()`` names) renamed and reshaped to fla's layout."""
    model_type = fla_model_type_for(config) if model_type is None else model_type
    config_to_fla(config, model_type)  # refuses what fla cannot hold
    out = {"model.embeddings.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    qkv_split = [config.key_dim, config.key_dim, config.value_dim]
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for name in _SAME_NAME:
            out[theirs + name] = state[ours + name]
        if config.use_output_gate:
            out[theirs + "attn.g_proj.weight"] = state[ours + "attn.g_proj.weight"]
        if model_type == FLA_MOM:
            router = state.get(ours + "attn.router.weight")
            if router is None:
                # A single routed memory has no router here; fla's gate over one memory always gives it weight 1.
                router = state[ours + "attn.q_proj.weight"].new_zeros(1, config.hidden_size)
            out[theirs + "attn.gate.weight"] = router
        for proj in _STACKED:
            for row, name in zip(state[ours + f"attn.{proj}"], _memory_names(config, model_type, proj)):
                out[theirs + "attn." + name] = row
        if config.conv_size > 0:
            for part, letter in zip(state[ours + "attn.conv_weight"].split(qkv_split), "qkv"):
                out[theirs + f"attn.{letter}_conv1d.weight"] = part.unsqueeze(1)  # (P, W) -> (P, 1, W)
        gate, up = state[ours + "mlp.gate_up.weight"].chunk(2)
        out[theirs + "mlp.gate_proj.weight"], out[theirs + "mlp.up_proj.weight"] = gate, up
        out[theirs + "mlp.down_proj.weight"] = state[ours + "mlp.down.weight"]
    return out


class _Source:
    """fla tensors taken by name; what is never taken is reported."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors
        self.taken: set[str] = set()

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"fla checkpoint lacks parameter {name!r}")
        self.taken.add(name)
        return self.tensors[name]

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.taken)


def state_dict_from_fla(tensors: Mapping[str, torch.Tensor], config: MoMConfig,
                        model_type: str) -> dict[str, torch.Tensor]:
    """fla's parameters as a ``MoMForCausalLM.state_dict()``-named dict (``lm_head.weight`` included when tied).

    Raises ``ValueError`` for a missing parameter or one that the mapping does not use (an fla option that this
    converter does not know about).
    """
    src = _Source(tensors)
    state = {"embed.weight": src.take("model.embeddings.weight"), "norm.weight": src.take("model.norm.weight")}
    if config.tie_embeddings:
        if "lm_head.weight" in tensors:  # some writers keep the tied copy
            src.take("lm_head.weight")
        state["lm_head.weight"] = state["embed.weight"]
    else:
        state["lm_head.weight"] = src.take("lm_head.weight")
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for name in _SAME_NAME:
            state[ours + name] = src.take(theirs + name)
        if config.use_output_gate:
            state[ours + "attn.g_proj.weight"] = src.take(theirs + "attn.g_proj.weight")
        if model_type == FLA_MOM:
            gate = src.take(theirs + "attn.gate.weight")
            if config.has_router:
                state[ours + "attn.router.weight"] = gate
        for proj in _STACKED:
            rows = [src.take(theirs + "attn." + name) for name in _memory_names(config, model_type, proj)]
            state[ours + f"attn.{proj}"] = torch.stack(rows)  # (S, P, D)
        if config.conv_size > 0:
            parts = [src.take(theirs + f"attn.{letter}_conv1d.weight") for letter in "qkv"]
            for part, letter in zip(parts, "qkv"):
                if part.dim() != 3 or part.shape[1] != 1:
                    raise ValueError(f"fla {theirs}attn.{letter}_conv1d.weight must have shape (P, 1, W), "
                                     f"got {tuple(part.shape)}")
            state[ours + "attn.conv_weight"] = torch.cat([p.squeeze(1) for p in parts])  # (C, W), q | k | v
        state[ours + "mlp.gate_up.weight"] = torch.cat([src.take(theirs + "mlp.gate_proj.weight"),
                                                        src.take(theirs + "mlp.up_proj.weight")])
        state[ours + "mlp.down.weight"] = src.take(theirs + "mlp.down_proj.weight")
    unused = src.unused()
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise ValueError(f"fla checkpoint has parameters that mom_lit does not map: {shown}")
    return state


# Directories ----------------------------------------------------------------------------------------------------
def load_fla(directory: str | Path, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu") -> tuple[MoMForCausalLM, MoMConfig]:
    """Import an fla ``MomForCausalLM`` / ``GatedDeltaNetForCausalLM`` directory as a mom_lit model.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` (or shards and their index).
        dtype: parameter dtype of the model (None keeps the stored one).
        device: where the parameters go.
    Returns:
        the model (in eval mode) and its :class:`MoMConfig`.
    """
    directory = require_directory(directory)
    fla_config = read_json(directory / "config.json")
    config = config_from_fla(fla_config)
    state = state_dict_from_fla(read_safetensors_dir(directory), config, fla_config["model_type"])
    return build_model(config, state, dtype, device), config


def save_fla(model: MoMForCausalLM, directory: str | Path, model_type: str | None = None,
             dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as an fla checkpoint (``config.json`` + ``model.safetensors``) that fla's
    ``AutoModelForCausalLM.from_pretrained`` loads. Returns the directory."""
    config = model.config
    model_type = fla_model_type_for(config) if model_type is None else model_type
    fla_config = config_to_fla(config, model_type)
    tensors = state_dict_to_fla(model.state_dict(), config, model_type)
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    fla_config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fla_config, indent=2, sort_keys=True) + "\n")
    save_safetensors(tensors, directory / "model.safetensors")
    return directory
