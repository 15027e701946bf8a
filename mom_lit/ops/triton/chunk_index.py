"""Varlen chunk index of the Triton scan, built on the device without a host synchronisation.

Every segment of ``cu_seqlens`` is cut into chunks of ``BT`` tokens; a chunk never crosses a segment boundary
and empty segments own no chunk. The exact number of chunks is only known on the device, so kernels are launched
over an upper bound, ``T // BT + N`` (each segment adds at most one partial chunk), and the programs past the
real count find the segment id -1 and exit.

The sequential state passes give each segment's programs in order of decreasing chunk count (``longest_first``):
a long segment (the shared memory's, which sees every token) is a long chain of dependent steps, and started last
it would run alone after the others have finished.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["ChunkIndex", "build_chunk_index"]


class ChunkIndex(NamedTuple):
    """Device tensors mapping chunks to segments (all int32 except ``chunk_start``)."""

    max_chunks: int  # NC, the launch size of per-chunk kernels (an upper bound of the real count)
    chunk_seg: torch.Tensor  # (NC,) segment of each chunk, -1 past the last real chunk
    chunk_start: torch.Tensor  # (NC,) int64 first token of each chunk
    chunk_offsets: torch.Tensor  # (N + 1,) first chunk of each segment; the last entry is the real count
    longest_first: torch.Tensor  # (N,) segment ids by decreasing chunk count (ties in segment order)


def build_chunk_index(cu_seqlens: torch.Tensor, total_tokens: int, chunk: int) -> ChunkIndex:
    """Chunk index of ``N = len(cu_seqlens) - 1`` packed segments of ``total_tokens`` tokens in all."""
    offsets = cu_seqlens.to(torch.int64)
    segments = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1] + chunk - 1) // chunk  # (N,)
    chunk_offsets = F.pad(torch.cumsum(counts, 0), (1, 0))  # (N + 1,)
    max_chunks = total_tokens // chunk + segments
    ids = torch.arange(max_chunks, device=offsets.device)
    # first segment whose chunk range ends after the chunk: empty segments (equal ends) are skipped
    seg = torch.searchsorted(chunk_offsets[1:].contiguous(), ids, right=True)  # (NC,) in [0, N]
    real = seg < segments
    seg_c = seg.clamp(max=max(segments - 1, 0))
    start = offsets[seg_c] + (ids - chunk_offsets[seg_c]) * chunk
    chunk_seg = torch.where(real, seg, torch.full_like(seg, -1)).to(torch.int32)
    longest_first = torch.argsort(counts, descending=True, stable=True).to(torch.int32)  # (N,)
    return ChunkIndex(max_chunks, chunk_seg, torch.where(real, start, 0), chunk_offsets.to(torch.int32),
                      longest_first)
