"""Varlen chunk index of the Triton scan, built on the device without a host synchronisation.

Every segment of ``cu_seqlens`` is cut into chunks of ``BT`` tokens; a chunk never crosses a segment boundary
and empty segments own no chunk. The exact number of chunks is only known on the device, so kernels are launched
over an upper bound, ``T // BT + N`` (each segment adds at most one partial chunk), and the programs past the
real count find the segment id -1 and exit.

The sequential state passes give each segment's programs in order of decreasing chunk count (``longest_first``):
a long segment (the shared memory's, which sees every token) is a long chain of dependent steps, and started last
it would run alone after the others have finished.

Two small kernels build it (one program for the chunk offsets, one program per block of chunks for the
chunk-to-segment map) and one sort orders the segments: three launches per scan instead of two dozen tensor
operations, each of which would be a kernel launch of its own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["ChunkIndex", "build_chunk_index"]

_OFFSETS_BLOCK = 1024  # segments per step of the single program that sums the chunk counts
_MAP_BLOCK = 256  # chunks per program of the chunk-to-segment map


class ChunkIndex(NamedTuple):
    """Device tensors mapping chunks to segments."""

    max_chunks: int  # NC, the launch size of per-chunk kernels (an upper bound of the real count)
    chunk_seg: torch.Tensor  # (NC,) int32 segment of each chunk, -1 past the last real chunk
    chunk_start: torch.Tensor  # (NC,) int64 first token of each chunk (0 past the last real chunk)
    chunk_offsets: torch.Tensor  # (N + 1,) int32 first chunk of each segment; the last entry is the real count
    longest_first: torch.Tensor  # (N,) int64 segment ids by decreasing chunk count (ties in segment order)


@triton.jit
def _chunk_offsets_kernel(cu, counts, chunk_offsets, N, BT: tl.constexpr, BLOCK: tl.constexpr):
    """One program: chunk count of every segment and their running sum, in blocks of BLOCK segments."""
    tl.store(chunk_offsets, 0)
    carry = tl.zeros((), dtype=tl.int64)
    for s0 in range(0, N, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        mask = offs < N
        lo = tl.load(cu + offs, mask=mask, other=0).to(tl.int64)
        hi = tl.load(cu + offs + 1, mask=mask, other=0).to(tl.int64)
        n = tl.where(mask, (hi - lo + BT - 1) // BT, 0)
        tl.store(counts + offs, n.to(tl.int32), mask=mask)
        tl.store(chunk_offsets + offs + 1, (tl.cumsum(n, axis=0) + carry).to(tl.int32), mask=mask)
        carry += tl.sum(n, axis=0)


@triton.jit
def _chunk_map_kernel(cu, chunk_offsets, chunk_seg, chunk_start, N, NC, steps, BT: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Segment and first token of chunks c: the first segment whose chunk range ends after c (a binary search
    of ``chunk_offsets[1:]``, which skips empty segments), or -1 past the real count."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < NC
    lo = tl.zeros((BLOCK,), dtype=tl.int32)
    hi = tl.zeros((BLOCK,), dtype=tl.int32) + N
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        end = tl.load(chunk_offsets + 1 + mid, mask=mask & active, other=0)
        right = active & (end <= c)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    real = mask & (lo < N)
    seg = tl.minimum(lo, N - 1)
    first = tl.load(chunk_offsets + seg, mask=real, other=0)
    start = tl.load(cu + seg, mask=real, other=0).to(tl.int64) + (c - first).to(tl.int64) * BT
    tl.store(chunk_seg + c, tl.where(real, seg, -1), mask=mask)
    tl.store(chunk_start + c, tl.where(real, start, 0), mask=mask)


def build_chunk_index(cu_seqlens: torch.Tensor, total_tokens: int, chunk: int) -> ChunkIndex:
    """Chunk index of ``N = len(cu_seqlens) - 1`` packed segments of ``total_tokens`` tokens in all (cu_seqlens
    int32 or int64, on the device the scan runs on)."""
    segments = cu_seqlens.numel() - 1
    device = cu_seqlens.device
    max_chunks = total_tokens // chunk + segments
    counts = torch.empty(segments, dtype=torch.int32, device=device)
    chunk_offsets = torch.empty(segments + 1, dtype=torch.int32, device=device)
    chunk_seg = torch.empty(max_chunks, dtype=torch.int32, device=device)
    chunk_start = torch.empty(max_chunks, dtype=torch.int64, device=device)
    _chunk_offsets_kernel[(1,)](cu_seqlens, counts, chunk_offsets, segments, BT=chunk, BLOCK=_OFFSETS_BLOCK,
                                num_warps=4)
    if max_chunks:
        _chunk_map_kernel[(triton.cdiv(max_chunks, _MAP_BLOCK),)](
            cu_seqlens, chunk_offsets, chunk_seg, chunk_start, segments, max_chunks, segments.bit_length() + 1,
            BT=chunk, BLOCK=_MAP_BLOCK, num_warps=4)
    longest_first = torch.argsort(counts, descending=True, stable=True)  # (N,)
    return ChunkIndex(max_chunks, chunk_seg, chunk_start, chunk_offsets, longest_first)
