"""Invariants of the whole model on the reference path: causality, independence, packing, decoding."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mom_lit import LayerState, MoMConfig, MoMForCausalLM

ATOL = 2e-5  # fp32 rounding differs between batch compositions (chunk boundaries move); leaks are O(1e-2)


def _random_config(seed: int, **overrides) -> MoMConfig:
    rng = random.Random(seed)
    num_memories = rng.choice([1, 2, 3, 4])
    values = dict(
        vocab_size=97, hidden_size=32, num_layers=2, num_heads=rng.choice([1, 2]), head_dim=rng.choice([8, 16]),
        expand_v=rng.choice([1.0, 2.0]), num_memories=num_memories, topk=rng.randint(1, num_memories),
        shared_memory=rng.choice([True, False]) if num_memories > 1 else False,
        update_rule=rng.choice(["gated_delta", "delta", "gla", "simple_gla", "linear"]),
        conv_size=rng.choice([0, 2, 4]), chunk_size=rng.choice([4, 8, 16]), backend="eager",
    )
    values.update(overrides)
    return MoMConfig(**values)


def _model(cfg: MoMConfig, seed: int = 0) -> MoMForCausalLM:
    torch.manual_seed(seed)
    return MoMForCausalLM(cfg).eval()


CONFIGS = [pytest.param(s, id=f"cfg{s}") for s in range(8)]
RULES = ["gated_delta", "delta", "gla", "simple_gla", "linear"]


@pytest.mark.parametrize("seed", CONFIGS)
@torch.no_grad()
def test_no_dependence_on_future_tokens(seed):
    cfg = _random_config(seed)
    model = _model(cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 41), generator=torch.Generator().manual_seed(seed))
    ref = model(ids).logits
    for t in (0, 5, 17, 39):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, cfg.vocab_size, changed[:, t + 1:].shape)
        out = model(changed).logits
        torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", CONFIGS)
@torch.no_grad()
def test_batch_rows_are_independent(seed):
    cfg = _random_config(seed)
    model = _model(cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (3, 29))
    ref = model(ids).logits
    changed = ids.clone()
    changed[1] = torch.randint(0, cfg.vocab_size, (29,))
    out = model(changed).logits
    torch.testing.assert_close(out[0], ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], ref[2], atol=ATOL, rtol=0)
    assert (out[1] - ref[1]).abs().max() > 1e-4  # the changed row did change


def _packed(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return docs, torch.cat(docs)[None], cu


@pytest.mark.parametrize("seed", CONFIGS)
@torch.no_grad()
def test_packed_equals_separate(seed):
    cfg = _random_config(seed)
    model = _model(cfg, seed)
    lengths = [7, 1, 23, 4, 16]
    docs, packed, cu = _packed(lengths, cfg.vocab_size, seed)
    out = model(packed, cu_seqlens=cu).logits[0]
    for i, doc in enumerate(docs):
        alone = model(doc[None]).logits[0]
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", CONFIGS[:4])
@torch.no_grad()
def test_packed_documents_are_independent(seed):
    cfg = _random_config(seed)
    model = _model(cfg, seed)
    docs, packed, cu = _packed([12, 9, 14], cfg.vocab_size, seed)
    ref = model(packed, cu_seqlens=cu).logits[0]
    changed = packed.clone()
    changed[0, cu[1]:cu[2]] = torch.randint(0, cfg.vocab_size, (9,))  # only the middle document
    out = model(changed, cu_seqlens=cu).logits[0]
    torch.testing.assert_close(out[: cu[1]], ref[: cu[1]], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[cu[2]:], ref[cu[2]:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", CONFIGS)
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(seed):
    cfg = _random_config(seed)
    model = _model(cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    full = model(ids).logits
    # Prefill, then a mix of multi-token continuations and single-token steps.
    pieces, cache, start = [], None, 0
    for stop in (11, 12, 15, 16, 17, 24, 30):
        out = model(ids[:, start:stop], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache, start = out.cache, stop
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)
    assert cache.seen_tokens == 30


@torch.no_grad()
def test_packed_prefill_states_equal_separate_states():
    cfg = _random_config(3, num_memories=4, topk=2, shared_memory=True, conv_size=4)
    model = _model(cfg)
    docs, packed, cu = _packed([5, 13, 2], cfg.vocab_size)
    cache = model(packed, cu_seqlens=cu, use_cache=True).cache
    for i, doc in enumerate(docs):
        alone = model(doc[None], use_cache=True).cache
        for layer, ref in zip(cache.layers, alone.layers):
            torch.testing.assert_close(layer.memory[i], ref.memory[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(layer.conv[i], ref.conv[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_unselected_memories_are_untouched_in_decoding():
    cfg = _random_config(5, num_memories=4, topk=1, shared_memory=True, update_rule="gated_delta", num_layers=1)
    model = _model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    cache = model(ids, use_cache=True).cache
    before = cache.layers[0].memory.clone()
    step = torch.randint(0, cfg.vocab_size, (3, 1))
    layer = model.blocks[0].attn
    chosen = layer.router(model.blocks[0].attn_norm(model.embed(step)).view(3, -1)).memory[:, 0]
    after = model(step, cache=cache, use_cache=True).cache.layers[0].memory
    for row in range(3):
        for m in range(cfg.num_memories):
            same = torch.equal(after[row, m], before[row, m])
            assert same == (m != int(chosen[row])), (row, m)
        assert not torch.equal(after[row, -1], before[row, -1])  # the shared memory always updates


@pytest.mark.parametrize("mode", ["ties", "underflow"])
@torch.no_grad()
def test_degenerate_routing_keeps_invariants(mode):
    cfg = _random_config(1, num_memories=4, topk=2, shared_memory=True, update_rule="gated_delta", conv_size=4)
    model = _model(cfg)
    for block in model.blocks:
        w = block.attn.router.weight
        if mode == "ties":
            w.zero_()  # every score equal: the top-k picks by index
        else:
            w.mul_(1e4)  # one memory takes ~all the probability, the second pick's weight underflows to 0
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    ref = model(ids)
    assert torch.isfinite(ref.logits).all()
    if mode == "underflow":
        assert (model.blocks[0].attn.router(model.blocks[0].attn_norm(model.embed(ids)).view(66, -1)).weight[:, 1]
                == 0).any()
    changed = ids.clone()
    changed[:, 20:] = torch.randint(0, cfg.vocab_size, (2, 13))
    torch.testing.assert_close(model(changed).logits[:, :20], ref.logits[:, :20], atol=ATOL, rtol=0)
    pieces, cache = [model(ids[:, :19], use_cache=True)], None
    cache = pieces[0].cache
    for t in range(19, 33):
        pieces.append(model(ids[:, t:t + 1], cache=cache, use_cache=True))
        cache = pieces[-1].cache
    torch.testing.assert_close(torch.cat([p.logits for p in pieces], 1), ref.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rule", RULES)
def test_every_parameter_gets_a_gradient(rule):
    cfg = MoMConfig.from_preset("debug", update_rule=rule, backend="eager")
    model = MoMForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    out = model(ids, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_loss_is_next_token_cross_entropy_plus_aux():
    cfg = MoMConfig.from_preset("debug", backend="eager", aux_loss_coef=0.1)
    model = _model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.loss, ce + 0.1 * out.aux_loss)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(ids, targets=targets).lm_loss, ce)


def test_packed_loss_never_predicts_across_documents():
    cfg = MoMConfig.from_preset("debug", backend="eager")
    model = _model(cfg)
    docs, packed, cu = _packed([6, 9], cfg.vocab_size)
    out = model(packed, labels=packed, cu_seqlens=cu)
    losses = [F.cross_entropy(model(d[None]).logits[0, :-1], d[1:], reduction="sum") for d in docs]
    torch.testing.assert_close(out.lm_loss, sum(losses) / (5 + 8), atol=1e-5, rtol=1e-5)


def test_single_memory_layer_has_no_router():
    cfg = MoMConfig.from_preset("debug", num_memories=1, topk=1, shared_memory=False)
    model = MoMForCausalLM(cfg)
    assert model.blocks[0].attn.router is None
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    assert out.aux_loss is None and out.router_load is None
    assert torch.isfinite(out.loss)


def test_router_statistics_shapes_and_ranges():
    cfg = MoMConfig.from_preset("debug")
    out = _model(cfg)(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert out.router_load.shape == (cfg.num_layers, cfg.num_memories)
    torch.testing.assert_close(out.router_load.sum(1), torch.ones(cfg.num_layers))
    assert ((out.router_entropy >= 0) & (out.router_entropy <= torch.log(torch.tensor(4.0)) + 1e-6)).all()


@torch.no_grad()
def test_greedy_generation_matches_full_forward():
    cfg = MoMConfig.from_preset("debug", backend="eager")
    model = _model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 7))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :7], prompt)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    sampled = model.generate(prompt, 5, temperature=0.8, top_k=10, top_p=0.9,
                             generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 12) and int(sampled.max()) < cfg.vocab_size


def test_bad_inputs_raise_clear_errors():
    cfg = MoMConfig.from_preset("debug")
    model = _model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 4), cfg.vocab_size))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(ids, cu_seqlens=torch.tensor([0, 6, 3, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at the input length"):
        model(ids, cu_seqlens=torch.tensor([0, 6, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(1, total\)"):
        model(torch.zeros(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    cache = model(torch.zeros(2, 3, dtype=torch.long), use_cache=True).cache
    with pytest.raises(ValueError, match="cache holds 2 sequences"):
        model(ids, cache=cache)
    with pytest.raises(ValueError, match="shape"):
        model(ids[0])


@pytest.mark.parametrize("rule", RULES)
@torch.no_grad()
def test_decode_step_equals_one_token_scan(rule):
    cfg = _random_config(2, num_memories=4, topk=2, shared_memory=True, update_rule=rule, conv_size=4)
    layer = _model(cfg).blocks[0].attn
    batch = 3
    state = layer.empty_state(batch, "cpu")
    state.memory.normal_()
    state.conv.normal_()
    x = torch.randn(batch, cfg.hidden_size)
    seq_id = torch.arange(batch)
    # (B, 1, D): one token of each sequence, the in-place decoding step
    fast, fast_aux = layer(x.unsqueeze(1), seq_id, batch, LayerState(state.memory.clone(), state.conv.clone()),
                           use_cache=True)
    # (1, B, D): the same tokens as B one-token sequences of one row, through the slot stage and the varlen scan
    ref, ref_aux = layer(x.unsqueeze(0), seq_id, batch, state, use_cache=True)
    fast_state, ref_state = fast_aux.state, ref_aux.state
    torch.testing.assert_close(fast.squeeze(1), ref.squeeze(0), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(fast_state.memory, ref_state.memory, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(fast_state.conv, ref_state.conv, atol=ATOL, rtol=1e-5)
