"""The slot stage (``mom_lit.ops.slots``) against its reference: gather, short convolution, SiLU and L2 norm of the
slot inputs (``slot_conv``, and ``projected_slot_conv`` with the grouped projections), the slot sum and the scalar
gates, through their public functions with explicit launch settings: outputs and every gradient.

The kernels run natively on a GPU; on CPU ``tests/test_triton_interpreter.py`` reruns this file under
``TRITON_INTERPRET=1`` in a fresh process (the interpreter must be active before Triton is first used).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="the slot stage's fast path is Triton kernels (triton is not installed)")

# launch: a fixture (each test with the library's launch settings and with small blocks)
from stage_cases import (DEVICE, DTYPES, NATIVE, SMALL_LAUNCH, kernels, launch,  # noqa: E402,F401
                         rel_err, routing)

from mom_lit.layout import build_layout, sequence_ids  # noqa: E402
from mom_lit.norm import l2_normalize  # noqa: E402
from mom_lit.ops.slots import QKVSources, projected_slot_conv, slot_conv, varlen_short_conv  # noqa: E402
from mom_lit.ops.slots import kernels as slot_kernels  # noqa: E402
from mom_lit.ops.slots.gates import scalar_gates  # noqa: E402
from mom_lit.ops.stage_launch import StageLaunch, StageLaunchConfig  # noqa: E402


@pytest.fixture(params=["default-launch", "small-launch", "tiles-small-launch"])
def conv_launch(request):
    """The slot stage's launch settings, with each transposed-convolution kernel ("taps" and "tiles")."""
    return {"default-launch": None, "small-launch": SMALL_LAUNCH,
            "tiles-small-launch": dataclasses.replace(SMALL_LAUNCH, dx_kernel="tiles")}[request.param]


def test_stage_launch_config_rejects_spans_that_overlap():
    with pytest.raises(ValueError, match="dx_span"):
        StageLaunchConfig(conv_bwd_dx=StageLaunch(16, 4), dx_span=20)
    with pytest.raises(ValueError, match="dx_kernel"):
        StageLaunchConfig(dx_kernel="3d")


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
    memory = routing(num_tokens, num_memories, topk, gen)
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
@pytest.mark.parametrize("num_tokens,slots,channels", [(45, 3, 40), (9, 1, 16), (0, 3, 8)])
def test_slot_sum_adds_each_tokens_slots(dtype, num_tokens, slots, channels, launch):
    gen = torch.Generator().manual_seed(3)
    memory = routing(num_tokens, 4, slots - 1, gen) if slots > 1 else torch.zeros(num_tokens, 1, dtype=torch.long)
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


def test_projected_slot_conv_hands_out_kept_projections_only():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="keep=False hands the scan its inputs"):
        projected_slot_conv(x, x, x, x, x, x, x, x, 1, 4, 4, 0, keep=False,
                            sources=QKVSources("projections", (), 1, 4, 4))
    with pytest.raises(ValueError, match="kind must be"):
        QKVSources("outputs", (), 1, 4, 4)
