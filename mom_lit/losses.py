"""Auxiliary router losses: Switch-style load balancing (global or per layer and sequence) and router z-loss.

Load balance of one group of tokens (routed slots ``k`` per token, E memories):
    f_m = (slots routed to m) / (tokens * k),   P_m = mean router probability of m,   loss = E * sum_m f_m P_m
so a perfectly balanced router scores 1. ``f`` is a count (no gradient); the gradient flows through ``P``.
Only real tokens of the batch enter (there is no padding in a MoM batch: packed documents are separate
sequences and every token belongs to exactly one).
"""

from __future__ import annotations

import torch

from mom_lit.layout import count_values
from mom_lit.router import Routing


def load_fraction(memory: torch.Tensor, num_memories: int) -> torch.Tensor:
    """(E,) fraction of routed slots that went to each memory."""
    counts = count_values(memory, num_memories).float()
    return counts / memory.numel()


def load_balancing_loss_global(routings: list[Routing], num_memories: int) -> torch.Tensor:
    """All layers' tokens pooled into one group."""
    probs = torch.cat([r.probs for r in routings], dim=0)  # (layers * N_tok, E)
    memory = torch.cat([r.memory for r in routings], dim=0)  # (layers * N_tok, k)
    return num_memories * (load_fraction(memory, num_memories) * probs.mean(0)).sum()


def load_balancing_loss_per_sequence(routings: list[Routing], seq_id: torch.Tensor, num_sequences: int,
                                     num_memories: int) -> torch.Tensor:
    """One group per (layer, sequence); the mean over groups. Sequences are rows or packed documents."""
    losses = []
    tokens = count_values(seq_id, num_sequences).float()  # (N,)
    for r in routings:
        topk = r.memory.shape[1]
        # (N, E) routed-slot counts and summed probabilities of each sequence.
        counts = torch.zeros(num_sequences, num_memories, device=r.probs.device)
        counts.index_put_((seq_id.repeat_interleave(topk), r.memory.reshape(-1)),
                          torch.ones(r.memory.numel(), device=r.probs.device), accumulate=True)
        prob_sum = torch.zeros(num_sequences, num_memories, device=r.probs.device).index_add_(0, seq_id, r.probs)
        denom = tokens.clamp(min=1).unsqueeze(1)
        per_seq = num_memories * ((counts / (denom * topk)) * (prob_sum / denom)).sum(1)  # (N,)
        present = (tokens > 0).float()  # a sequence with no token (impossible in practice) does not count
        losses.append((per_seq * present).sum() / present.sum().clamp(min=1))
    return torch.stack(losses).mean()


def router_z_loss(routings: list[Routing]) -> torch.Tensor:
    """Mean squared log-partition of the router logits (keeps logits small; ST-MoE)."""
    return torch.stack([torch.logsumexp(r.logits.float(), dim=-1).pow(2).mean() for r in routings]).mean()


def routing_entropy(routing: Routing) -> torch.Tensor:
    """Mean per-token entropy (nats) of the router distribution."""
    p = routing.probs
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
