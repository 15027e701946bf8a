"""Triton scan (``mom_lit.ops.scan.triton``) against the fp64 references: outputs, final states and every gradient.

On a machine without CUDA the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``) on small shapes;
with CUDA the same small cases run on the GPU and the full-size cases (head dims 64..256, bf16/fp16, hundreds of
segments, extreme gates) run too. Every buffer the scan allocates is filled with NaN first, so a row that a kernel
fails to write shows up as NaN. The oracle is ``recurrent_scan`` (token loop) for small cases and ``chunk_scan``
for large ones, both on fp64 copies of the inputs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from closeness import assert_close

from mom_lit.ops.scan.chunk import chunk_scan
from mom_lit.ops.scan.recurrent import recurrent_scan

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    # The interpreter must be on before anything (torch.compile included) imports Triton's language: in a process
    # that compiled earlier, interpreted kernels fail to resolve tl.* helpers. tests/test_triton_interpreter.py
    # runs this module in a fresh process with TRITON_INTERPRET=1.
    pytest.skip("CPU: runs in a fresh interpreter process (tests/test_triton_interpreter.py)", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")


@contextlib.contextmanager
def _interpreter_without_gpu():
    """Set ``TRITON_INTERPRET=1`` while the block runs when there is no CUDA device (restored afterwards)."""
    if ON_GPU:
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _import_scan_module():
    """Import the Triton scan; without CUDA, (re)import its kernels under the interpreter.

    Triton decides between compiling and interpreting when a kernel is decorated, i.e. at module import, so a
    copy imported earlier without the interpreter is dropped first.
    """
    with _interpreter_without_gpu():
        if not ON_GPU:
            for name in [m for m in sys.modules if m.startswith("mom_lit.ops.scan.triton")]:
                del sys.modules[name]
        import mom_lit.ops.scan.triton.scan as module
    return module


scan_module = _import_scan_module()
DEFAULT_LAUNCH = scan_module.DEFAULT_LAUNCH
from mom_lit.ops.scan.triton.chunk_index import build_chunk_index  # noqa: E402  (after the interpreter switch)

# relative RMS error allowed against the fp64 oracle, per input precision and tensor ("grad": any other gradient).
# dbeta sums large, nearly cancelling products (most of all without a gate, where nothing is ever forgotten), so
# the rounding of the half-precision intermediates (W, U, per-chunk states) shows most there.
TOL = {
    torch.float32: {"o": 1e-4, "ht": 1e-4, "grad": 1e-4},
    torch.float16: {"o": 5e-3, "ht": 5e-3, "grad": 1e-2, "dbeta": 3e-2},
    torch.bfloat16: {"o": 1e-2, "ht": 1e-2, "grad": 2e-2, "dbeta": 8e-2},
}
RULES = {  # rule -> (scalar gate, delta rule)
    "linear": (False, False),
    "simple_gla": (True, False),
    "delta": (False, True),
    "gated_delta": (True, True),
}


@pytest.fixture(autouse=True, scope="module")
def interpreter_env():
    """The interpreter also reads the variable while it runs kernels."""
    with _interpreter_without_gpu():
        yield


def nan_filled(*shape, dtype, device):
    """The scan's allocator in these tests: every tensor it allocates starts as NaN, so unwritten rows cannot pass
    as zeros."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


triton_scan = functools.partial(scan_module.triton_scan, empty=nan_filled)


def make_inputs(rule, lengths=None, batch=1, seq_len=None, heads=2, key_dim=32, value_dim=16,
                dtype=torch.float32, initial=True, gates="normal", seed=42):
    """Random scan inputs on DEVICE; ``lengths`` packs segments (B = 1), else ``batch`` rows of ``seq_len``."""
    gen = torch.Generator().manual_seed(seed)
    use_g, is_delta = RULES[rule]
    if lengths is not None:
        seq_len = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        states = len(lengths)
    else:
        cu, states = None, batch
    shape = (batch if lengths is None else 1, seq_len, heads)
    q = torch.randn(*shape, key_dim, generator=gen)
    k = torch.randn(*shape, key_dim, generator=gen)
    if is_delta:
        k = F.normalize(k, dim=-1)  # the delta rule is contractive only for unit keys and beta in [0, 1]
    else:
        k = k * key_dim ** -0.5
    v = torch.randn(*shape, value_dim, generator=gen)
    g = beta = None
    if use_g:
        if gates == "extreme":  # the state wiped out (exp(-30)) at every other token, else kept almost unchanged
            g = torch.full(shape, -1e-4).index_fill_(1, torch.arange(0, seq_len, 2), -30.0)
        else:
            g = F.logsigmoid(torch.randn(*shape, generator=gen) + 2.0)
    if is_delta:
        if gates == "extreme":
            beta = (torch.rand(*shape, generator=gen) < 0.5).float()
        else:
            beta = torch.rand(*shape, generator=gen)
    h0 = torch.randn(states, heads, key_dim, value_dim, generator=gen) if initial else None
    # q, k, v and beta in the input precision; log-gates and start states stay fp32 as the model keeps them
    q, k, v = (x.to(DEVICE, dtype) for x in (q, k, v))
    beta = None if beta is None else beta.to(DEVICE, dtype)
    g = None if g is None else g.to(DEVICE)
    h0 = None if h0 is None else h0.to(DEVICE)
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, cu_seqlens=cu)


