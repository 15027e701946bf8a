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
    initial = torch.randn(len(lengths), width - 1, channels, dtype=torch.float64) if with_state else None
    y, final = varlen_short_conv(x, weight, segment, position, cu, initial, output_final_state=True, shifted=shifted)
    ref_y, ref_final = _reference(x, weight, cu, initial if with_state else torch.zeros(len(lengths), width - 1, channels,
                                                                                       dtype=torch.float64))
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(final, ref_final)
    if x.shape[0]:
        gy = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, (x, weight), gy),
                                   torch.autograd.grad(ref_y, (x, weight), gy))


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
