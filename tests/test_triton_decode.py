"""Triton decoding step (``mom_lit.ops.decode.kernels``) against the torch step (``decode_step_reference``).

Checked on random states: the slot outputs, the selected memories after the step, the conv state (bit for bit:
it only moves values), and that every memory no slot selected is bit-for-bit unchanged. On a machine without
CUDA the kernel runs under the Triton interpreter (``tests/test_triton_interpreter.py`` runs this module in a
fresh process with ``TRITON_INTERPRET=1``); on a GPU the same cases run natively, plus bf16 inputs and a model.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from closeness import relative_rms_error

from mom_lit.ops.decode import decode_step, decode_step_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU: runs in a fresh interpreter process (tests/test_triton_interpreter.py)", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

if not ON_GPU:  # kernels decorated before the interpreter was on would be compiled, not interpreted
    for _name in [m for m in sys.modules if m.startswith("mom_lit.ops.scan.triton")]:
        del sys.modules[_name]
from mom_lit.ops.decode.kernels import triton_decode_step  # noqa: E402  (after the interpreter check)

RULES = {  # rule -> (scalar gate, delta rule)
    "linear": (False, False),
    "simple_gla": (True, False),
    "delta": (False, True),
    "gated_delta": (True, True),
}
# relative RMS error allowed against the torch step (which rounds the convolution's products in bf16).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Per row: the memories of its slots (routed picks, then the shared stream 4). Rows 0 and 1 pick the same
# memories, row 2 others in another order; memory 3 of rows 0/1 and memories 0/2 of row 2 stay unselected.
SLOTS = [[1, 0, 4], [1, 0, 4], [3, 1, 4]]
SHAPES = {"h2_k32_v24": (2, 32, 24), "h1_k128_v96": (1, 128, 96)}  # the second walks two V blocks
if ON_GPU:
    SHAPES["h4_k256_v256"] = (4, 256, 256)  # the model's heads: eight V blocks, eight warps
DTYPES = [torch.float32] + ([torch.bfloat16] if ON_GPU else [])  # bf16: the interpreter mishandles it


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return relative_rms_error(actual, expected, floor=1e-6)


def make_inputs(rule, heads, key_dim, value_dim, dtype, conv_size=4, conv_dtype=torch.float32, seed=42):
    gen = torch.Generator().manual_seed(seed)
    batch, streams = len(SLOTS), 5
    use_gate, use_beta = RULES[rule]
    qd, vd = heads * key_dim, heads * value_dim
    channels = 2 * qd + vd

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    inputs = dict(
        q=randn(batch, qd).to(dtype), k=randn(batch, streams, qd).to(dtype), v=randn(batch, streams, vd).to(dtype),
        memory=torch.tensor(SLOTS, device=DEVICE),
        # Stream-major storage, as a prefill leaves it: (S, B, ...) transposed to (B, S, ...).
        state=randn(streams, batch, heads, key_dim, value_dim).transpose(0, 1),
        conv_state=None, conv_weight=None, scale=key_dim ** -0.5,
    )
    if conv_size:
        inputs["conv_state"] = randn(streams, batch, conv_size - 1, channels).to(conv_dtype).transpose(0, 1)
        inputs["conv_weight"] = randn(channels, conv_size, scale=conv_size ** -0.5).to(dtype)
    if use_gate:  # logits from -30 to 30: both branches of the softplus, decays from ~1 to ~0
        inputs.update(a=randn(batch, streams, heads, scale=15.0).to(dtype), a_log=randn(heads, scale=0.5),
                      dt_bias=randn(heads))
    if use_beta:
        inputs["b"] = randn(batch, streams, heads, scale=2.0).to(dtype)
    return inputs


def clone(inputs):
    return {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def check_step(inputs, dtype):
    ours, ref = clone(inputs), clone(inputs)
    o = triton_decode_step(**ours)
    o_ref = decode_step_reference(**ref)
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert rel_rms(o, o_ref) <= TOL[dtype], rel_rms(o, o_ref)
    rows = torch.arange(len(SLOTS), device=DEVICE).unsqueeze(1).expand(-1, len(SLOTS[0]))
    memory = inputs["memory"]
    assert rel_rms(ours["state"][rows, memory], ref["state"][rows, memory]) <= TOL[dtype]
    if inputs["conv_state"] is not None:
        assert torch.equal(ours["conv_state"], ref["conv_state"])
    selected = torch.zeros(ours["state"].shape[:2], dtype=torch.bool, device=DEVICE)
    selected[rows, memory] = True
    assert torch.equal(ours["state"][~selected], inputs["state"][~selected])  # never read, never written
    if inputs["conv_state"] is not None:
        assert torch.equal(ours["conv_state"][~selected], inputs["conv_state"][~selected])
        if inputs["conv_state"].numel():  # a one-tap convolution keeps no state
            assert not torch.equal(ours["conv_state"][selected], inputs["conv_state"][selected])
    assert not torch.equal(ours["state"][selected], inputs["state"][selected])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("rule", list(RULES))
def test_step_matches_torch(rule, shape, dtype):
    check_step(make_inputs(rule, *SHAPES[shape], dtype), dtype)


@pytest.mark.parametrize("conv_size", [0, 1, 2], ids=["no_conv", "conv1", "conv2"])
def test_step_without_conv_and_with_short_conv_states(conv_size):
    check_step(make_inputs("gated_delta", 2, 16, 16, torch.float32, conv_size=conv_size), torch.float32)


def test_conv_state_in_the_input_dtype_and_rounding_of_an_fp32_state():
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    check_step(make_inputs("delta", 2, 16, 8, dtype, conv_dtype=dtype), dtype)


def test_dispatch_and_repeated_steps_match_torch():
    """Ten steps through ``decode_step`` (Triton on CUDA or when requested) against ten reference steps."""
    inputs = make_inputs("gated_delta", 2, 32, 24, torch.float32)
    ours, ref = clone(inputs), clone(inputs)
    for step in range(10):
        torch.manual_seed(step)
        for name in ("q", "k", "v", "a", "b"):
            fresh = torch.randn(inputs[name].shape).to(DEVICE)
            ours[name], ref[name] = fresh, fresh.clone()
        o = decode_step(**ours, backend="triton")
        o_ref = decode_step_reference(**ref)
        assert rel_rms(o, o_ref) <= 1e-5
    assert rel_rms(ours["state"], ref["state"]) <= 1e-5
    assert torch.equal(ours["conv_state"], ref["conv_state"])


def test_rejects_states_it_cannot_update_in_place():
    inputs = make_inputs("linear", 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="fp32"):
        triton_decode_step(**{**inputs, "state": inputs["state"].double()})
    with pytest.raises(ValueError, match="contiguous"):
        triton_decode_step(**{**inputs, "state": inputs["state"].transpose(3, 4)})
    with pytest.raises(ValueError, match="conv_weight"):
        triton_decode_step(**{**inputs, "conv_weight": inputs["conv_weight"][:, :2]})


@pytest.mark.skipif(not ON_GPU, reason="a whole model on the GPU")
@torch.no_grad()
def test_model_decoding_with_the_triton_step_matches_the_torch_step():
    """fp32, so that no rounding difference flips a routing decision (bf16 is checked per step above)."""
    import dataclasses

    from mom_lit import MoMConfig, MoMForCausalLM
    from mom_lit.plan import resolve_plan

    dtype = torch.float32
    torch.manual_seed(0)
    cfg = MoMConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=2, head_dim=32, num_memories=4,
                    topk=2, shared_memory=True, backend="auto")
    model = MoMForCausalLM(cfg).cuda().to(dtype).eval()
    ids = torch.randint(0, 101, (3, 40), device="cuda")
    caches = {}
    eager = resolve_plan(dataclasses.replace(cfg, backend="eager"), ids.device, dtype)
    plans = {"auto": model.plan_for(ids.device, dtype), "eager": eager}
    assert plans["auto"].decode == "triton" and eager.decode == "torch"
    for backend, plan in plans.items():
        out = model(ids[:, :30], use_cache=True, plan=eager)  # the same prefill for both (and no compile wait)
        logits, cache = [], out.cache
        for t in range(30, 40):  # only the decoding steps differ
            step = model(ids[:, t:t + 1], cache=cache, use_cache=True, plan=plan)
            logits.append(step.logits)
            cache = step.cache
        caches[backend] = (torch.cat(logits, 1), cache)
    (fast, fast_cache), (ref, ref_cache) = caches["auto"], caches["eager"]
    assert rel_rms(fast, ref) <= TOL[dtype] * 10
    for a, b in zip(fast_cache.layers, ref_cache.layers):
        assert rel_rms(a.memory, b.memory) <= TOL[dtype] * 10


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
@torch.no_grad()
def test_captured_model_step_replays_the_eager_step():
    """The whole per-token step of ``tools/bench_decode.py``, captured once as a CUDA graph (static cache buffers,
    updated in place), gives the eager step's logits and keeps decoding the eager sequence."""
    from tools_import import load_tool

    from mom_lit import LayerState, MoMConfig, MoMForCausalLM
    from mom_lit.model import MoMCache

    tool = load_tool("bench_decode")
    torch.manual_seed(0)
    cfg = MoMConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=2, head_dim=32, num_memories=4,
                    topk=2, shared_memory=True, backend="auto")
    model = MoMForCausalLM(cfg).cuda().eval()
    model.configure_paths(backend="eager")  # eager prefill: no compile wait
    prompt = torch.randint(0, 101, (1, 20), device="cuda")
    cache, token = tool.mom_prefill(model, prompt, chunk=8)
    eager_cache = MoMCache([LayerState(s.memory.clone(), s.conv.clone()) for s in cache.layers])
    eager_token = token.clone()
    model.configure_paths()  # the config's paths again: Triton decoding steps
    replay, error = tool.mom_graph_step(model, cache, token, "cuda")
    assert error <= 1e-4
    tokens = []
    for _ in range(5):
        replay()
        tokens.append(token.clone())
    # The checked step and the five replays again, eagerly, from a copy of the prefilled cache.
    for expected in [None] + tokens:
        eager_token = model(eager_token, cache=eager_cache, use_cache=True).logits[:, -1:].argmax(-1)
        if expected is not None:
            assert torch.equal(eager_token, expected)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
def test_generation_with_a_captured_step_gives_the_eager_tokens():
    from mom_lit import MoMConfig, MoMForCausalLM
    from mom_lit.generate import sample_tokens

    torch.manual_seed(0)
    cfg = MoMConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=2, head_dim=32, num_memories=4,
                    topk=2, shared_memory=True, backend="auto", compile_stages=False)  # eager prefill: no compile
    model = MoMForCausalLM(cfg).cuda().eval()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]  # packed prefill, then three sequences decoded together
    eager = list(sample_tokens(model, prompts, max_new_tokens=12, temperature=0))
    graph = list(sample_tokens(model, prompts, max_new_tokens=12, temperature=0, cuda_graph=True))
    assert graph == eager