def test_results_and_buffers_come_from_the_given_allocator():
    """The allocator argument reaches every allocation, forward and backward: the NaN-filled one of these tests
    is in effect wherever the kernels write."""
    made = []

    def recording(*shape, dtype, device):
        made.append(nan_filled(*shape, dtype=dtype, device=device))
        return made[-1]

    inputs = make_inputs("gated_delta", lengths=[5, 0, 70])
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "g", "beta")}
    o, ht = scan_module.triton_scan(**{**inputs, **leaves}, empty=recording)
    forward = {t.data_ptr() for t in made}
    assert o.data_ptr() in forward and ht.data_ptr() in forward
    (o.sum() + ht.sum()).backward()
    assert len(made) > len(forward), "the backward allocated nothing through the given allocator"
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves.values())


def check_against_oracle(inputs, dtype, oracle=recurrent_scan, output_final_state=True, seed=0, recompute=None,
                         launch=None):
    """Compare outputs, final states and the gradients of a random linear loss with the fp64 oracle."""
    names = [n for n in ("q", "k", "v", "g", "beta", "initial_state") if inputs[n] is not None]
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in names}
    o, ht = triton_scan(**{**inputs, **leaves}, output_final_state=output_final_state, recompute=recompute,
                        launch=launch)
    assert o.dtype == inputs["v"].dtype

    ref_leaves = {n: inputs[n].detach().double().requires_grad_() for n in names}
    ref_o, ref_ht = oracle(**{**inputs, **ref_leaves}, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(ref_o.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dht = torch.randn(ref_ht.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    loss = (o.double() * do).sum()
    ref_loss = (ref_o * do).sum()
    if output_final_state:
        assert ht.dtype == torch.float32
        loss = loss + (ht.double() * dht).sum()
        ref_loss = ref_loss + (ref_ht * dht).sum()
    else:
        assert ht is None
    grads = torch.autograd.grad(loss, list(leaves.values()))
    # with no tokens at all the oracle's output does not depend on q, k, v: their gradients are zeros
    ref_grads = torch.autograd.grad(ref_loss, list(ref_leaves.values()), allow_unused=True)
    ref_grads = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(ref_leaves.values(), ref_grads)]

    tol = TOL[dtype]
    assert_close(o, ref_o, tol["o"], name="o")
    if output_final_state:
        assert_close(ht, ref_ht, tol["ht"], name="final_state")
    for name, grad, ref in zip(names, grads, ref_grads):
        assert grad.dtype == inputs[name].dtype, f"d{name} has dtype {grad.dtype}"
        assert_close(grad, ref, tol.get(f"d{name}", tol["grad"]), name=f"d{name}")


# ---------------------------------------------------------------- small cases (interpreter on CPU, or GPU)

@pytest.mark.parametrize("rule", list(RULES))
def test_varlen_with_empty_and_single_token_segments(rule):
    inputs = make_inputs(rule, lengths=[70, 0, 1, 79])
    check_against_oracle(inputs, torch.float32)


def test_equal_rows_without_cu_seqlens_or_final_state():
    inputs = make_inputs("gated_delta", batch=2, seq_len=67, key_dim=16, value_dim=32, initial=False)
    check_against_oracle(inputs, torch.float32, output_final_state=False)


@pytest.mark.parametrize("rule", ["gated_delta", "linear"])
def test_head_dims_that_leave_partial_state_blocks(rule):
    # K = 80: the second 64-row register block of the sequential passes is partly outside the state; V = 40 is
    # not a multiple of the value block: the masked loads and stores of states and token tiles
    inputs = make_inputs(rule, lengths=[70, 1, 64], key_dim=80, value_dim=40)
    check_against_oracle(inputs, torch.float32)


@pytest.mark.parametrize("rule", ["gated_delta", "simple_gla"])
def test_extreme_gates_and_write_strengths(rule):
    inputs = make_inputs(rule, lengths=[64, 75, 3], gates="extreme", seed=7)
    check_against_oracle(inputs, torch.float32)


def test_no_tokens_passes_initial_state_through():
    inputs = make_inputs("gated_delta", lengths=[0, 0], heads=1)
    check_against_oracle(inputs, torch.float32)


@pytest.mark.parametrize("recompute", ["none", "wy"])
@pytest.mark.parametrize("rule", list(RULES))
def test_backward_with_kept_or_rebuilt_intermediates(rule, recompute):
    """The default rebuilds the chunk states in the backward; ``"none"`` keeps them, ``"wy"`` rebuilds W and U too:
    every choice passes the same checks."""
    inputs = make_inputs(rule, lengths=[70, 0, 1, 130], heads=2)
    check_against_oracle(inputs, torch.float32, recompute=recompute)


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
        not ON_GPU, reason="bf16 kernels need a GPU (the interpreter mishandles bf16)")),
])
def test_recomputed_chunk_states_equal_the_forward_ones(dtype):
    # in bf16 the forward rounds U to its stored precision before the state update, as the recomputation reads it
    inputs = make_inputs("gated_delta", lengths=[70, 0, 1, 130], heads=2, dtype=dtype)
    flat = {n: None if x is None else x.squeeze(0).contiguous()
            for n, x in inputs.items() if n in ("q", "k", "v", "g", "beta")}  # (T, H, *)
    cu = inputs["cu_seqlens"]
    _, _, saved = scan_module._forward(DEFAULT_LAUNCH, flat["q"], flat["k"], flat["v"], flat["g"], flat["beta"], 0.5,
                                       inputs["initial_state"], cu, False, "none", empty=nan_filled)
    index, gamma, tinv, w, u, h = saved
    real = int(index.chunk_offsets[-1])  # chunks past the real count are never written
    again, _ = scan_module._state_pass(DEFAULT_LAUNCH, flat["k"], flat["v"], w, u, gamma, inputs["initial_state"],
                                       index, cu, store_final=False, u_final=True, empty=nan_filled)
    assert torch.equal(again[:real], h[:real])
    # rebuilding W and U as well gives the same W, U and states
    w2, u2 = scan_module._wy_apply(DEFAULT_LAUNCH, flat["k"], flat["v"], flat["beta"], gamma, tinv, index, cu,
                                   empty=nan_filled)
    assert torch.equal(w2, w)
    again, _ = scan_module._state_pass(DEFAULT_LAUNCH, flat["k"], flat["v"], w2, u2, gamma, inputs["initial_state"],
                                       index, cu, store_final=False, u_final=False, empty=nan_filled)
    assert torch.equal(u2, u) and torch.equal(again[:real], h[:real])


