"""Fast paths of the MoM layer against its reference path: the Triton slot stage (gather, short convolution, SiLU,
L2 norm; ``mom_lit.ops.slots.stage.slot_conv``) and the layer that uses it.

The kernels run natively on a GPU; on CPU the suite reruns this file under ``TRITON_INTERPRET=1`` in a fresh
process (the interpreter must be active before Triton is first used, see ``test_triton_interpreter.py``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from closeness import relative_rms_error

pytest.importorskip("triton", reason="the fast paths are Triton kernels (triton is not installed)")

from mom_lit import MoMConfig, MoMForCausalLM, MoMLayer  # noqa: E402
from mom_lit.plan import compute_dtype, resolve_plan, stage_kernels_build  # noqa: E402
from mom_lit.layout import build_layout, sequence_ids, unsort  # noqa: E402
from mom_lit.norm import GatedRMSNorm, l2_normalize  # noqa: E402
from mom_lit.ops.mix import mix_gated_rms_norm  # noqa: E402
from mom_lit.ops.slots import QKVSources, projected_slot_conv  # noqa: E402
from mom_lit.ops.slots import kernels as slot_kernels  # noqa: E402
from mom_lit.ops.slots.gates import scalar_gates  # noqa: E402
from mom_lit.ops.stage_launch import DEFAULT_LAUNCH, StageLaunch, StageLaunchConfig  # noqa: E402
from mom_lit.ops.slots import slot_conv, varlen_short_conv  # noqa: E402
from mom_lit.ops.slots.grouped import grouped_kernels_on, grouped_mm_available  # noqa: E402

from invariants import assert_model_invariants  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NATIVE = torch.cuda.is_available()
kernels = pytest.mark.skipif(not (NATIVE or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if NATIVE else "cpu"
# fp32 everywhere the kernels run; bf16 natively on a GPU only (the interpreter mishandles bf16)
bf16_native = pytest.mark.skipif(not NATIVE, reason="the interpreter mishandles bf16")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16", marks=bf16_native)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error with an absolute floor of 1e-3 on the reference's norm: a gradient that is zero in exact
    arithmetic (the router's with top-1 routing) compares as rounding noise."""
    return relative_rms_error(a, b, floor=1e-3 / max(b.numel(), 1) ** 0.5)  # the norm's floor as an RMS floor


# Launch settings: the library's, and small blocks that split these test shapes into several row blocks, spans and
# channel blocks (a span of 24 rows walked in steps of 8, 16 channels per program), so the boundaries are tested.
SMALL_LAUNCH = StageLaunchConfig(
    conv_fwd=StageLaunch(8, 2), conv_bwd_pre=StageLaunch(16, 4),
    conv_bwd_dx=StageLaunch(8, 2), dx_channels=16, dx_span=24,
    mix_fwd=StageLaunch(8, 2), mix_bwd=StageLaunch(16, 4),
    slot_sum=StageLaunch(8, 2), slot_sum_channels=16)


def test_stage_launch_config_rejects_spans_that_overlap():
    with pytest.raises(ValueError, match="dx_span"):
        StageLaunchConfig(conv_bwd_dx=StageLaunch(16, 4), dx_span=20)
    with pytest.raises(ValueError, match="dx_kernel"):
        StageLaunchConfig(dx_kernel="3d")


@pytest.fixture(params=["default-launch", "small-launch"])
def launch(request):
    return SMALL_LAUNCH if request.param == "small-launch" else None


@pytest.fixture(params=["default-launch", "small-launch", "tiles-small-launch"])
def conv_launch(request):
    """The slot stage's launch settings, with each transposed-convolution kernel ("taps" and "tiles")."""
    return {"default-launch": None, "small-launch": SMALL_LAUNCH,
            "tiles-small-launch": dataclasses.replace(SMALL_LAUNCH, dx_kernel="tiles")}[request.param]


