"""Property-based robustness of the layer: random configurations, degenerate routing, tiny documents."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mom_lit import MoMConfig, MoMForCausalLM

ATOL = 5e-5


@st.composite
def setups(draw):
    num_memories = draw(st.integers(1, 4))
    cfg = MoMConfig(
        vocab_size=31, hidden_size=16, num_layers=1, num_heads=draw(st.sampled_from([1, 2])), head_dim=8,
        num_memories=num_memories, topk=draw(st.integers(1, num_memories)),
        shared_memory=draw(st.booleans()) if num_memories > 1 else False,
        update_rule=draw(st.sampled_from(["gated_delta", "delta", "gla", "simple_gla", "linear"])),
        conv_size=draw(st.sampled_from([0, 4])), chunk_size=draw(st.sampled_from([4, 16])), backend="eager")
    router_scale = draw(st.sampled_from([0.0, 1.0, 1e4]))  # all scores equal / normal / one memory takes all
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))  # length-1 documents included
    seed = draw(st.integers(0, 2**16))
    return cfg, router_scale, lengths, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups())
@torch.no_grad()
def test_random_setups_stay_finite_causal_and_decodable(setup):
    cfg, router_scale, lengths, seed = setup
    torch.manual_seed(seed)
    model = MoMForCausalLM(cfg).eval()
    if cfg.has_router:
        for block in model.blocks:
            block.attn.router.weight.mul_(router_scale)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    ids = torch.randint(0, cfg.vocab_size, (1, int(cu[-1])))
    out = model(ids, cu_seqlens=cu, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # Each document alone, decoded token by token, gives the packed logits.
    for i in range(len(lengths)):
        doc = ids[:, cu[i]:cu[i + 1]]
        cache, pieces = None, []
        for t in range(doc.shape[1]):
            step = model(doc[:, t:t + 1], cache=cache, use_cache=True)
            cache = step.cache
            pieces.append(step.logits)
        torch.testing.assert_close(torch.cat(pieces, 1)[0], out.logits[0, cu[i]:cu[i + 1]], atol=ATOL, rtol=1e-4)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["gated_delta", "gla", "linear"]), st.integers(0, 1000))
def test_bf16_training_step_is_finite(rule, seed):
    torch.manual_seed(seed)
    cfg = MoMConfig.from_preset("debug", update_rule=rule, backend="eager")
    model = MoMForCausalLM(cfg).to(torch.bfloat16).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


PER_MEMORY = ("k_proj", "v_proj", "b_proj", "a_proj", "gk_down", "gk_up", "gk_bias")  # (streams, ...) parameters


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["gated_delta", "delta", "gla", "simple_gla", "linear"]), st.integers(3, 4), st.booleans(),
       st.sampled_from([0.0, 1.0, 1e4]), st.data())
def test_memories_without_tokens_stay_untouched_and_gradients_finite(rule, num_memories, shared, router_scale, data):
    """With top-1 routing and fewer tokens than memories, some memory of every layer receives no token: the
    backward pass stays finite and that memory's own projections get exactly zero gradient."""
    cfg = MoMConfig(vocab_size=31, hidden_size=16, num_layers=2, num_heads=2, head_dim=8, num_memories=num_memories,
                    topk=1, shared_memory=shared, update_rule=rule, conv_size=4, chunk_size=4, backend="eager")
    lengths = data.draw(st.lists(st.integers(1, 2), min_size=1, max_size=num_memories - 1)
                        .filter(lambda ls: sum(ls) < num_memories))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = MoMForCausalLM(cfg).train()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.router.weight.mul_(router_scale)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    ids = torch.randint(0, cfg.vocab_size, (1, int(cu[-1])))
    out = model(ids, cu_seqlens=cu)
    (out.logits.square().mean() + out.aux_loss).backward()
    assert torch.isfinite(out.logits).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    empty = out.router_load == 0  # (num_layers, num_memories)
    assert empty.any(dim=1).all()
    for layer, block in enumerate(model.blocks):
        for m in torch.nonzero(empty[layer]).flatten().tolist():
            for name in PER_MEMORY:
                param = getattr(block.attn, name, None)
                if param is not None:
                    assert not param.grad[m].any(), (layer, m, name)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["gated_delta", "delta", "gla", "linear"]), st.integers(0, 2**16))
@torch.no_grad()
def test_long_decode_stays_finite_and_equals_the_chunked_forward(rule, seed):
    """768 tokens decoded one at a time (the state carried through the cache) give the logits of one chunked
    forward pass; with the undecayed `linear` rule the memories grow with every token."""
    torch.manual_seed(seed)
    cfg = MoMConfig(vocab_size=31, hidden_size=16, num_layers=1, num_heads=1, head_dim=8, num_memories=2, topk=1,
                    shared_memory=True, update_rule=rule, conv_size=4, chunk_size=64, backend="eager")
    model = MoMForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 768))
    full = model(ids).logits
    cache, pieces = None, []
    for t in range(ids.shape[1]):
        step = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = step.cache
        pieces.append(step.logits)
    decoded = torch.cat(pieces, 1)
    assert torch.isfinite(decoded).all() and all(torch.isfinite(m).all() for m in cache.layers[0].memory)
    torch.testing.assert_close(decoded, full, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_bf16_training_step_on_the_compiled_path_is_finite():
    """The compiled scan (the CPU default) in bf16 on packed documents, one of length 1, against fp32 eager."""
    torch.manual_seed(0)
    cfg = MoMConfig.from_preset("debug", backend="compiled")
    model = MoMForCausalLM(cfg).train()
    reference = MoMForCausalLM(MoMConfig.from_preset("debug", backend="eager"))
    reference.load_state_dict(model.state_dict())
    model.to(torch.bfloat16)
    cu = torch.tensor([0, 1, 30, 70], dtype=torch.int32)
    ids = torch.randint(0, cfg.vocab_size, (1, 70))
    out = model(ids, labels=ids, cu_seqlens=cu)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.loss.float(), reference(ids, labels=ids, cu_seqlens=cu).loss, rtol=2e-2, atol=0)