@pytest.mark.parametrize("tiles", [(16, 16), (64, 16), (16, 64)], ids=["narrow", "wide-k", "wide-v"])
@pytest.mark.parametrize("rule", ["gated_delta", "simple_gla"])
def test_backward_tile_widths(rule, tiles):
    """The per-chunk kernels loop over (or split into programs by) key and value tiles of their launch's widths:
    several tiles per dim, or one wider than the dim (capped), give the same outputs and gradients."""
    block_k, block_v = tiles
    launch = scan_module.LaunchConfig(**{name: scan_module.Launch(4, 2, block_k, block_v)
                                         for name in ("output", "du_local", "dqk", "wy_bwd")})
    inputs = make_inputs(rule, lengths=[70, 1, 45], key_dim=32, value_dim=48)
    check_against_oracle(inputs, torch.float32, launch=launch)


@pytest.mark.parametrize("recompute", ["states", "wy"])
def test_sequential_passes_take_their_own_value_blocks(recompute):
    """The forward's pass, the backward's recomputation of the states and the backward's pass each take their own
    launch's V-block (0: ``state_block_v``): different blocks per pass, several per value dim or one wider than it
    (capped at the padded dim), give the same outputs and gradients. With ``recompute="wy"`` the backward reruns
    the forward's pass (its V-block) instead of the recomputation."""
    Launch = scan_module.Launch
    launch = scan_module.LaunchConfig(state_fwd=Launch(4, 2, block_v=16), state_recompute=Launch(4, 2, block_v=64),
                                      state_bwd=Launch(4, 2), state_block_v=32)
    assert [scan_module._state_block_v(48, getattr(launch, name), launch) for name in
            ("state_fwd", "state_recompute", "state_bwd")] == [16, 64, 32]
    assert scan_module._state_block_v(16, launch.state_recompute, launch) == 16
    inputs = make_inputs("gated_delta", lengths=[70, 1, 45], key_dim=32, value_dim=48)
    check_against_oracle(inputs, torch.float32, recompute=recompute, launch=launch)


