"""MoMConfig validation and presets."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from mom_lit import PRESETS, MoMConfig, MoMForCausalLM
from mom_lit.config import ConfigError


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, message", [
    pytest.param("topk", 5, "topk=5 exceeds num_memories=4", id="topk>E"),
    pytest.param("update_rule", "mamba", "update_rule must be one of 'gated_delta', ", id="rule"),
    pytest.param("hidden_size", 0, "hidden_size must be a positive integer, got 0 (int)", id="hidden0"),
    pytest.param("num_heads", -2, "num_heads must be a positive integer, got -2", id="heads<0"),
    pytest.param("num_layers", 2.0, "num_layers must be a positive integer, got 2.0 (float)", id="float-for-int"),
    pytest.param("num_memories", True, "num_memories must be a positive integer, got True (bool)", id="bool-for-int"),
    pytest.param("vocab_size", "256", "vocab_size must be a positive integer, got '256' (str)", id="str-for-int"),
    pytest.param("head_dim", 2.5, "head_dim", id="float-dim"),
    pytest.param("chunk_size", 0, "chunk_size", id="chunk0"),
    pytest.param("gla_gate_rank", 0, "gla_gate_rank", id="gla-rank0"),
    pytest.param("conv_size", -1, "conv_size must be an integer >= 0, got -1", id="conv<0"),
    pytest.param("conv_size", 4.0, "conv_size must be an integer >= 0, got 4.0 (float)", id="conv-float"),
    pytest.param("intermediate_size", 0, "intermediate_size must be a positive integer", id="intermediate0"),
    pytest.param("intermediate_size", 96.5, "intermediate_size must be a positive integer", id="intermediate-float"),
    pytest.param("expand_v", 0.3, "expand_v=0.3 must make head_dim*expand_v an integer", id="expand_v-not-integer"),
    pytest.param("expand_v", -1.0, "expand_v must be a finite number > 0, got -1.0", id="expand_v<0"),
    pytest.param("expand_v", NAN, "expand_v must be a finite number > 0, got nan", id="expand_v-nan"),
    pytest.param("mlp_ratio", NAN, "mlp_ratio must be a finite number > 0, got nan", id="mlp_ratio-nan"),
    pytest.param("mlp_ratio", INF, "mlp_ratio must be a finite number > 0, got inf", id="mlp_ratio-inf"),
    pytest.param("mlp_ratio", "3", "mlp_ratio must be a finite number > 0, got '3' (str)", id="mlp_ratio-str"),
    pytest.param("norm_eps", NAN, "norm_eps must be a finite number > 0, got nan", id="norm_eps-nan"),
    pytest.param("norm_eps", 0.0, "norm_eps must be a finite number > 0, got 0.0", id="norm_eps0"),
    pytest.param("initializer_range", -1, "initializer_range must be a finite number > 0, got -1", id="init<0"),
    pytest.param("initializer_range", NAN, "initializer_range must be a finite number > 0", id="init-nan"),
    pytest.param("gla_gate_normalizer", 0, "gla_gate_normalizer must be a finite number > 0", id="gla-norm0"),
    pytest.param("aux_loss_coef", -0.1, "aux_loss_coef must be a finite number >= 0, got -0.1", id="aux<0"),
    pytest.param("aux_loss_coef", NAN, "aux_loss_coef must be a finite number >= 0, got nan", id="aux-nan"),
    pytest.param("router_z_loss_coef", INF, "router_z_loss_coef must be a finite number >= 0", id="z-inf"),
    pytest.param("router_z_loss_coef", True, "router_z_loss_coef must be a finite number >= 0, got True (bool)",
                 id="z-bool"),
    pytest.param("tie_embeddings", "false", "tie_embeddings must be a boolean (true or false), got 'false' (str)",
                 id="str-for-bool"),
    pytest.param("shared_memory", "no", "shared_memory must be a boolean", id="shared-no"),
    pytest.param("use_output_gate", 1, "use_output_gate must be a boolean (true or false), got 1 (int)",
                 id="int-for-bool"),
    pytest.param("aux_loss_type", "local", "aux_loss_type must be one of 'global', 'per_layer', 'per_sequence'", id="aux-type"),
    pytest.param("backend", "cuda", "backend must be one of 'auto', ", id="backend"),
    pytest.param("activation_memory", "low", "activation_memory", id="activation_memory"),
])
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=f"^MoMConfig.{field}"):
        MoMConfig(**{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        MoMConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    pytest.param("expand_v", 2, id="int-for-float"),
    pytest.param("mlp_ratio", 4, id="int-ratio"),
    pytest.param("intermediate_size", None, id="no-intermediate"),
    pytest.param("conv_size", 0, id="no-conv"),
    pytest.param("aux_loss_coef", 0.0, id="no-aux"),
    pytest.param("shared_memory", False, id="no-shared"),
])
def test_valid_edge_values_are_accepted(field, value):
    assert getattr(MoMConfig(**{field: value}), field) == value


def test_every_field_is_validated():
    """A wrong type for any field is refused, naming it: no field escapes validation."""
    for field in dataclasses.fields(MoMConfig):
        with pytest.raises(ConfigError, match=f"MoMConfig.{field.name}"):
            MoMConfig(**{field.name: object()})


def test_unknown_fields_and_presets_are_rejected():
    with pytest.raises(ValueError, match="unknown MoMConfig fields"):
        MoMConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="unknown MoMConfig preset"):
        MoMConfig.from_preset("gpt5")


def test_round_trip_through_dict():
    cfg = MoMConfig.from_preset("quickstart", update_rule="gla")
    assert MoMConfig.from_dict(cfg.to_dict()) == cfg


def test_derived_sizes():
    cfg = MoMConfig.from_preset("mom_340m")
    assert (cfg.key_dim, cfg.value_dim, cfg.num_streams, cfg.mlp_hidden_size) == (1024, 1024, 5, 2048)
    assert MoMConfig.from_preset("gdn_340m").num_streams == 1
    assert not MoMConfig.from_preset("gdn_340m").has_router


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = MoMConfig.from_preset(name)
    with torch.device("meta"):
        model = MoMForCausalLM(cfg)
    assert model.num_parameters() > 0


def test_mom_adds_exactly_the_extra_memories_and_router_to_the_baseline():
    def count(name):
        with torch.device("meta"):
            return MoMForCausalLM(MoMConfig.from_preset(name)).num_parameters()

    cfg = MoMConfig.from_preset("mom_340m")
    d, h = cfg.hidden_size, cfg.num_heads
    per_stream = d * (cfg.key_dim + cfg.value_dim + 2 * h)  # k, v, beta, gate projections
    extra_per_layer = (cfg.num_streams - 1) * per_stream + cfg.num_memories * d  # 4 more streams + router
    assert count("mom_340m") - count("gdn_340m") == cfg.num_layers * extra_per_layer
