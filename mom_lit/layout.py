"""Token layout of a MoM layer: every (memory, sequence) segment laid out contiguously.

A token picks ``topk`` routed memories and, with a shared memory, also writes to the shared one: each such pair
(token, memory) is a *slot*. Slots are sorted by segment ``memory * N + sequence`` (N = number of independent
sequences: batch rows, or packed documents), keeping time order inside every segment, so that one varlen scan
over ``cu_seqlens`` processes all memories of all sequences at once. Memory-major order keeps each memory's slots
contiguous across the batch, which is what a grouped projection wants.

Every segment exists, empty or not: ``cu_seqlens`` always has ``num_streams * N + 1`` entries, so recurrent states
keep a fixed shape and a memory that no token selected passes its state through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StreamLayout:
    token: torch.Tensor
    """(L,) int64: flat token index (into B*T) of each sorted slot."""
    slot: torch.Tensor
    """(L,) int64: index of each sorted slot in the token-major (B*T*J) order."""
    rank: torch.Tensor
    """(B*T*J,) int64: sorted position of each token-major slot (the inverse permutation of ``slot``)."""
    memory: torch.Tensor
    """(L,) int64: stream index of each sorted slot (routed memories first, shared memory last)."""
    segment: torch.Tensor
    """(L,) int64: segment id ``memory * num_sequences + sequence``."""
    position: torch.Tensor
    """(L,) int64: position of each slot inside its segment."""
    cu_seqlens: torch.Tensor
    """(num_streams * num_sequences + 1,) int64 segment offsets."""
    num_sequences: int
    num_streams: int

    @property
    def num_segments(self) -> int:
        return self.num_streams * self.num_sequences


def count_values(values: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) int64 histogram of ``values`` in [0, size). Unlike ``torch.bincount`` it never syncs with the GPU
    (bincount reads the maximum back to size its output)."""
    ones = torch.ones_like(values, dtype=torch.int64)
    return torch.zeros(size, dtype=torch.int64, device=values.device).index_add_(0, values.reshape(-1), ones.reshape(-1))


def sequence_ids(batch_size: int, seq_len: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """(B*T,) id of the independent sequence (row, or packed document) that each token belongs to."""
    if cu_seqlens is None:
        return torch.arange(batch_size, device=device).repeat_interleave(seq_len)
    positions = torch.arange(seq_len, device=device)
    # Document d covers [cu[d], cu[d+1]); the number of ends <= t is the document of t.
    return torch.searchsorted(cu_seqlens[1:].to(device=device, dtype=torch.int64), positions, right=True)


def build_layout(memory: torch.Tensor, seq_id: torch.Tensor, num_sequences: int, num_streams: int) -> StreamLayout:
    """Sort the (token, slot) pairs of ``memory`` (B*T, J) into contiguous segments.

    No host synchronisation: all sizes derive from shapes. Every step is one tensor operation, since on a GPU each
    costs a kernel launch per layer and pass.
    """
    num_tokens, slots_per_token = memory.shape
    num_segments = num_streams * num_sequences
    # int32 keys: half the radix passes of int64 (segment ids stay far below 2^31).
    key_dtype = torch.int32 if num_segments < 2 ** 31 else torch.int64
    segment_flat = (memory.to(key_dtype) * num_sequences + seq_id.to(key_dtype)[:, None]).reshape(-1)  # (B*T*J,)
    # A token selects distinct memories, so within a segment slots are in token order and the stable sort keeps
    # time order whatever the routing scores were (ties, zero weights).
    segment_sorted, order = torch.sort(segment_flat, stable=True)
    # Segment s starts at the first sorted slot whose id is at least s (empty segments start where the next does).
    bounds = torch.arange(num_segments + 1, device=memory.device, dtype=key_dtype)
    cu_seqlens = torch.searchsorted(segment_sorted, bounds)  # (S*N + 1,) int64
    arange = torch.arange(order.numel(), device=memory.device)
    segment = segment_sorted.long()
    position = arange - cu_seqlens[segment]
    rank = torch.empty_like(order).index_copy_(0, order, arange)
    return StreamLayout(token=order // slots_per_token, slot=order, rank=rank, memory=segment // num_sequences,
                        segment=segment, position=position, cu_seqlens=cu_seqlens, num_sequences=num_sequences,
                        num_streams=num_streams)


def unsort(values: torch.Tensor, layout: StreamLayout) -> torch.Tensor:
    """Scatter sorted slot values (L, ...) back to token-major slot order (B*T*J, ...)."""
    out = torch.empty_like(values)
    out[layout.slot] = values
    return out