@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
def test_wy_products_keep_fp32_operands_for_fp16(rule):
    """fp16 inputs keep fp32 (tf32) operands in the products with the triangular inverse whatever ``wy_products``
    says (fp16's range is too narrow for these gradients): both settings give the same bits, within the fp16
    tolerances. (bf16 rounds them with "input", the default: the full-size bf16 cases below, on a GPU.)"""
    inputs = make_inputs(rule, lengths=[70, 1, 45], key_dim=32, value_dim=48, dtype=torch.float16)
    check_against_oracle(inputs, torch.float16)
    results = []
    for wy_products in ("input", "tf32"):
        launch = scan_module.LaunchConfig(wy_products=wy_products)
        leaves = {n: inputs[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "g", "beta")
                  if inputs[n] is not None}
        o, ht = triton_scan(**{**inputs, **leaves}, launch=launch)
        results.append([o, ht, *torch.autograd.grad(o.float().sum() + ht.sum(), list(leaves.values()))])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(not ON_GPU, reason="bf16 kernels need a GPU (the interpreter mishandles bf16)")
@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
def test_gpu_wy_products_tf32_bf16(rule):
    """The fp32-operand setting of the WY products (the default rounds them to bf16) at a full-size bf16 case."""
    inputs = make_inputs(rule, lengths=[700, 1, 64, 1000, 333], heads=4, key_dim=128, value_dim=128,
                         dtype=torch.bfloat16, seed=13)
    check_against_oracle(inputs, torch.bfloat16, oracle=chunk_scan,
                         launch=scan_module.LaunchConfig(wy_products="tf32"))


def test_bf16_wy_products_only_with_full_tiles():
    """bf16 operands in the products with the triangular inverse only where both dims fill 64-wide tiles (narrower
    bf16 products faulted on an H200 with Triton 3.6); fp16 and fp32 never round them."""
    low = scan_module.LaunchConfig(wy_products="input")
    assert scan_module._wy_low(low, torch.bfloat16, 256, 256) and scan_module._wy_low(low, torch.bfloat16, 64, 128)
    for K, V in ((32, 16), (64, 32), (128, 16), (32, 64)):
        assert not scan_module._wy_low(low, torch.bfloat16, K, V)
    assert not scan_module._wy_low(low, torch.float16, 256, 256)
    assert not scan_module._wy_low(low, torch.float32, 256, 256)
    assert not scan_module._wy_low(scan_module.LaunchConfig(wy_products="tf32"), torch.bfloat16, 256, 256)


def test_value_tiles_never_narrower_than_key_tiles():
    """Per-chunk kernels widen value tiles to the key tile's width (against the bf16 faults seen on an H200 at
    narrow head dims); explicit launch tile widths are kept from a value dim of 64 on."""
    assert scan_module._chunk_blocks(256, 256) == (64, 64)
    assert scan_module._chunk_blocks(64, 32) == (64, 64)
    assert scan_module._chunk_blocks(32, 16) == (32, 32)
    assert scan_module._chunk_blocks(16, 256) == (16, 64)
    assert scan_module._tiles(scan_module.Launch(4, 1), 64, 16) == {"BK": 64, "BV": 64}
    assert scan_module._tiles(scan_module.Launch(4, 1, block_k=64, block_v=16), 64, 16) == {"BK": 64, "BV": 64}
    assert scan_module._tiles(scan_module.Launch(4, 1, block_k=128, block_v=64), 128, 32) == {"BK": 128, "BV": 128}
    assert scan_module._tiles(scan_module.Launch(4, 1, block_k=128, block_v=64), 256, 256) == {"BK": 128, "BV": 64}
    assert scan_module._tiles(scan_module.Launch(4, 1, block_k=16, block_v=16), 32, 48) == {"BK": 16, "BV": 16}


