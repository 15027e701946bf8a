"""Property-based robustness of the layer: random configurations, degenerate routing, tiny documents."""

from __future__ import annotations

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
