"""MoMConfig validation and presets."""

from __future__ import annotations

import pytest
import torch

from mom_lit import PRESETS, MoMConfig, MoMForCausalLM


@pytest.mark.parametrize("field, value, message", [
    pytest.param("topk", 5, "topk=5 exceeds num_memories=4", id="topk>E"),
    pytest.param("update_rule", "mamba", "update_rule", id="rule"),
    pytest.param("hidden_size", 0, "hidden_size", id="hidden0"),
    pytest.param("num_heads", -2, "num_heads", id="heads<0"),
    pytest.param("expand_v", 0.3, "expand_v", id="expand_v-not-integer"),
    pytest.param("conv_size", -1, "conv_size", id="conv<0"),
    pytest.param("aux_loss_type", "local", "aux_loss_type", id="aux-type"),
    pytest.param("aux_loss_coef", -0.1, "aux_loss_coef", id="aux<0"),
    pytest.param("backend", "cuda", "backend", id="backend"),
    pytest.param("activation_memory", "low", "activation_memory", id="activation_memory"),
    pytest.param("head_dim", 2.5, "head_dim", id="float-dim"),
])
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        MoMConfig(**{field: value})


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