def _routing(num_tokens, num_memories, topk, generator):
    scores = torch.rand(num_tokens, num_memories, generator=generator)
    scores[: num_tokens // 3, -1] = 2.0  # one memory gets many tokens, another may get none
    memory = scores.topk(topk, -1).indices
    return torch.cat([memory, torch.full_like(memory[:, :1], num_memories)], 1)  # + shared memory


def _reference(q_src, kv_src, weight, layout, heads, key_dim, value_dim, extra):
    HK, HV = heads * key_dim, heads * value_dim
    kv_rows = layout.token * layout.num_streams + layout.memory
    qkv = torch.cat([q_src[layout.token], kv_src[kv_rows, :HK + HV]], 1)  # (L, C)
    y, _ = varlen_short_conv(qkv, weight, layout.segment, layout.position, layout.cu_seqlens)
    q, k, v = y.split([HK, HK, HV], 1)
    q = l2_normalize(q.reshape(-1, heads, key_dim))
    k = l2_normalize(k.reshape(-1, heads, key_dim))
    return q, k, v.reshape(-1, heads, value_dim), kv_src[kv_rows, HK + HV:HK + HV + extra]


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq_len,heads,key_dim,value_dim,width", [
    pytest.param(2, 37, 2, 16, 24, 4, id="K!=V,odd"),
    pytest.param(3, 5, 1, 32, 32, 3, id="short-segments"),
    pytest.param(1, 70, 3, 8, 8, 2, id="3heads-width2"),
    pytest.param(2, 29, 1, 16, 16, 6, id="width6"),  # wider than the "taps" kernel: the "tiles" kernel runs
])
def test_slot_conv_matches_gather_then_convolve(dtype, batch, seq_len, heads, key_dim, value_dim, width,
                                                conv_launch):
    gen = torch.Generator().manual_seed(42)
    num_memories, topk, extra = 4, 2, 2 * heads
    streams = num_memories + 1
    num_tokens = batch * seq_len
    memory = _routing(num_tokens, num_memories, topk, gen)
    layout = build_layout(memory, sequence_ids(batch, seq_len, None, "cpu"), batch, streams)
    layout = type(layout)(**{k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in vars(layout).items()})
    HK, HV = heads * key_dim, heads * value_dim
    width_p = HK + HV + extra + 3  # spare columns after the gates are never read
    q_src = torch.randn(num_tokens, HK, generator=gen).to(DEVICE, dtype).requires_grad_()
    kv_src = torch.randn(num_tokens * streams, width_p, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = torch.randn(2 * HK + HV, width, generator=gen).to(DEVICE, dtype).requires_grad_()
    grads = None
    results = []
    for fast in (True, False):
        args = (q_src, kv_src, weight)
        if fast:
            outs = slot_conv(*args, layout.token, layout.token * streams + layout.memory, layout.position,
                             layout.rank, heads, key_dim, value_dim, extra, launch=conv_launch)
        else:
            outs = _reference(*[a.double() if dtype == torch.float32 else a for a in args], layout, heads,
                              key_dim, value_dim, extra)
        if grads is None:
            grads = [torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype) for o in outs]
        params = torch.autograd.grad(outs, args, [g.to(o.dtype) for g, o in zip(grads, outs)])
        results.append((outs, params))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    (fast_out, fast_grad), (ref_out, ref_grad) = results
    for name, a, b in zip(["q", "k", "v", "gates", "dq_src", "dkv_src", "dweight"], fast_out + fast_grad,
                          ref_out + ref_grad):
        assert a.shape == b.shape, name
        assert a.dtype == dtype, name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    # Streams that no slot selected get exactly zero gradient.
    selected = torch.zeros(num_tokens * streams, dtype=torch.bool, device=DEVICE)
    selected[layout.token * streams + layout.memory] = True
    assert (fast_grad[1][~selected] == 0).all()


@kernels
@pytest.mark.parametrize("width", [4, 6], ids=["taps-width", "width6"])
def test_slot_kernels_address_slot_ordered_sources_directly(width, conv_launch):
    """``rows=None`` (sources already in slot order, as the grouped projection writes them) gives bit for bit what
    the same sources gathered through the identity permutation give, forward and backward, through every
    transposed-convolution kernel."""
    gen = torch.Generator().manual_seed(11)
    heads, dim, length = 2, 16, 53
    position = torch.cat([torch.arange(20), torch.arange(1), torch.arange(32)]).to(DEVICE)  # three segments
    src = torch.randn(length, heads * dim, generator=gen).to(DEVICE)
    weight = torch.randn(heads * dim, width, generator=gen).to(DEVICE)
    dout = torch.randn(length, heads, dim, generator=gen).to(DEVICE)
    identity = torch.arange(length, device=DEVICE)
    results = []
    for rows in (None, identity):
        out = slot_kernels.conv_fwd(src, rows, position, weight, heads, dim, True, launch=conv_launch)
        dst = torch.full_like(src, float("nan"))
        dweight = slot_kernels.conv_bwd(src, rows, position, weight, dout, heads, dim, True, dst, None,
                                        launch=conv_launch)
        results.append((out, dst, dweight))
    for name, a, b in zip(["out", "dsrc", "dweight"], *results):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


@kernels
@pytest.mark.skipif(NATIVE, reason="the fp32 grouped product runs on CPU only; its bf16 CUDA twins are "
                                   "test_bf16_layer_against_fp32_reference[E4-grouped], [E4-balanced-...] and "
                                   "[E4-lean-...]")
