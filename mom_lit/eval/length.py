"""Loss against position in the context, computed chunk by chunk on the recurrent cache (memory O(chunk))."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mom_lit.model import MoMForCausalLM

__all__ = ["PositionLoss", "bucket_edges", "position_loss"]


@dataclass
class PositionLoss:
    """Summed negative log-likelihood (nats) and number of documents at each predicted position."""

    nll_sum: torch.Tensor
    """(L,) float64: position ``t`` predicts token ``t + 1`` of each document from tokens ``0..t``."""
    count: torch.Tensor
    """(L,) int64: documents long enough to have position ``t``."""

    def bucket(self, start: int, stop: int) -> tuple[float, int]:
        """Mean loss over positions ``start <= t < stop`` (per token, over documents) and the token count."""
        n = int(self.count[start:stop].sum())
        return (float(self.nll_sum[start:stop].sum()) / n if n else math.nan), n


def bucket_edges(max_length: int, first: int = 64) -> list[int]:
    """Edges 0, first, 2 first, 4 first, ... up to ``max_length`` (the last bucket may be shorter)."""
    if max_length < 1 or first < 1:
        raise ValueError(f"max_length and first must be >= 1, got {max_length} and {first}")
    edges = [0]
    edge = first
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    return edges + [max_length]


@torch.no_grad()
def position_loss(model: MoMForCausalLM, documents: Sequence[Sequence[int]], max_length: int,
                  chunk_size: int = 1024, batch_size: int = 8) -> PositionLoss:
    """Per-position loss of ``documents`` (token id lists), each cut to its first ``max_length + 1`` tokens.

    Documents run ``batch_size`` at a time as rows of one batch; each row is fed ``chunk_size`` tokens per
    forward pass and carries its recurrent cache to the next chunk, so memory does not grow with the length.
    A row shorter than the batch's longest is padded at its end; padding comes after every real token of its
    row, so under the causal model it changes nothing before it, and its positions are not counted.
    """
    if max_length < 1 or chunk_size < 1 or batch_size < 1:
        raise ValueError(f"max_length, chunk_size and batch_size must be >= 1, got {max_length}, {chunk_size}, "
                         f"{batch_size}")
    docs = [list(d[:max_length + 1]) for d in documents if len(d) >= 2]
    if not docs:
        raise ValueError("no document has two or more tokens")
    device = model.embed.weight.device
    nll_sum = torch.zeros(max_length, dtype=torch.float64)
    count = torch.zeros(max_length, dtype=torch.int64)
    for first in range(0, len(docs), batch_size):
        rows = docs[first:first + batch_size]
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)  # (B, width), padded with id 0
        valid = torch.zeros(len(rows), width - 1, dtype=torch.bool)  # (B, width - 1): position has a target
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
            valid[i, :len(row) - 1] = True
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        cache = None
        for start in range(0, width - 1, chunk_size):
            stop = min(start + chunk_size, width - 1)
            out = model(inputs[:, start:stop].to(device), cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits.float()  # (B, c, V)
            nll = F.cross_entropy(logits.transpose(1, 2), targets[:, start:stop].to(device), reduction="none")
            mask = valid[:, start:stop]
            nll_sum[start:stop] += (nll.cpu().double() * mask).sum(0)
            count[start:stop] += mask.sum(0)
    return PositionLoss(nll_sum, count)