def test_launch_rejects_unknown_wy_products():
    with pytest.raises(ValueError, match="wy_products"):
        scan_module.LaunchConfig(wy_products="fp8")


def test_launch_rejects_tile_widths_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="block_k"):
        scan_module.Launch(4, 2, block_k=96)
    with pytest.raises(ValueError, match="block_v"):
        scan_module.Launch(4, 2, block_v=8)


@pytest.mark.parametrize("lengths", [[5], [0, 64, 0, 65, 1, 0], [128, 127, 200]], ids=["one", "empties", "long"])
def test_chunk_index_maps_every_chunk_once(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    index = build_chunk_index(cu, int(cu[-1]), 64)
    expected = [(n, s) for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())) for s in range(a, b, 64)]
    seg, start = index.chunk_seg.tolist(), index.chunk_start.tolist()
    assert index.max_chunks >= len(expected)
    assert list(zip(seg, start))[: len(expected)] == expected
    assert all(s == -1 for s in seg[len(expected):])
    assert index.chunk_offsets[-1].item() == len(expected)
    # the state passes take segments longest first: a permutation, by decreasing chunk count, ties in order
    chunks = [-(-n // 64) for n in lengths]
    assert index.longest_first.tolist() == sorted(range(len(lengths)), key=lambda n: (-chunks[n], n))


def test_rejects_unsupported_arguments():
    inputs = make_inputs("gated_delta", lengths=[3])
    with pytest.raises(ValueError, match="gk"):
        triton_scan(**{**inputs, "g": None}, gk=torch.zeros_like(inputs["q"]))
    with pytest.raises(ValueError, match="chunk_size"):
        triton_scan(**inputs, chunk_size=32)
    with pytest.raises(ValueError, match="recompute"):
        triton_scan(**inputs, recompute="all")
    with pytest.raises(ValueError, match="share one dtype"):
        triton_scan(**{**inputs, "v": inputs["v"].half()})
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        triton_scan(**{**inputs, "q": inputs["q"].double(), "k": inputs["k"].double(), "v": inputs["v"].double()})


# ---------------------------------------------------------------- full-size cases (CUDA only)

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
MIXED_LENGTHS = [1000, 0, 1, 63, 64, 65, 129, 0, 300, 2, 517]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule", list(RULES))
def test_gpu_rules_mixed_lengths(rule, dtype):
    inputs = make_inputs(rule, lengths=MIXED_LENGTHS, heads=4, key_dim=128, value_dim=128, dtype=dtype)
    check_against_oracle(inputs, dtype, oracle=chunk_scan)


@gpu
@pytest.mark.parametrize("key_dim,value_dim", [(64, 64), (256, 256), (128, 64), (64, 256), (32, 16), (64, 32),
                                               (16, 16), (128, 32)])
def test_gpu_head_dims_bf16(key_dim, value_dim):
    inputs = make_inputs("gated_delta", lengths=MIXED_LENGTHS, heads=4, key_dim=key_dim, value_dim=value_dim,
                         dtype=torch.bfloat16, seed=3)
    check_against_oracle(inputs, torch.bfloat16, oracle=chunk_scan)


@gpu
def test_gpu_fp16():
    inputs = make_inputs("gated_delta", lengths=MIXED_LENGTHS, heads=4, key_dim=128, value_dim=128,
                         dtype=torch.float16, seed=5)
    check_against_oracle(inputs, torch.float16, oracle=chunk_scan)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_many_short_segments(dtype):
    gen = torch.Generator().manual_seed(11)
    lengths = torch.randint(0, 40, (300,), generator=gen).tolist()
    inputs = make_inputs("gated_delta", lengths=lengths, heads=2, key_dim=64, value_dim=64, dtype=dtype)
    check_against_oracle(inputs, dtype, oracle=chunk_scan)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_extreme_gates(dtype):
    inputs = make_inputs("gated_delta", lengths=MIXED_LENGTHS, heads=4, key_dim=256, value_dim=256, dtype=dtype,
                         gates="extreme", seed=13)
    check_against_oracle(inputs, dtype, oracle=chunk_scan)


@gpu
@pytest.mark.parametrize("recompute", ["states", "none", "wy"])
def test_gpu_equal_rows_bf16(recompute):
    inputs = make_inputs("gated_delta", batch=3, seq_len=1000, heads=4, key_dim=256, value_dim=256,
                         dtype=torch.bfloat16, initial=False, seed=17)
    check_against_oracle(inputs, torch.bfloat16, oracle=chunk_scan, recompute=recompute)
