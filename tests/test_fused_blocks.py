"""Memory-lean RMSNorm and SwiGLU MLP (``mom_lit.fused``) against the plain modules: outputs, all gradients,
and what they keep for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from closeness import assert_close

from mom_lit.losses import linear_cross_entropy
from mom_lit.norm import RMSNorm
from mom_lit.fused import FusedRMSNorm, compiled_body, rms_norm, swiglu_mlp

# On CUDA the fused bodies run through torch.compile: the same checks cover that path there.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]

# fp32: the same arithmetic up to the order of operations. bf16: the plain modules round some intermediates
# (SiLU, the product) to bf16 where the fused ones stay fp32, so they are compared by relative RMS error.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def assert_same_dtype_and_close(actual, expected, tol, msg=""):
    assert actual.dtype == expected.dtype, msg
    assert_close(actual, expected, tol, floor=1e-12, name=msg)


@pytest.fixture(autouse=True)
def default_device_back_to_cpu():
    yield
    torch.set_default_device("cpu")


def _saved_bytes(fn, *args) -> int:
    """Bytes of the distinct non-leaf tensors autograd keeps for the backward of ``fn(*args)``."""
    leaves = {a.untyped_storage().data_ptr() for a in args}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in leaves:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 7, 48), (1, 1, 16), (5, 33)], ids=["3d", "one-row", "2d"])
def test_rms_norm_matches_plain_module(shape, dtype, device):
    torch.set_default_device(device)
    torch.manual_seed(42)
    plain = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(shape[-1]) * 0.5 + 1)
    plain = plain.to(dtype)
    fused = FusedRMSNorm(shape[-1], eps=1e-5).to(dtype)
    fused.load_state_dict(plain.state_dict())
    x = (torch.randn(shape) * 3).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fused(x1), plain(x2)
    assert y1.dtype == dtype and y1.shape == x.shape
    assert_same_dtype_and_close(y1, y2, TOL[dtype])
    dy = torch.randn(shape).to(dtype)
    y1.backward(dy)
    y2.backward(dy)
    assert_same_dtype_and_close(x1.grad, x2.grad, TOL[dtype])
    assert_same_dtype_and_close(fused.weight.grad, plain.weight.grad, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_mlp_matches_plain(dtype, device):
    torch.set_default_device(device)
    torch.manual_seed(42)
    x = torch.randn(2, 9, 24).to(dtype)
    w_gu = (torch.randn(2 * 40, 24) * 0.3).to(dtype)
    w_d = (torch.randn(24, 40) * 0.3).to(dtype)
    ins1 = [t.clone().requires_grad_() for t in (x, w_gu, w_d)]
    ins2 = [t.clone().requires_grad_() for t in (x, w_gu, w_d)]
    out1 = swiglu_mlp(*ins1)
    gate, up = (ins2[0] @ ins2[1].t()).chunk(2, dim=-1)
    out2 = (F.silu(gate) * up) @ ins2[2].t()
    assert_same_dtype_and_close(out1, out2, TOL[dtype])
    dout = torch.randn(out1.shape).to(dtype)
    out1.backward(dout)
    out2.backward(dout)
    for name, a, b in zip(("dx", "dw_gate_up", "dw_down"), ins1, ins2):
        assert_same_dtype_and_close(a.grad, b.grad, TOL[dtype], msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_blocks_under_autocast(device):
    """Mixed precision as Lightning's ``bf16-mixed`` runs it: fp32 weights and inputs, bf16 autocast around the
    forward only. The backward of the custom functions runs outside autocast and must still combine the bf16
    activations with the fp32 weights (and return fp32 weight gradients)."""
    torch.set_default_device(device)
    torch.manual_seed(3)
    x = torch.randn(2, 9, 24)
    w_gu, w_d, w_n = torch.randn(2 * 40, 24) * 0.3, torch.randn(24, 40) * 0.3, 1 + 0.1 * torch.randn(24)
    ins1 = [t.clone().requires_grad_() for t in (x, w_gu, w_d, w_n)]
    ins2 = [t.clone().requires_grad_() for t in (x, w_gu, w_d, w_n)]
    with torch.autocast(device, dtype=torch.bfloat16):
        out1 = swiglu_mlp(rms_norm(ins1[0], ins1[3], 1e-6), ins1[1], ins1[2])
        h = ins2[0] * torch.rsqrt(ins2[0].pow(2).mean(-1, keepdim=True) + 1e-6) * ins2[3]
        gate, up = (h @ ins2[1].t()).chunk(2, dim=-1)
        out2 = (F.silu(gate) * up) @ ins2[2].t()
    assert out1.dtype == out2.dtype == torch.bfloat16
    assert_same_dtype_and_close(out1.float(), out2.float(), 2e-2)
    dout = torch.randn(out1.shape, dtype=torch.bfloat16)
    out1.backward(dout)
    out2.backward(dout)
    for name, a, b in zip(("dx", "dw_gate_up", "dw_down", "dw_norm"), ins1, ins2):
        assert a.grad.dtype == torch.float32, name
        assert_same_dtype_and_close(a.grad, b.grad, 3e-2, msg=name)


def test_backward_keeps_only_the_bf16_inputs():
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(256, dtype=torch.bfloat16, requires_grad=True)
    # x itself and one fp32 1/rms per row; the plain module keeps fp32 copies of x and of its output
    assert _saved_bytes(lambda a, b: rms_norm(a, b, 1e-6), x, w) == 64 * 4
    plain = RMSNorm(256).to(torch.bfloat16)
    assert _saved_bytes(plain, x) >= 2 * 64 * 256 * 4
    w_gu = torch.randn(2 * 128, 256, dtype=torch.bfloat16, requires_grad=True)
    w_d = torch.randn(256, 128, dtype=torch.bfloat16, requires_grad=True)
    assert _saved_bytes(swiglu_mlp, x, w_gu, w_d) == 64 * 2 * 128 * 2  # the (R, 2I) gate|up projection only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_loss_matches_full_logits_on_device(dtype, device):
    torch.manual_seed(42)
    hidden = torch.randn(300, 32, device=device).to(dtype)
    weight = (torch.randn(1000, 32, device=device) * 0.5).to(dtype)
    targets = torch.randint(0, 1000, (300,), device=device)
    targets[::7] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = linear_cross_entropy(h1, w1, targets, chunk_rows=128)
    ref = F.cross_entropy((h2 @ w2.t()).float(), targets, ignore_index=-100, reduction="sum")
    assert_same_dtype_and_close(ours, ref, TOL[dtype], "loss")
    ours.backward()
    ref.backward()
    assert_same_dtype_and_close(h1.grad, h2.grad, TOL[dtype], "dhidden")
    assert_same_dtype_and_close(w1.grad, w2.grad, TOL[dtype], "dweight")


@torch.library.custom_op("mom_lit_tests::eager_only_double", mutates_args=())
def _eager_only_double(h: torch.Tensor) -> torch.Tensor:
    return h * 2


@_eager_only_double.register_fake
def _(h):  # what the compiler traces with: it fails there, as a broken compiler would
    raise ValueError("no compiler here")


def test_compiled_bodies_match_eager_and_a_failing_compiler_names_the_way_out():
    """``compile=True`` runs the bodies through torch.compile on any device, with the eager result; a compiler
    that fails raises, naming how to run the bodies eagerly (no process-wide switch to eager)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    w = torch.randn(16, generator=gen, requires_grad=True)
    outs = []
    for compile in (False, True):
        y = rms_norm(x, w, 1e-6, compile)
        grads = torch.autograd.grad(y.square().sum(), (x, w))
        outs.append((y, *grads))
    for eager, compiled in zip(*outs):
        assert_close(compiled, eager, 1e-6, floor=1e-12)

    def failing_body(h):
        return _eager_only_double(h)

    assert torch.equal(compiled_body(failing_body, x, compile=False)(x), x * 2)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"(?s)failing_body failed.*no compiler here.*compile_blocks=False"):
            compiled_body(failing_body, x, compile=True)(x)

    def broken_body(h):  # the body's own error, compiled or not, is raised as it is
        raise KeyError("the body's own")

    with pytest.raises(KeyError, match="the body's own"):
        compiled_body(broken_body, x, compile=True)(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_eager_glu_backward_rounds_as_the_plain_body(dtype):
    """The eager SwiGLU backward body (in place, into the halves of its result) gives the plain body's result bit
    for bit, so eager and compiled runs differ only by the compiler's own rounding."""
    from mom_lit.fused import _glu_bwd, _glu_bwd_eager

    gen = torch.Generator().manual_seed(5)
    h = (torch.randn(37, 2 * 24, generator=gen) * 3).to(dtype)
    dp = torch.randn(37, 24, generator=gen).to(dtype)
    eager = _glu_bwd_eager(dp, h)
    assert eager.dtype == dtype and torch.equal(eager, _glu_bwd(dp, h))
