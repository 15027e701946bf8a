"""Chunked LM cross entropy (fused with the head) against F.cross_entropy on full logits: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mom_lit import MoMConfig, MoMForCausalLM
from mom_lit.losses import linear_cross_entropy


def _reference(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=-100, reduction="sum")


def _inputs(rows=23, dim=16, vocab=37, seed=42):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::5] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_rows", [1, 4, 23, 100], ids=lambda c: f"chunk{c}")
def test_loss_and_gradients_match_full_logits(chunk_rows):
    hidden, weight, targets = _inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = linear_cross_entropy(h1, w1, targets, chunk_rows=chunk_rows)
    ref = _reference(h2, w2, targets)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)
    (ours * 0.37).backward()  # a non-unit upstream gradient scales both gradients
    (ref * 0.37).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-6)


def test_gradient_only_where_needed_and_no_grad_mode():
    hidden, weight, targets = _inputs()
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, targets, chunk_rows=5).backward()
    w_ref = weight.clone().requires_grad_()
    _reference(hidden, w_ref, targets).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, w, targets, chunk_rows=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(hidden, weight, targets).float(), rtol=1e-6, atol=1e-6)


def test_all_rows_ignored_gives_zero_loss_and_gradient():
    hidden, weight, _ = _inputs()
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, torch.full((hidden.shape[0],), -100), chunk_rows=7)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not h.grad.any()


def test_bad_shapes_are_rejected():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="vocab"):
        linear_cross_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, weight, targets, chunk_rows=0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_model_loss_and_gradients_equal_full_logit_cross_entropy(tie):
    cfg = MoMConfig.from_preset("debug", backend="eager", tie_embeddings=tie, aux_loss_coef=0.0)
    torch.manual_seed(0)
    model = MoMForCausalLM(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    labels = ids.clone()
    labels[1, 4] = -100
    out = model(ids, labels=labels)
    out.lm_loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids).logits  # the plain path: full logits from the forward
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size).float(), labels[:, 1:].reshape(-1),
                          ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, ref, rtol=1e-6, atol=1e-6)
    ref.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    # Logits of a loss-computing forward are made on request and equal the plain forward's.
    torch.testing.assert_close(out.logits, logits)
