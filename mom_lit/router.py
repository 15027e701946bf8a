"""Top-k router of a MoM layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    logits: torch.Tensor
    """(N_tok, E) router logits (model dtype)."""
    probs: torch.Tensor
    """(N_tok, E) softmax of the logits, fp32."""
    memory: torch.Tensor
    """(N_tok, k) selected memories, int64, distinct per token."""
    weight: torch.Tensor
    """(N_tok, k) renormalised routing weights, fp32."""


class Router(nn.Module):
    """``softmax(x W_g)`` in fp32, keep the top-k, renormalise them to sum to one."""

    def __init__(self, hidden_size: int, num_memories: int, topk: int):
        super().__init__()
        self.topk = topk
        self.weight = nn.Parameter(torch.empty(num_memories, hidden_size))

    def forward(self, x: torch.Tensor) -> Routing:
        logits = x @ self.weight.to(x.dtype).t()  # (N_tok, E)
        probs = torch.softmax(logits.float(), dim=-1)
        weight, memory = torch.topk(probs, self.topk, dim=-1)
        # The selection is by index, never by weight > 0: a weight that underflows still routes its token.
        weight = weight / weight.sum(-1, keepdim=True)
        return Routing(logits=logits, probs=probs, memory=memory, weight=weight)
