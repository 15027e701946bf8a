"""Model-level invariants on the GPU path (Triton scan), against the compiled/eager reference on the same card."""

from __future__ import annotations

import pytest
import torch

from mom_lit import MoMConfig, MoMForCausalLM
from mom_lit.cuda_graphs import capture_cuda_graph

from invariants import assert_model_invariants

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RULES = ["gated_delta", "delta", "simple_gla", "linear"]
ATOL = 2e-4  # fp32 inputs; the Triton dots run in tf32-free fp32 but accumulate in another order


def _pair(rule, **overrides):
    cfg = dict(vocab_size=101, hidden_size=64, num_layers=2, num_heads=2, head_dim=64, num_memories=4, topk=2,
               shared_memory=True, update_rule=rule, **overrides)
    torch.manual_seed(0)
    fast = MoMForCausalLM(MoMConfig(**cfg, backend="triton")).cuda().eval()
    ref = MoMForCausalLM(MoMConfig(**cfg, backend="eager")).cuda().eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("rule", RULES)
def test_triton_model_matches_reference_forward_and_gradients(rule):
    fast, ref = _pair(rule)
    ids = torch.randint(0, 101, (3, 150), device="cuda")
    out_f, out_r = fast(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out_f.logits, out_r.logits, atol=ATOL, rtol=1e-3)
    out_f.loss.backward()
    out_r.loss.backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=2e-2, msg=name)


@pytest.mark.parametrize("rule", RULES)
@torch.no_grad()
def test_triton_model_invariants(rule):
    model, _ = _pair(rule)
    ids = torch.randint(0, 101, (2, 130), device="cuda")
    assert_model_invariants(model, ids, cut=70, cu_seqlens=[0, 1, 40, 41, 130], prefill=100, atol=ATOL)


def test_bf16_training_step_is_finite_on_the_triton_path():
    fast, _ = _pair("gated_delta")
    fast = fast.to(torch.bfloat16).train()
    ids = torch.randint(0, 101, (4, 300), device="cuda")
    out = fast(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())


def _training_step(model, ids, cu_seqlens):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, cu_seqlens=cu_seqlens).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation_memory", ["fast", "balanced", "lean"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed-documents"])
def test_training_step_never_syncs_and_replays_as_a_cuda_graph(dtype, activation_memory, packed):
    """The training forward and backward never wait for the device (any synchronising call raises under
    ``set_sync_debug_mode("error")``, and stream capture would fail), so the whole step can be captured once as a
    CUDA graph; its replays on new tokens give the eager step's loss and gradients (bf16 takes the grouped
    projections; its tolerance allows the one-ulp differences of atomic sums, such as the embedding's gradient)."""
    fast, _ = _pair("gated_delta", activation_memory=activation_memory)
    model = fast.to(dtype).train()
    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-3, 2e-2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 300) if packed else (3, 100)
    cu = torch.tensor([0, 1, 120, 121, 300], device="cuda") if packed else None

    def tokens():
        return torch.randint(0, 101, shape, device="cuda", generator=gen)

    _training_step(model, tokens(), cu)  # first step: the layer's one-off kernel probe, outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _training_step(model, tokens(), cu)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    static_ids = tokens()
    graph, static_loss = capture_cuda_graph(lambda: _training_step(model, static_ids, cu), warmup=1)
    graph_grads = [p.grad for p in model.parameters()]  # allocated by the capture; every replay writes them
    for _ in range(2):
        ids = tokens()
        static_ids.copy_(ids)
        graph.replay()
        replayed = [static_loss.clone()] + [g.clone() for g in graph_grads]
        eager = [_training_step(model, ids, cu)] + [p.grad for p in model.parameters()]
        for name, a, b in zip(["loss"] + [n for n, _ in model.named_parameters()], replayed, eager):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)
