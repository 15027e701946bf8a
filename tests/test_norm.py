"""The L2 norm of queries and keys (``mom_lit.norm.l2_normalize``) against the plain torch expression."""

from __future__ import annotations

import pytest
import torch

from mom_lit.norm import l2_normalize


def _plain(x, eps=1e-6):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def test_l2_normalize_gradcheck():
    """The hand-written backward (float32 inputs; float64 ones take the plain expression) against finite
    differences: steps of 1e-2 keep fp32 rounding (1e-7 relative) far below the tolerance, which a wrong gradient
    term exceeds by orders of magnitude."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, dtype=torch.float32, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize, (x,), eps=1e-2, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_l2_normalize_matches_plain_expression(dtype):
    """Output and input gradient in x's dtype, on a strided view (the layer normalises a column slice)."""
    torch.manual_seed(0)
    base = torch.randn(37, 20, dtype=dtype)
    grads, outs = [], []
    for fn in (l2_normalize, _plain):
        leaf = base.clone().requires_grad_()
        x = leaf[:, 4:16].reshape(37, 3, 4)  # (L, H, K) of every row's columns 4..15
        y = fn(x)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(dtype))
        outs.append(y)
        grads.append(leaf.grad)
    assert outs[0].dtype == dtype and grads[0].dtype == dtype
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # float64 keeps the plain expression's gradient bit for bit (the precision reference runs)
    tol = {torch.float64: dict(rtol=0, atol=0), torch.float32: dict(rtol=1e-5, atol=1e-6),
           torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}[dtype]
    torch.testing.assert_close(grads[0], grads[1], **tol)
    assert torch.equal(grads[0][:, :4], torch.zeros_like(grads[0][:, :4]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_normalize_on_cuda_matches_float64(dtype):
    """The hand-written backward on a GPU against the float64 plain expression on the CPU."""
    torch.manual_seed(0)
    base = torch.randn(512, 3, 64, dtype=torch.float64)
    gy = torch.randn_like(base)
    ref = base.clone().requires_grad_()
    want_y = _plain(ref)
    (want_g,) = torch.autograd.grad(want_y, ref, gy)
    x = base.to("cuda", dtype).requires_grad_()
    y = l2_normalize(x)
    (g,) = torch.autograd.grad(y, x, gy.to("cuda", dtype))
    assert y.dtype == dtype and g.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double().cpu(), want_y.detach(), **tol)
    torch.testing.assert_close(g.double().cpu(), want_g, **tol)
