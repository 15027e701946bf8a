"""Varlen short convolution against a per-segment torch conv1d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mom_lit.layout import build_layout
from mom_lit.ops.slots import varlen_short_conv


def _reference(x, weight, cu, initial):
    """Each segment separately: prepend its cached inputs, depthwise causal conv1d, SiLU."""
    width = weight.shape[1]
    ys, finals = [], []
    for s in range(cu.numel() - 1):
        seg = torch.cat([initial[s], x[cu[s]:cu[s + 1]]])  # (W-1+n, C)
        if cu[s + 1] > cu[s]:
            y = F.conv1d(seg.t()[None], weight[:, None, :], groups=weight.shape[0])[0].t()  # (n, C)
            ys.append(F.silu(y))
        finals.append(seg[-(width - 1):])
    return torch.cat(ys), torch.stack(finals)


@pytest.mark.parametrize("lengths", [[5, 0, 1, 9, 3], [0, 0, 2], [17], [1, 1, 1, 1]], ids=str)
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shifted", [False, True], ids=["whole_layout", "shifts"])
def test_matches_per_segment_conv(lengths, width, with_state, shifted):
    torch.manual_seed(0)
    channels = 6
    cu = torch.tensor([0] + lengths).cumsum(0)
    x = torch.randn(int(cu[-1]), channels, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(channels, width, dtype=torch.float64, requires_grad=True)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(x.shape[0]) - cu[segment]
    initial = None
    if with_state:
        initial = torch.randn(len(lengths), width - 1, channels, dtype=torch.float64, requires_grad=True)
    y, final = varlen_short_conv(x, weight, segment, position, cu, initial, output_final_state=True, shifted=shifted)
    ref_y, ref_final = _reference(x, weight, cu, initial if with_state else torch.zeros(len(lengths), width - 1, channels,
                                                                                       dtype=torch.float64))
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(final, ref_final)
    if x.shape[0]:
        gy = torch.randn_like(y)
        inputs = (x, weight) + ((initial,) if with_state else ())
        torch.testing.assert_close(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(ref_y, inputs, gy))


def _segments(lengths):
    cu = torch.tensor([0] + lengths).cumsum(0)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return cu, segment, torch.arange(int(cu[-1])) - cu[segment]


@pytest.mark.parametrize("lengths", [[5, 0, 1, 9, 3], [1, 0, 2], [6]], ids=str)
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_whole_layout_conv_gradcheck(lengths, width, with_state):
    """Every gradient of the whole-layout convolution (x, filter, cached inputs) against finite differences."""
    torch.manual_seed(0)
    cu, segment, position = _segments(lengths)
    x = torch.randn(int(cu[-1]), 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, width, dtype=torch.float64, requires_grad=True)
    inputs = [x, weight]
    if with_state:
        inputs.append(torch.randn(len(lengths), width - 1, 3, dtype=torch.float64, requires_grad=True))

    def conv(x, weight, initial=None):
        return varlen_short_conv(x, weight, segment, position, cu, initial)[0]

    assert torch.autograd.gradcheck(conv, tuple(inputs))


@pytest.mark.parametrize("with_state", [False, True])
def test_long_layout_matches_per_segment_conv(with_state):
    """A layout of several hundred rows of 96 channels: the CPU backward sums the filter gradient over blocks of
    65536 elements (682 rows here), so over a block boundary inside a segment."""
    torch.manual_seed(0)
    lengths = [300, 0, 1, 257, 2, 140]
    cu, segment, position = _segments(lengths)
    x = torch.randn(int(cu[-1]), 96, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(96, 4, dtype=torch.float64, requires_grad=True)
    initial = torch.randn(len(lengths), 3, 96, dtype=torch.float64, requires_grad=True)
    y, _ = varlen_short_conv(x, weight, segment, position, cu, initial if with_state else None)
    ref_y, _ = _reference(x, weight, cu, initial if with_state else torch.zeros_like(initial))
    torch.testing.assert_close(y, ref_y)
    gy = torch.randn_like(y)
    inputs = (x, weight, initial) if with_state else (x, weight)
    torch.testing.assert_close(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(ref_y, inputs, gy))


def test_whole_layout_conv_keeps_bf16():
    """bf16 inputs give a bf16 output and bf16 gradients, close to the float64 result."""
    torch.manual_seed(0)
    cu, segment, position = _segments([40, 1, 0, 300])
    x = torch.randn(int(cu[-1]), 8, dtype=torch.float64)
    weight = torch.randn(8, 4, dtype=torch.float64)
    initial = torch.randn(4, 3, 8, dtype=torch.float64)
    grads, ys = {}, {}
    for dtype in (torch.bfloat16, torch.float64):
        inputs = [t.to(dtype).requires_grad_() for t in (x, weight, initial)]
        y, _ = varlen_short_conv(inputs[0], inputs[1], segment, position, cu, inputs[2])
        y.backward(torch.ones_like(y))
        ys[dtype], grads[dtype] = y, [t.grad for t in inputs]
    assert ys[torch.bfloat16].dtype == torch.bfloat16
    assert [g.dtype for g in grads[torch.bfloat16]] == [torch.bfloat16] * 3
    torch.testing.assert_close(ys[torch.bfloat16].double(), ys[torch.float64], rtol=2e-2, atol=2e-2)
    for low, high in zip(grads[torch.bfloat16], grads[torch.float64]):
        torch.testing.assert_close(low.double(), high, rtol=2e-2, atol=0.1 * high.abs().max().item())


def test_layout_keeps_time_order_and_covers_every_slot():
    torch.manual_seed(0)
    memory = torch.stack([torch.randperm(4)[:2] for _ in range(30)])  # (30 tokens, k=2) distinct per token
    seq_id = torch.arange(3).repeat_interleave(10)
    layout = build_layout(memory, seq_id, num_sequences=3, num_streams=4)
    assert layout.cu_seqlens.numel() == 13 and int(layout.cu_seqlens[-1]) == 60
    assert torch.equal(torch.sort(layout.slot).values, torch.arange(60))
    for s in range(12):
        lo, hi = layout.cu_seqlens[s], layout.cu_seqlens[s + 1]
        tokens = layout.token[lo:hi]
        assert (tokens[1:] > tokens[:-1]).all()  # strictly increasing time inside a segment
        assert (layout.memory[lo:hi] == s // 3).all() and (seq_id[tokens] == s % 3).all()
        assert torch.equal(layout.position[lo:hi], torch.arange(int(hi - lo)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_layout_conv_on_cuda_matches_float64_reference(dtype):
    """On a GPU (no blocked filter gradient there) the output, final state and every gradient against the
    per-segment float64 reference on the CPU."""
    torch.manual_seed(0)
    lengths = [300, 0, 1, 257, 2, 140]
    cu, segment, position = _segments(lengths)
    x = torch.randn(int(cu[-1]), 64, dtype=torch.float64)
    weight = torch.randn(64, 4, dtype=torch.float64)
    initial = torch.randn(len(lengths), 3, 64, dtype=torch.float64)
    gy = torch.randn(int(cu[-1]), 64, dtype=torch.float64)
    ref_inputs = [t.clone().requires_grad_() for t in (x, weight, initial)]
    ref_y, ref_final = _reference(ref_inputs[0], ref_inputs[1], cu, ref_inputs[2])
    ref_grads = torch.autograd.grad(ref_y, ref_inputs, gy)
    inputs = [t.to("cuda", dtype).requires_grad_() for t in (x, weight, initial)]
    y, final = varlen_short_conv(inputs[0], inputs[1], segment.cuda(), position.cuda(), cu.cuda(), inputs[2],
                                 output_final_state=True)
    grads = torch.autograd.grad(y, inputs, gy.to("cuda", dtype))
    assert y.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.double().cpu(), ref_y, **tol)
    torch.testing.assert_close(final.double().cpu(), ref_final, **tol)
    for got, want in zip(grads, ref_grads):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))