@pytest.mark.parametrize("mode", ["kept", "kept-exposed", "own-recompute", "handed-over"])
def test_projected_slot_conv_matches_projections_then_slot_conv(mode):
    """The grouped slot stage (query and grouped slot projections kept for the backward, kept and handed out to
    rebuild q, k, v from, recomputed there, or handed over by the scan's rebuild of q, k, v) against dense
    projections of every (token, stream) and the reference slot stage, with one memory that no token selected (an
    empty group) and one that a single token selected."""
    handed_over = mode == "handed-over"
    gen = torch.Generator().manual_seed(7)
    batch, seq_len, hidden, heads, key_dim, value_dim, width = 2, 19, 32, 2, 16, 8, 4
    num_memories, extra = 4, 2 * heads
    streams, num_tokens = num_memories + 1, batch * seq_len
    memory = torch.tensor([0, 1]).repeat(num_tokens, 1)
    memory[5] = torch.tensor([3, 0])  # memory 3: one token; memory 2: none
    memory = torch.cat([memory, torch.full((num_tokens, 1), num_memories)], 1)  # + shared memory
    layout = build_layout(memory, sequence_ids(batch, seq_len, None, "cpu"), batch, streams)
    ends = layout.cu_seqlens[batch::batch].to(torch.int32)  # (S,) end of each memory's group of sorted slots
    assert ends.tolist()[1:4] == [2 * num_tokens - 1, 2 * num_tokens - 1, 2 * num_tokens]
    HK, HV = heads * key_dim, heads * value_dim
    rows = HK + HV + extra + 4  # spare columns after the gates; 56 fp32 values: rows of 16-byte multiples
    x = torch.randn(num_tokens, hidden, generator=gen).requires_grad_()
    q_weight = (0.2 * torch.randn(HK, hidden, generator=gen)).requires_grad_()
    kv_weight = (0.2 * torch.randn(streams, rows, hidden, generator=gen)).requires_grad_()
    weight = torch.randn(2 * HK + HV, width, generator=gen).requires_grad_()
    inputs = (x, q_weight, kv_weight, weight)
    exposed = mode == "kept-exposed"
    dims = dict(heads=heads, key_dim=key_dim, value_dim=value_dim)
    sources = None
    if exposed:  # balanced activation memory: the scan keeps the slot stage's own projections
        sources = QKVSources("projections", (), **dims)
    elif handed_over:  # lean: the scan keeps the inputs and rebuilds the projections, for itself and the stage
        sources = QKVSources("inputs", (x.detach(), q_weight.detach(), kv_weight.detach(), weight.detach(),
                                        layout.token, ends, layout.position), **dims)
    outs = projected_slot_conv(x, q_weight, kv_weight, weight, layout.token, ends, layout.position, layout.rank,
                               heads, key_dim, value_dim, extra, keep=mode.startswith("kept"), sources=sources)
    if sources is not None:  # what the scan's backward does first: rebuild q, k, v from what it kept
        kept = sources.take_tensors()
        assert sources.take_tensors() == ()  # handed over once
        if exposed:  # the slot stage's own projections, kept without a gradient
            assert not kept[0].requires_grad and not kept[1].requires_grad
        rebuilt = sources.rebuild(*kept)
        for a, b in zip(rebuilt, outs[:3]):
            assert torch.equal(a, b.detach())
    cotangents = [torch.randn(o.shape, generator=gen) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cotangents)
    assert sources is None or sources.take_projections() is None  # handed over to the stage and released

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    rx, rq, rkv, rw = ref_inputs
    kv_all = torch.einsum("nd,spd->nsp", rx, rkv).reshape(num_tokens * streams, rows)  # every (token, stream)
    ref_outs = _reference(rx @ rq.t(), kv_all, rw, layout, heads, key_dim, value_dim, extra)
    ref_grads = torch.autograd.grad(ref_outs, ref_inputs, [c.double() for c in cotangents])
    for name, a, b in zip(["q", "k", "v", "gates", "dx", "dq_weight", "dkv_weight", "dweight"],
                          list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))
    assert (grads[2][2] == 0).all()  # the memory that no token selected


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots,heads,dim,gated", [
    pytest.param(3, 2, 16, True, id="J3-gated"),
    pytest.param(1, 3, 24, False, id="J1-ungated-D24"),
])
def test_mix_stage_matches_unsort_sum_and_gated_norm(dtype, slots, heads, dim, gated, launch):
    gen = torch.Generator().manual_seed(42)
    num_tokens = 45
    memory = _routing(num_tokens, 4, slots - 1, gen) if slots > 1 else torch.zeros(num_tokens, 1, dtype=torch.long)
    layout = build_layout(memory, sequence_ids(3, 15, None, "cpu"), 3, 5)
    rank = layout.rank.to(DEVICE)
    norm = GatedRMSNorm(dim, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen))
    o = torch.randn(num_tokens * slots, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = torch.rand(num_tokens, slots, generator=gen).to(DEVICE).requires_grad_()
    gate = torch.randn(num_tokens, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_() if gated else None
    dout = torch.randn(num_tokens, heads, dim, generator=gen).to(DEVICE, dtype)
    inputs = [t for t in (o, weight, gate, norm.weight) if t is not None]
    fast = mix_gated_rms_norm(o, rank, weight, gate, norm.weight, norm.eps, launch=launch)
    fast_grads = torch.autograd.grad(fast, inputs, dout)
    layout = type(layout)(**{k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in vars(layout).items()})
    # The reference runs in float64 on the (upcast) inputs for both dtypes: a bf16 reference would carry rounding
    # noise of its own, which dominates the router weight's gradient where it is near zero in exact arithmetic
    # (one slot: the norm cancels the weight's scale).
    up = lambda t: t.double()  # noqa: E731
    per_token = unsort(up(o), layout).view(num_tokens, slots, heads, dim)
    mixed = (per_token * up(weight)[:, :, None, None].to(per_token.dtype)).sum(1)
    ref_norm = GatedRMSNorm(dim, eps=1e-5).to(DEVICE, mixed.dtype)
    ref_norm.weight = torch.nn.Parameter(up(norm.weight.detach()))
    ref = ref_norm(mixed, None if gate is None else up(gate))
    ref_grads = torch.autograd.grad(ref, [t for t in (o, weight, gate) if t is not None] + [ref_norm.weight], up(dout))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert fast.dtype == dtype
    assert rel_err(fast, ref) < tol
    for name, a, b in zip(["do", "dweight", "dgate", "dnorm"] if gated else ["do", "dweight", "dnorm"], fast_grads,
                          ref_grads):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,slots,channels", [(45, 3, 40), (9, 1, 16), (0, 3, 8)])
def test_slot_sum_adds_each_tokens_slots(dtype, num_tokens, slots, channels, launch):
    gen = torch.Generator().manual_seed(3)
    memory = _routing(num_tokens, 4, slots - 1, gen) if slots > 1 else torch.zeros(num_tokens, 1, dtype=torch.long)
    rank = build_layout(memory, torch.zeros(num_tokens, dtype=torch.long), 1, 5).rank.to(DEVICE)
    src = torch.randn(num_tokens * slots, channels, generator=gen).to(DEVICE, dtype)
    out = slot_kernels.slot_sum(src, rank, num_tokens, launch)
    ref = src.double()[rank].view(num_tokens, slots, channels).sum(1)
    assert out.dtype == dtype and out.shape == (num_tokens, channels)
    torch.testing.assert_close(out.double(), ref, atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=1e-2)


def test_slot_sum_rejects_a_rank_that_does_not_cover_the_slots():
    src, rank = torch.zeros(6, 4), torch.arange(6)
    for bad_rank, num_tokens in ((rank[:-1], 3), (rank, 4), (rank, 0)):
        with pytest.raises(ValueError, match="must index every one of the 6 slots"):
            slot_kernels.slot_sum(src, bad_rank, num_tokens)


@kernels
@pytest.mark.parametrize("has_beta,has_decay", [(True, True), (True, False), (False, True)],
                         ids=["beta-and-decay", "beta", "decay"])
@pytest.mark.parametrize("length", [300, 1, 0])
def test_scalar_gates_match_the_reference_gates(has_beta, has_decay, length):
    """beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias) of strided gate columns against fp64, values
    and every gradient, through saturated, tiny and ordinary logits (several row blocks at 300 rows)."""
    gen = torch.Generator().manual_seed(5)
    heads, cols = 3, 3 * (has_beta + has_decay)
    wide = torch.randn(length, cols + 5, generator=gen, dtype=torch.float64) * 6
    wide[:4, :] = torch.tensor([60.0, -60.0, 1e-3, -30.0])[:min(4, length), None]
    rest = wide[:, 2:2 + cols].to(DEVICE, torch.float32).requires_grad_()  # a row stride past its width
    a_log = torch.randn(heads, generator=gen).to(DEVICE).requires_grad_() if has_decay else None
    dt_bias = torch.randn(heads, generator=gen).to(DEVICE).requires_grad_() if has_decay else None
    g, beta = scalar_gates(rest, a_log, dt_bias, heads, has_beta)
    assert (g is not None) == has_decay and (beta is not None) == has_beta
    leaves = [t for t in (rest, a_log, dt_bias) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    r = ref_leaves[0]
    loss, ref_loss = 0.0, 0.0
    if has_beta:
        w = torch.randn(length, heads, generator=gen, dtype=torch.float64).to(DEVICE)
        ref_beta = torch.sigmoid(r[:, :heads])
        torch.testing.assert_close(beta.double(), ref_beta, atol=1e-6, rtol=1e-5)
        loss, ref_loss = loss + (beta.double() * w).sum(), ref_loss + (ref_beta * w).sum()
    if has_decay:
        w = torch.randn(length, heads, generator=gen, dtype=torch.float64).to(DEVICE)
        a = r[:, heads:] if has_beta else r
        ref_g = -ref_leaves[1].exp() * torch.nn.functional.softplus(a + ref_leaves[2])
        torch.testing.assert_close(g.double(), ref_g, atol=1e-6, rtol=1e-5)
        loss, ref_loss = loss + (g.double() * w).sum(), ref_loss + (ref_g * w).sum()
    if length == 0:
        return
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@kernels
def test_scalar_gates_without_a_gradient_for_one_output():
    """An unused beta gives its columns a zero gradient (and g's still flows)."""
    rest = torch.randn(40, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
    a_log, dt_bias = torch.zeros(2, device=DEVICE, requires_grad=True), torch.zeros(2, device=DEVICE)
    g, _beta = scalar_gates(rest, a_log, dt_bias, 2, True)
    g.sum().backward()
    assert torch.equal(rest.grad[:, :2], torch.zeros_like(rest.grad[:, :2]))
    assert (rest.grad[:, 2:] < 0).all() and a_log.grad is not None


def test_scalar_gates_reject_columns_that_do_not_match_the_rule():
    with pytest.raises(ValueError, match=r"rest must be \(L, 4\)"):
        scalar_gates(torch.zeros(5, 6), torch.zeros(2), torch.zeros(2), 2, True)
    with pytest.raises(ValueError, match="unit column stride"):
        scalar_gates(torch.zeros(4, 5).t(), None, None, 5, True)
    assert scalar_gates(torch.zeros(5, 0), None, None, 2, False) == (None, None)


@kernels
@pytest.mark.parametrize("rule,overrides,projections", [
    pytest.param("gated_delta", {}, "auto", id="gated_delta"),  # S / J = 5 / 3
    pytest.param("gated_delta", {}, "dense", id="gated_delta-dense"),  # every stream for every token
    # S / J = 4 / 2, on projection rows of 66 values padded to 80 (a multiple of 16 elements)
    pytest.param("delta", {"shared_memory": False}, "auto", id="delta-no-shared"),
    pytest.param("simple_gla", {"expand_v": 1.5}, "auto", id="simple_gla-K!=V"),
    pytest.param("gated_delta", {"num_memories": 8}, "auto", id="E8"),
    pytest.param("gated_delta", {"num_memories": 8}, "dense", id="E8-dense"),
    pytest.param("gated_delta", {"num_memories": 6, "topk": 1, "shared_memory": False}, "auto", id="E6-top1"),
])
def test_layer_with_slot_kernels_matches_reference_layer(rule, overrides, projections):
    """fp32: the selected streams' grouped projection on CPU (torch runs it in fp32 there; on CUDA it takes bf16
    only, see test_bf16_layer_against_fp32_reference), every stream's dense one on CUDA or when asked for. Under
    the interpreter the scan is the eager reference (the interpreted Triton scan is slow and not tested here)."""
    plan = _compare_layers(rule, torch.float32, {**overrides, "projections": projections}, tol=1e-4,
                           backend="triton" if NATIVE else "eager")
    assert plan.mix == "triton"
    assert plan.slots == ("grouped" if projections == "auto" and not NATIVE else "gathered")


@pytest.mark.skipif(not NATIVE, reason="bf16 end to end on the GPU")
@pytest.mark.parametrize("overrides,projections,grouped", [
    pytest.param({}, "auto", True, id="E4-grouped"),
    pytest.param({}, "dense", False, id="E4-dense"),
    pytest.param({"num_memories": 8}, "auto", True, id="E8-grouped"),
    pytest.param({"activation_memory": "balanced"}, "auto", True, id="E4-balanced-rebuilt-qkv"),
    pytest.param({"activation_memory": "lean"}, "auto", True, id="E4-lean-recomputed-projections"),
])
def test_bf16_layer_against_fp32_reference(overrides, projections, grouped):
    # 4 heads: per-stream rows of 2HK + 2H = 264 bf16 values, a multiple of 16 bytes as grouped_mm requires.
    plan = _compare_layers("gated_delta", torch.bfloat16, {**overrides, "projections": projections}, tol=5e-2,
                           hidden=128, heads=4, head_dim=32, stages="auto",
                           params=("q_proj.weight", "k_proj", "v_proj", "conv_weight", "o_proj.weight"))
    assert plan.slots in ("grouped", "gathered") and plan.mix == "triton"
    assert (plan.slots == "grouped") == (grouped and grouped_kernels_on(torch.device(DEVICE)))  # sm90 / sm100


@pytest.mark.skipif(not NATIVE, reason="bf16 autocast on the GPU")
@pytest.mark.parametrize("activation_memory", ["fast", "balanced", "lean"])
def test_mixed_precision_layer_against_fp32_reference(activation_memory):
    """fp32 weights under bf16 autocast (Lightning's ``bf16-mixed``): the projections run in bf16 from one cast of
    the input, so that the grouped product applies (recomputed with ``lean``) as with bf16 weights; the output and
    every gradient against the same layer in fp32 without autocast."""
    cfg = dict(hidden_size=128, num_heads=4, head_dim=32, num_memories=4, topk=2, shared_memory=True,
               backend="triton", num_layers=2)
    torch.manual_seed(0)
    mixed = MoMLayer(MoMConfig(**cfg, activation_memory=activation_memory)).to(DEVICE)
    ref = MoMLayer(MoMConfig(**cfg)).to(DEVICE)
    ref.load_state_dict(mixed.state_dict())
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(2, 41, 128, generator=gen).to(DEVICE)
    seq_id = sequence_ids(2, 41, None, DEVICE)
    x_mixed, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_mixed = mixed(x_mixed, seq_id, 2)[0]
        plan = mixed.plans.for_input(x_mixed)
    out_ref = ref(x_ref, seq_id, 2)[0]
    assert rel_err(out_mixed, out_ref) < 5e-2
    grad = torch.randn(out_ref.shape, generator=gen).to(DEVICE)
    out_mixed.float().backward(grad)
    out_ref.backward(grad)
    assert rel_err(x_mixed.grad, x_ref.grad) < 5e-2
    for (name, p), q in zip(mixed.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        if name in ("q_proj.weight", "k_proj", "v_proj", "conv_weight", "o_proj.weight"):
            assert rel_err(p.grad, q.grad) < 5e-2, (name, rel_err(p.grad, q.grad))
    assert plan.dtype == torch.bfloat16 and plan.mix == "triton"
    assert plan.slots == ("grouped" if grouped_kernels_on(torch.device(DEVICE)) else "gathered")


@kernels
@pytest.mark.skipif(NATIVE, reason="the CPU (interpreter, fp16) twin of test_mixed_precision_layer_against_fp32_"
                                   "reference, which runs bf16 autocast on a GPU")
@pytest.mark.parametrize("activation_memory", ["fast", "lean"])
def test_autocast_layer_against_fp64_reference(activation_memory):
    """The mixed-precision path on CPU: fp32 weights under fp16 autocast (the interpreter cannot run bf16; the
    mechanism is the same), the grouped product asked for by an explicit plan (torch runs it in fp16 on CPU). The
    projections take autocast's dtype from one cast of the input (``lean`` recomputes them), and the output and
    gradients match the fp64 reference layer to fp16 precision."""
    cfg = dict(hidden_size=32, num_heads=2, head_dim=16, num_memories=4, topk=2, shared_memory=True,
               backend="triton", num_layers=2)
    torch.manual_seed(0)
    config = MoMConfig(**cfg, activation_memory=activation_memory, stages="triton")
    mixed = MoMLayer(config)
    plan = dataclasses.replace(resolve_plan(config, "cpu", torch.float16), slots="grouped")
    assert plan.mix == "triton" and plan.scan == "triton"
    ref = MoMLayer(MoMConfig(**{**cfg, "backend": "eager", "stages": "reference"})).double()
    ref.load_state_dict(mixed.state_dict())
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(2, 37, 32, generator=gen)
    seq_id = sequence_ids(2, 37, None, "cpu")
    x_mixed, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        out_mixed = mixed(x_mixed, seq_id, 2, plan=plan)[0]
    out_ref = ref(x_ref, seq_id, 2)[0]
    assert out_mixed.dtype == torch.float16
    assert rel_err(out_mixed, out_ref) < 5e-3
    grad = torch.randn(out_ref.shape, generator=gen)
    out_mixed.float().backward(grad)
    out_ref.backward(grad.double())
    assert rel_err(x_mixed.grad, x_ref.grad) < 5e-3
    for (name, p), q in zip(mixed.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32, name
        assert rel_err(p.grad, q.grad) < 5e-3, (name, rel_err(p.grad, q.grad))


@pytest.mark.parametrize("major,grouped", [(8, False), (9, True), (10, True), (12, False)])
def test_grouped_projections_only_where_torch_has_grouped_kernels(major, grouped, monkeypatch):
    """On other GPUs ``torch._grouped_mm`` loops over the groups after reading their sizes on the host (a
    synchronisation in every step): the dense product runs there instead."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert grouped_kernels_on(torch.device("cuda", 0)) == grouped
    assert grouped_kernels_on(torch.device("cpu"))


def test_an_unknown_projection_choice_is_reported():
    with pytest.raises(ValueError, match="MoMConfig.projections must be one of"):
        MoMConfig(hidden_size=32, num_heads=2, head_dim=16, num_layers=1, projections="sparse")


def test_projections_take_the_autocast_dtype():
    x = torch.randn(3, 8)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(torch.arange(3)) == torch.int64


def _compare_layers(rule, dtype, overrides, tol, hidden=32, heads=2, head_dim=16, params=None, backend="triton",
                    stages="triton"):
    """Fast layer in ``dtype`` against the reference layer in fp64 (fp32 on CUDA) with the same weights; returns
    the fast layer's plan."""
    cfg = {**dict(hidden_size=hidden, num_heads=heads, head_dim=head_dim, num_memories=4, topk=2,
                  shared_memory=True, update_rule=rule, backend=backend, num_layers=2), **overrides}
    torch.manual_seed(0)
    fast = MoMLayer(MoMConfig(**cfg, stages=stages)).to(DEVICE, dtype)
    ref_dtype = torch.float32 if NATIVE else torch.float64
    ref = MoMLayer(MoMConfig(**{**cfg, "backend": "eager", "stages": "reference"})).to(DEVICE, ref_dtype)
    ref.load_state_dict(fast.state_dict())
    gen = torch.Generator().manual_seed(42)
    batch, seq_len = 2, 41
    x = torch.randn(batch, seq_len, hidden, generator=gen).to(DEVICE, dtype)
    seq_id = sequence_ids(batch, seq_len, None, DEVICE)
    x_fast, x_ref = x.clone().requires_grad_(), x.to(ref_dtype).requires_grad_()
    out_fast = fast(x_fast, seq_id, batch)[0]
    out_ref = ref(x_ref, seq_id, batch)[0]
    assert out_fast.dtype == dtype
    assert rel_err(out_fast, out_ref) < tol
    grad = torch.randn(out_ref.shape, generator=gen).to(DEVICE)
    out_fast.backward(grad.to(dtype))
    out_ref.backward(grad.to(ref_dtype))
    assert rel_err(x_fast.grad, x_ref.grad) < tol
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        if params is None or name in params:
            assert rel_err(p.grad, q.grad) < tol, (name, rel_err(p.grad, q.grad))
    return fast.plans.for_input(x_fast)


@kernels
@torch.no_grad()
def test_model_invariants_with_slot_kernels():
    """The model on the default CUDA path (Triton scan + slot/mix stages): no output depends on future tokens, on
    other batch rows or on other packed documents, and prefill (reference stages: it writes a conv cache) +
    decoding equals the full forward."""
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(vocab_size=37, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                                     num_memories=4, topk=2, shared_memory=True, backend="triton",
                                     stages="triton")).to(DEVICE).eval()
    ids = torch.randint(0, 37, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_model_invariants(model, ids, cut=25, cu_seqlens=[0, 1, 17, 40], prefill=30, atol=1e-4)
    plan = model.plan_for(DEVICE)
    assert plan.slots in ("grouped", "gathered") and plan.mix == "triton", plan.describe()


def _saved_bytes_and_grads(layer, x, seq_id, batch):
    """Bytes of the distinct storages the forward saves for the backward, the output and every gradient."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x, seq_id, batch)[0]
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out))
    grads = {"x": x.grad, **{name: p.grad.clone() for name, p in layer.named_parameters()}}
    layer.zero_grad(set_to_none=True)
    return sum(storages.values()), out.detach(), grads


@kernels
@pytest.mark.parametrize("projections", ["auto", "dense"])
@pytest.mark.parametrize("rule", ["gated_delta", "simple_gla"])
def test_leaner_activation_memory_rebuilds_scan_inputs(rule, projections):
    """With ``activation_memory="balanced"`` the Triton scan keeps the slot stage's sources instead of its q, k, v and
    rebuilds W, U and the triangular inverses (delta rules) in its backward; ``lean`` also keeps none of the
    projections where the slot stage projects the selected streams only (grouped product). The same output and
    gradients, and exactly those bytes less saved."""
    batch, seq_len = 2, 37
    x = torch.randn(batch, seq_len, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    seq_id = sequence_ids(batch, seq_len, None, DEVICE)
    results, grouped = {}, {}
    settings = ("fast", "balanced", "lean")
    for memory in settings:
        cfg = MoMConfig(hidden_size=32, num_heads=2, head_dim=16, num_memories=4, topk=2, shared_memory=True,
                        update_rule=rule, backend="triton", activation_memory=memory, stages="triton",
                        projections=projections)
        torch.manual_seed(0)  # the same weights for every setting
        layer = MoMLayer(cfg).to(DEVICE)
        results[memory] = _saved_bytes_and_grads(layer, x, seq_id, batch)
        grouped[memory] = layer.plans.for_input(x).slots == "grouped"
    row = layer._stream_weights(align=16).shape[1]
    # fp32: the grouped product runs on CPU, not on CUDA
    groups = projections == "auto" and grouped_mm_available(x.device, x.dtype, x.shape[-1], row)
    assert grouped == dict.fromkeys(settings, groups)
    kept, out, grads = results["fast"]
    tokens = batch * seq_len
    slots = tokens * 3  # top-2 + shared
    K, V, H, elt = cfg.head_dim, cfg.head_v_dim, cfg.num_heads, x.element_size()
    per_slot_and_head = 2 * K + V + (K + V if rule == "gated_delta" else 0)  # q, k, v (+ W, U)
    inverse = 64 * 4 if rule == "gated_delta" else 0  # the chunk's fp32 triangular inverse, one row per slot
    scan_bytes = slots * H * (per_slot_and_head * elt + inverse)
    # fast and balanced keep the selected streams' projections of every slot and the query projections; lean keeps
    # neither (all keep x, the weights and the group ends)
    projection_bytes = (slots * row + tokens * H * K) * elt if groups else 0
    for memory, saved_less in (("balanced", scan_bytes), ("lean", scan_bytes + projection_bytes)):
        kept_other, out_other, grads_other = results[memory]
        # Bit for bit where kernels run in order (the interpreter) and the products are the same; a GPU's atomic
        # reductions may reorder sums, and the grouped product sums the input and weight gradients in another
        # order.
        exact = not NATIVE and not (groups and memory == "lean")
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_other, out, **(dict(rtol=0, atol=0) if not NATIVE else tol))
        for name, grad in grads.items():
            torch.testing.assert_close(grads_other[name], grad, **tol,
                                       msg=lambda m, name=name, memory=memory: f"{memory} {name}: {m}")
        assert kept - kept_other == saved_less, memory


@kernels
@pytest.mark.parametrize("activation_memory", ["fast", "balanced", "lean"])
def test_first_forward_inside_an_activation_checkpoint(activation_memory, caplog):
    """The plan is resolved on the first forward, which may run inside a checkpointed block (FSDP recomputes every
    block, so the very first forward is checkpointed); the recompute must still match, and the gradients equal
    the plain ones (also when the scan rebuilds q, k, v from the slot stage's sources)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from mom_lit.model import MoMBlock

    cfg = MoMConfig(vocab_size=37, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, num_memories=4, topk=2,
                    shared_memory=True, backend="triton", activation_memory=activation_memory,
                    stages="auto" if NATIVE else "triton")
    torch.manual_seed(0)
    plain = MoMForCausalLM(cfg).to(DEVICE)
    checkpointed = MoMForCausalLM(cfg).to(DEVICE)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed, check_fn=lambda m: isinstance(m, MoMBlock))
    ids = torch.randint(0, 37, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses = []
    with caplog.at_level("INFO", logger="mom_lit"):
        for model in (checkpointed, plain):  # the checkpointed model first: its forward resolves the plan
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
    for model in (checkpointed, plain):
        plan = model.plan_for(DEVICE)
        assert plan.slots in ("grouped", "gathered") and plan.mix == "triton", plan.describe()
    # the paths are logged once per model (and device and dtype), not per layer or call
    assert sum("MoM layer paths" in r.getMessage() for r in caplog.records) == 2
    torch.testing.assert_close(losses[0], losses[1])
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in checkpointed.named_parameters()}
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


@kernels
def test_kernels_that_cannot_build_leave_the_reference_path():
    """Launch settings that Triton cannot build (rows per program must be a power of two): the trial run that
    ``resolve_plan`` does before choosing the Triton stages on CUDA reports failure with one warning."""
    cfg = MoMConfig(hidden_size=32, num_heads=2, head_dim=16, num_memories=4, topk=2, backend="triton")
    bad = dataclasses.replace(DEFAULT_LAUNCH, conv_fwd=StageLaunch(3, 2),
                              mix_fwd=StageLaunch(3, 2))
    with pytest.warns(RuntimeWarning, match="using the reference stages"):
        assert not stage_kernels_build(cfg, DEVICE, torch.float32, bad)
    assert stage_kernels_build(cfg, DEVICE, torch.float32)
    if NATIVE:
        plan = resolve_plan(cfg, DEVICE, torch.float32, stage_launch=bad)
        assert plan.slots == "compiled" and plan.mix == "torch"


def test_layout_rank_inverts_slot_order():
    gen = torch.Generator().manual_seed(42)
    memory = _routing(50, 4, 2, gen)
    layout = build_layout(memory, sequence_ids(2, 25, None, "cpu"), 2, 5)
    assert torch.equal(layout.slot[layout.rank], torch.arange(150))
    assert torch.equal(layout.rank[layout.slot], torch.arange(150))


@pytest.mark.skipif(NATIVE or INTERPRETED, reason="on a GPU the kernels run natively; already interpreted here")
def test_fast_paths_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and " failed" not in proc.stdout, report


def test_projected_slot_conv_hands_out_kept_projections_only():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="keep=False hands the scan its inputs"):
        projected_slot_conv(x, x, x, x, x, x, x, x, 1, 4, 4, 0, keep=False,
                            sources=QKVSources("projections", (), 1, 4, 4))
    with pytest.raises(ValueError, match="kind must be"):
        QKVSources("outputs", (), 1, 4, 4)
