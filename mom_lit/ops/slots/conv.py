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
        y = F.silu(_conv_by_shifts(x, weight, segment, position, initial_state))
    else:
        y = _SegmentConvSilu.apply(x, weight, cu_seqlens, initial_state)

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


def _conv_rows(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_j taps[j] * x[t - (W-1) + j]`` (zeros before row 0) of x (L, C), taps (W, C): tap j adds the
    rows of x shifted down by W-1-j as in-place products on row ranges (views), in x's row-major layout. (A library
    ``conv1d`` wants channels first: transposed copies of the input and output, each as slow as the convolution.)"""
    length, width = x.shape[0], taps.shape[0]
    y = x * taps[width - 1]
    for shift in range(1, min(width, length + 1)):
        y[shift:].addcmul_(x[:length - shift], taps[width - 1 - shift])  # y[t] += w * x[t - shift]
    return y


def _conv_rows_backward(dz: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The input gradient of :func:`_conv_rows`: ``dx[t] = sum_j taps[j] * dz[t + (W-1) - j]`` (zeros past the
    last row), the same in-place products on the gradient shifted up."""
    length, width = dz.shape[0], taps.shape[0]
    dx = dz * taps[width - 1]
    for shift in range(1, min(width, length + 1)):
        dx[:length - shift].addcmul_(dz[shift:], taps[width - 1 - shift])  # x[t] reached z[t + shift]
    return dx


def _tap_gradients(dz: torch.Tensor, x: torch.Tensor, width: int, block_elements: int = 1 << 16) -> torch.Tensor:
    """(W, C) ``sum_t dz[t] * x[t - (W-1-j)]`` of each tap j, in x's dtype. On CPU the products accumulate in place
    (at least fp32) over blocks of about ``block_elements`` elements, which stay in a core's cache (and still split
    over two threads): a full-size product per tap costs a fresh allocation and a pass through memory each.
    Elsewhere one product per tap, each summed by ``sum``."""
    length, channels = x.shape
    if x.device.type != "cpu":
        # (a tap shifted past the whole input sums nothing: zeros)
        return torch.stack([(dz[shift:] * x[:length - shift]).sum(0) for shift in reversed(range(width))])
    block = max(1, block_elements // max(channels, 1))  # rows per block
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    acc = x.new_zeros(width, min(block, length), channels, dtype=acc_dtype)  # (W, block, C)
    for start in range(0, length, block):
        end = min(start + block, length)
        for shift in range(min(width, end)):
            first = max(start, shift)  # rows t >= shift have an input t - shift
            acc[width - 1 - shift, :end - first].addcmul_(dz[first:end], x[first - shift:end - shift])
    return acc.sum(1).to(x.dtype)


class _SegmentHeads:
    """Where the whole-layout convolution of :func:`_conv_rows` is wrong: the first W-1 rows of each segment, whose
    taps before the segment start read the previous segment's tail (zeros before row 0) instead of the segment's
    own cached inputs (zeros without a cache). A fixed number of rows (no host sync); rows past a short segment's
    end, and past the layout's end (clamped to a real row), are masked out."""

    def __init__(self, cu_seqlens: torch.Tensor, length: int, width: int) -> None:
        device = cu_seqlens.device
        seq_len = cu_seqlens[1:] - cu_seqlens[:-1]  # (S,)
        head = torch.arange(width - 1, device=device)  # positions 0..W-2 of every segment
        rows = cu_seqlens[:-1].unsqueeze(1) + head  # (S, W-1)
        taps = torch.arange(width, device=device)  # tap j reads the input at position p - (W-1) + j
        src = head[:, None] - (width - 1) + taps  # (W-1, W) position inside the segment
        read = rows.unsqueeze(-1) - (width - 1) + taps  # (S, W-1, W) row of x the whole-layout conv read
        self.rows = rows.clamp(max=length - 1).reshape(-1)  # (S*(W-1),)
        self.read = read.clamp(0, length - 1)  # (S, W-1, W)
        self.read_inside = (read >= 0).unsqueeze(-1)  # (S, W-1, W, 1): rows before row 0 read zeros
        self.state_index = (src + width - 1).clamp(0, width - 2)  # (W-1, W) index into the cached inputs
        valid = head < seq_len.unsqueeze(1)  # (S, W-1)
        self.before = (src < 0)[None, :, :, None] & valid[:, :, None, None]  # (S, W-1, W, 1)

    def differences(self, x: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
        """(S, W-1, W, C) what each wrong tap should have read minus what it read (zero for right taps)."""
        seen = torch.where(self.read_inside, x[self.read], 0)  # (S, W-1, W, C)
        own = 0 if initial_state is None else initial_state[:, self.state_index].to(x.dtype)  # (S, W-1, W, C)
        return torch.where(self.before, own - seen, 0)


class _SegmentConvSilu(torch.autograd.Function):
    """``SiLU(z)``, z the causal depthwise convolution of every segment of x (L, C) by weight (C, W): one
    convolution over the whole layout (:func:`_conv_rows`), then the first W-1 rows of each segment corrected in
    place (:class:`_SegmentHeads`). Keeps x and z; the backward is the same sum over the gradient shifted up, the
    correction's gradient added at the few rows it read (no full-size buffer)."""

    @staticmethod
    def forward(ctx, x, weight, cu_seqlens, initial_state):
        length, channels = x.shape
        width = weight.shape[1]
        taps = weight.t().contiguous()  # (W, C): a contiguous row broadcasts several times faster than a column
        z = _conv_rows(x, taps)  # (L, C)
        heads = None
        if width > 1 and length > 0:
            heads = _SegmentHeads(cu_seqlens, length, width)
            delta = (heads.differences(x, initial_state) * taps).sum(2)  # (S, W-1, C)
            z.index_put_((heads.rows,), delta.reshape(-1, channels), accumulate=True)
        ctx.save_for_backward(x, taps, z, initial_state)
        ctx.heads, ctx.weight_dtype = heads, weight.dtype
        return F.silu(z)

    @staticmethod
    def backward(ctx, dy):
        x, taps, z, initial_state = ctx.saved_tensors
        heads = ctx.heads
        channels = x.shape[1]
        width = taps.shape[0]
        dz = torch.ops.aten.silu_backward(dy.contiguous(), z)  # (L, C) in one pass
        dx = _conv_rows_backward(dz, taps)
        dtaps = _tap_gradients(dz, x, width)
        dinit = None
        if heads is not None:
            dhead = dz[heads.rows].view(-1, width - 1, 1, channels)  # (S, W-1, 1, C)
            dtaps += (heads.differences(x, initial_state) * dhead).sum((0, 1))
            dread = dhead * taps  # (S, W-1, W, C): the gradient of each tap's input at the segment heads
            dseen = torch.where(heads.before & heads.read_inside, dread, 0)  # d(-seen)
            dx.index_put_((heads.read.reshape(-1),), -dseen.reshape(-1, channels), accumulate=True)
            if initial_state is not None and ctx.needs_input_grad[3]:
                down = torch.where(heads.before, dread, 0).to(initial_state.dtype)  # (S, W-1, W, C)
                dinit = torch.zeros_like(initial_state)
                dinit.index_add_(1, heads.state_index.reshape(-1), down.flatten(1, 2))
        return dx, dtaps.t().contiguous().to(ctx.weight_dtype), None, dinit
