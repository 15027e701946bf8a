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

    No host synchronisation: all sizes derive from shapes.
    """
    num_tokens, slots_per_token = memory.shape
    memory_flat = memory.reshape(-1).to(torch.int64)  # (B*T*J,) token-major
    token_flat = torch.arange(num_tokens, device=memory.device).repeat_interleave(slots_per_token)
    segment_flat = memory_flat * num_sequences + seq_id.to(torch.int64).repeat_interleave(slots_per_token)
    # A token selects distinct memories, so within a segment slots are in token order and the stable sort keeps
    # time order whatever the routing scores were (ties, zero weights).
    segment_sorted, order = torch.sort(segment_flat, stable=True)
    counts = count_values(segment_flat, num_streams * num_sequences)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    arange = torch.arange(order.numel(), device=memory.device)
    position = arange - cu_seqlens[segment_sorted]
    rank = torch.empty_like(order).index_copy_(0, order, arange)
    return StreamLayout(token=token_flat[order], slot=order, rank=rank, memory=memory_flat[order],
                        segment=segment_sorted, position=position, cu_seqlens=cu_seqlens, num_sequences=num_sequences,
                        num_streams=num_streams)


def unsort(values: torch.Tensor, layout: StreamLayout) -> torch.Tensor:
    """Scatter sorted slot values (L, ...) back to token-major slot order (B*T*J, ...)."""
    out = torch.empty_like(values)
    out[layout.slot] = values
    return out
