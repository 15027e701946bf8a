"""Recurrent state of the MoM layers: per layer, the matrix memories and the short convolution's last inputs of
every stream, kept sequence-major (N, S, ...) so that a cache is indexed by sequence; the scan reads and writes
them stream-major (S * N segments, memory-sorted like the layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mom_lit.config import MoMConfig

__all__ = ["LayerState", "MoMCache"]


@dataclass
class LayerState:
    """Recurrent state of one layer for N independent sequences."""

    memory: torch.Tensor
    """(N, S, H, K, V) fp32 matrix memories (S streams: routed memories, then the shared one)."""
    conv: torch.Tensor | None
    """(N, S, W-1, C) last W-1 pre-convolution q|k|v inputs of each stream, or None without convolution."""

    @classmethod
    def empty(cls, config: MoMConfig, num_sequences: int, device, dtype=torch.float32) -> LayerState:
        """Zero state of a layer of ``config`` for ``num_sequences`` sequences; the conv inputs in ``dtype``, the
        memories in fp32."""
        c, S = config, config.num_streams
        conv = None
        if c.conv_size > 0:
            channels = 2 * c.key_dim + c.value_dim
            conv = torch.zeros(num_sequences, S, c.conv_size - 1, channels, device=device, dtype=dtype)
        memory = torch.zeros(num_sequences, S, c.num_heads, c.head_dim, c.head_v_dim, device=device,
                             dtype=torch.float32)
        return cls(memory=memory, conv=conv)

    def scan_memory(self) -> torch.Tensor:
        """(S * N, H, K, V) memories in the scan's segment order: stream-major."""
        return self.memory.transpose(0, 1).reshape(-1, *self.memory.shape[2:])

    def scan_conv(self) -> torch.Tensor | None:
        """(S * N, W-1, C) conv inputs in the scan's segment order, or None without convolution."""
        return None if self.conv is None else self.conv.transpose(0, 1).reshape(-1, *self.conv.shape[2:])

    @classmethod
    def from_scan(cls, memory: torch.Tensor, conv: torch.Tensor | None, num_streams: int,
                  num_sequences: int) -> LayerState:
        """The state from the scan's stream-major final memories (S * N, H, K, V) and conv inputs (S * N, W-1, C)
        (or None): (N, S, ...) views, no copies."""
        def sequence_major(t):  # (S * N, ...) -> (N, S, ...)
            return t.view(num_streams, num_sequences, *t.shape[1:]).transpose(0, 1)

        return cls(memory=sequence_major(memory), conv=None if conv is None else sequence_major(conv))


@dataclass
class MoMCache:
    """Recurrent state of every layer for N independent sequences: O(1) in the context length."""

    layers: list[LayerState]
    seen_tokens: int = 0

    @property
    def num_sequences(self) -> int:
        return self.layers[0].memory.shape[0]

    def nbytes(self) -> int:
        return sum(s.memory.nbytes + (s.conv.nbytes if s.conv is not None else 0) for s in self.layers)
