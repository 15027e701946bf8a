"""Causal depthwise short convolution over varlen segments, restarting at every segment boundary.

fla runs its training-time convolution across segment boundaries, so a memory's first tokens see the previous
segment (another batch row, document or memory). Here every segment starts from its own cached state (zeros
for a fresh sequence), which is what decoding sees too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["varlen_short_conv"]


def varlen_short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    segment: torch.Tensor,
    position: torch.Tensor,
    cu_seqlens: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SiLU(causal depthwise conv) of each segment of ``x``.

    ``shifted=False`` runs one causal depthwise convolution over the whole (L, C) layout and patches the segment
    heads (fastest eagerly); ``shifted=True`` sums W shifted, masked copies, which ``torch.compile`` fuses into a
    single kernel.

    Args:
        x: (L, C) segment-sorted inputs.
        weight: (C, W) filter; ``weight[:, W-1]`` multiplies the current input.
        segment, position: (L,) segment id and position inside the segment of each row of ``x``.
        cu_seqlens: (S+1,) segment offsets (empty segments allowed).
        initial_state: (S, W-1, C) last W-1 inputs seen by each segment before this call (most recent last).
    Returns:
        y: (L, C) and, if asked, the final state (S, W-1, C).
    """
    length, channels = x.shape
    width = weight.shape[1]
    num_segments = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (num_segments, width - 1, channels):
        raise ValueError(f"conv initial_state must have shape {(num_segments, width - 1, channels)}, "
                         f"got {tuple(initial_state.shape)}")
    if shifted:
        y = _conv_by_shifts(x, weight, segment, position, initial_state)
    else:
        y = _conv_then_patch_heads(x, weight, cu_seqlens, initial_state)
    y = F.silu(y)

    final_state = None
    if output_final_state:
        seq_len = cu_seqlens[1:] - cu_seqlens[:-1]  # (S,)
        offsets = torch.arange(width - 1, device=x.device)
        rel = seq_len.unsqueeze(1) - (width - 1) + offsets  # (S, W-1): position of each kept input
        from_x = x[(cu_seqlens[:-1].unsqueeze(1) + rel).clamp(0, max(length - 1, 0))] if length else None
        if initial_state is None:
            from_state = x.new_zeros(num_segments, width - 1, channels)
        else:
            idx = (seq_len.unsqueeze(1) + offsets).clamp(max=width - 2)  # (S, W-1)
            from_state = torch.gather(initial_state, 1, idx.unsqueeze(-1).expand(-1, -1, channels)).to(x.dtype)
        if from_x is None:
            final_state = from_state
        else:
            final_state = torch.where((rel >= 0).unsqueeze(-1), from_x, from_state)
    return y, final_state


def _conv_by_shifts(x, weight, segment, position, initial_state):
    width = weight.shape[1]
    y = x * weight[:, width - 1]
    for shift in range(1, width):
        # Input ``shift`` steps back; before the segment start it comes from the cached state (or is zero).
        back = F.pad(x, (0, 0, shift, 0))[: x.shape[0]]  # (L, C): back[t] = x[t - shift]
        inside = (position >= shift).unsqueeze(-1)
        if initial_state is None:
            back = torch.where(inside, back, torch.zeros_like(back))
        else:
            cached = initial_state[segment, (width - 1 + position - shift).clamp(0, width - 2)]  # (L, C)
            back = torch.where(inside, back, cached.to(x.dtype))
        y = y + back * weight[:, width - 1 - shift]
    return y


class _CausalDepthwiseConv(torch.autograd.Function):
    """``y[t] = sum_j weight[:, j] * x[t - (W-1) + j]`` (zeros before row 0) of x (L, C), in x's row-major layout.

    A library ``conv1d`` wants channels first: (C, L) transposed copies of the input, of the output and of their
    gradients, each as slow as the convolution itself. Here tap j adds the rows of x shifted down by W-1-j, as
    in-place products on row ranges (views), and the backward is the same sum over the gradient shifted up."""

    @staticmethod
    def forward(ctx, x, weight):
        length, width = x.shape[0], weight.shape[1]
        y = x * weight[:, width - 1]
        for shift in range(1, min(width, length + 1)):
            y[shift:].addcmul_(x[:length - shift], weight[:, width - 1 - shift])  # y[t] += w * x[t - shift]
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        length, width = x.shape[0], weight.shape[1]
        dy = dy.contiguous()
        dx = dy * weight[:, width - 1]
        dweight = x.new_zeros(weight.shape)  # (C, W): taps shifted past the whole input see nothing
        dweight[:, width - 1] = (dy * x).sum(0)
        for shift in range(1, min(width, length + 1)):
            dx[:length - shift].addcmul_(dy[shift:], weight[:, width - 1 - shift])  # x[t] reached y[t + shift]
            dweight[:, width - 1 - shift] = (dy[shift:] * x[:length - shift]).sum(0)
        return dx, dweight  # (L, C), (C, W)


def _conv_then_patch_heads(x, weight, cu_seqlens, initial_state):
    length, channels = x.shape
    width = weight.shape[1]
    # One depthwise conv over the whole layout; it is right everywhere except the first W-1 rows of each
    # segment, whose taps before the segment start read the previous segment's tail (zeros before row 0) instead
    # of the segment's own cached inputs. Those rows (a fixed number: no host sync) get the difference added in
    # place: no copy of y, and rows past a short segment's end add zeros.
    y = _CausalDepthwiseConv.apply(x, weight)  # (L, C)
    if width > 1 and length > 0:
        seq_len = cu_seqlens[1:] - cu_seqlens[:-1]  # (S,)
        head = torch.arange(width - 1, device=x.device)  # positions 0..W-2 of every segment
        rows = cu_seqlens[:-1].unsqueeze(1) + head  # (S, W-1)
        valid = head < seq_len.unsqueeze(1)  # (S, W-1)
        taps = torch.arange(width, device=x.device)  # tap j reads the input at position p - (W-1) + j
        src = head[:, None] - (width - 1) + taps  # (W-1, W) position inside the segment
        read = rows.unsqueeze(-1) - (width - 1) + taps  # (S, W-1, W) row of x the whole-layout conv read
        seen = torch.where((read >= 0).unsqueeze(-1), x[read.clamp(0, length - 1)], 0)  # (S, W-1, W, C)
        if initial_state is None:
            own = torch.zeros_like(seen)
        else:
            idx = (src + width - 1).clamp(0, width - 2)  # (W-1, W) index into the cached inputs
            own = initial_state[:, idx].to(x.dtype)  # (S, W-1, W, C)
        before = (src >= 0).logical_not()[None, :, :, None] & valid[:, :, None, None]  # (S, W-1, W, 1)
        delta = (torch.where(before, own - seen, 0) * weight.t().to(x.dtype)).sum(2)  # (S, W-1, C)
        # rows past the layout's end belong to no segment (their delta is zero): clamped to a real row
        y.index_put_((rows.clamp(max=length - 1).reshape(-1),), delta.reshape(-1, channels), accumulate=True)
    return y
