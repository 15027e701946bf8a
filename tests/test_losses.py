"""Auxiliary router losses on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from mom_lit.losses import (load_balancing_loss_global, load_balancing_loss_per_layer,
                            load_balancing_loss_per_sequence, router_z_loss, routing_entropy)
from mom_lit.router import Router, Routing


def _routing(probs, topk=1):
    probs = torch.tensor(probs, dtype=torch.float32)
    weight, memory = probs.topk(topk, dim=-1)
    return Routing(logits=probs.log(), probs=probs, memory=memory, weight=weight / weight.sum(-1, keepdim=True))


def test_global_balance_is_one_when_balanced_and_larger_when_collapsed():
    balanced = _routing([[0.7, 0.3], [0.4, 0.6]])  # f = (1/2, 1/2), P = (0.55, 0.45)
    torch.testing.assert_close(load_balancing_loss_global([balanced], 2), torch.tensor(1.0))
    collapsed = _routing([[0.7, 0.3], [0.9, 0.1]])  # f = (1, 0), P = (0.8, 0.2) -> 2 * 0.8
    torch.testing.assert_close(load_balancing_loss_global([collapsed], 2), torch.tensor(1.6))
    # Global pools the layers: f = (3/4, 1/4), P = (0.675, 0.325) -> 2 * (0.50625 + 0.08125)
    torch.testing.assert_close(load_balancing_loss_global([balanced, collapsed], 2), torch.tensor(1.175))


def test_per_sequence_balance_averages_each_sequence():
    r = _routing([[0.7, 0.3], [0.4, 0.6]])
    seq_id = torch.tensor([0, 1])
    # Sequence 0: f = (1, 0), P = (0.7, 0.3) -> 1.4; sequence 1: f = (0, 1), P = (0.4, 0.6) -> 1.2.
    torch.testing.assert_close(load_balancing_loss_per_sequence([r], seq_id, 2, 2), torch.tensor(1.3))
    # The same tokens as one sequence are perfectly balanced.
    torch.testing.assert_close(load_balancing_loss_per_sequence([r], torch.tensor([0, 0]), 1, 2), torch.tensor(1.0))


def test_per_layer_balance_scores_each_layer_then_averages():
    balanced = _routing([[0.7, 0.3], [0.4, 0.6]])  # f = (1/2, 1/2), P = (0.55, 0.45) -> 1.0
    collapsed = _routing([[0.7, 0.3], [0.9, 0.1]])  # f = (1, 0), P = (0.8, 0.2) -> 1.6
    torch.testing.assert_close(load_balancing_loss_per_layer([balanced, collapsed], 2), torch.tensor(1.3))
    # Pooling the same two layers hides part of the collapsed layer's imbalance (1.175 < 1.3).
    torch.testing.assert_close(load_balancing_loss_global([balanced, collapsed], 2), torch.tensor(1.175))
    # Layers that are imbalanced in opposite directions pool to a balanced load but score badly per layer.
    first = _routing([[0.9, 0.1], [0.8, 0.2]])  # f = (1, 0), P = (0.85, 0.15) -> 1.7
    second = _routing([[0.1, 0.9], [0.2, 0.8]])  # f = (0, 1), P = (0.15, 0.85) -> 1.7
    torch.testing.assert_close(load_balancing_loss_per_layer([first, second], 2), torch.tensor(1.7))
    torch.testing.assert_close(load_balancing_loss_global([first, second], 2), torch.tensor(1.0))


@pytest.mark.parametrize("topk", [1, 2])
def test_per_layer_equals_global_with_one_layer(topk):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(37, 5), dim=-1)
    weight, memory = probs.topk(topk, dim=-1)
    r = Routing(logits=probs.log(), probs=probs, memory=memory, weight=weight / weight.sum(-1, keepdim=True))
    torch.testing.assert_close(load_balancing_loss_per_layer([r], 5), load_balancing_loss_global([r], 5))


def test_topk_counts_every_slot():
    r = _routing([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]], topk=2)  # slots: {0,1}, {2,1}: f = (1/4, 1/2, 1/4)
    p = torch.tensor([0.3, 0.3, 0.4])
    expected = 3 * (torch.tensor([0.25, 0.5, 0.25]) * p).sum()
    torch.testing.assert_close(load_balancing_loss_global([r], 3), expected)


@pytest.mark.parametrize("loss", [load_balancing_loss_global, load_balancing_loss_per_layer],
                         ids=["global", "per_layer"])
def test_gradient_flows_through_probabilities_only(loss):
    torch.manual_seed(0)
    routers = [Router(hidden_size=4, num_memories=3, topk=1) for _ in range(2)]
    for router in routers:
        torch.nn.init.normal_(router.weight)
    loss([router(torch.randn(5, 4)) for router in routers], 3).backward()
    for router in routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_z_loss_and_entropy():
    r = Routing(logits=torch.zeros(3, 2), probs=torch.full((3, 2), 0.5), memory=torch.zeros(3, 1, dtype=torch.long),
                weight=torch.ones(3, 1))
    torch.testing.assert_close(router_z_loss([r]), torch.tensor(math.log(2) ** 2))
    torch.testing.assert_close(routing_entropy(r), torch.tensor(math.log(2)))


@pytest.mark.parametrize("kind", ["global", "per_layer", "per_sequence"])
def test_model_reports_aux_loss_of_the_configured_kind(kind):
    from mom_lit import MoMConfig, MoMForCausalLM

    cfg = MoMConfig.from_preset("debug", aux_loss_type=kind, router_z_loss_coef=1e-3)
    out = MoMForCausalLM(cfg)(torch.randint(0, cfg.vocab_size, (2, 8)), labels=torch.randint(0, cfg.vocab_size, (2, 8)))
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + cfg.aux_loss_coef * out.aux_loss + 1e-3 * out.z_loss)
