"""Auxiliary router losses (Switch-style load balancing: global, per layer, or per layer and sequence; router
z-loss) and the chunked language-model cross entropy.

Load balance of one group of tokens (routed slots ``k`` per token, E memories):
    f_m = (slots routed to m) / (tokens * k),   P_m = mean router probability of m,   loss = E * sum_m f_m P_m
so a perfectly balanced router scores 1. ``f`` is a count (no gradient); the gradient flows through ``P``.
Only real tokens of the batch enter (there is no padding in a MoM batch: packed documents are separate
sequences and every token belongs to exactly one).
"""

from __future__ import annotations

import torch

from mom_lit.layout import count_values
from mom_lit.fused import compiled_body
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


def load_balancing_loss_per_layer(routings: list[Routing], num_memories: int) -> torch.Tensor:
    """One group per layer (all of the batch's tokens of that layer); the mean over layers. One count over
    layer-offset memory ids instead of a count per layer."""
    probs = torch.stack([r.probs for r in routings])  # (L, N_tok, E)
    memory = torch.stack([r.memory for r in routings])  # (L, N_tok, k)
    layers = memory.shape[0]
    offset = torch.arange(layers, device=memory.device).view(layers, 1, 1) * num_memories
    counts = count_values(memory + offset, layers * num_memories).float().view(layers, num_memories)  # (L, E)
    fraction = counts / memory[0].numel()
    return num_memories * (fraction * probs.mean(1)).sum(-1).mean()


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


# Language-model loss -------------------------------------------------------------------------------------------
def _chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: about 2^26 fp32 logits (256 MiB) at a time."""
    return max(1, (1 << 26) // max(vocab_size, 1))


def _ce_chunk(logits: torch.Tensor, t: torch.Tensor, ignore_index: int, with_grad: bool):
    """Summed cross entropy of one chunk of (n, vocab) logits and, if asked, its gradient d loss / d logits
    (softmax - onehot(target) on valid rows, zero on ignored rows) in the logits' dtype."""
    x = logits.float()  # the eager head's output is rounded to its dtype before the upcast too
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    picked = x.gather(1, safe[:, None]).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    if not with_grad:
        return loss, None
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == safe[:, None]  # (n, vocab)
    grad = ((x - lse[:, None]).exp() - onehot.float()) * valid[:, None]
    return loss, grad.to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of ``hidden @ weight.T``; the gradients are computed chunk by chunk in the forward,
    so neither the logits nor their gradient ever exist for all rows at once."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, compile):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        chunk = compiled_body(_ce_chunk, hidden, compile)  # compiled: one fused pass over each chunk's logits
        for s in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[s:s + chunk_rows], targets[s:s + chunk_rows]
            loss, grad = chunk(h @ weight.t(), t, ignore_index, True)
            total += loss
            if need_h:
                dh[s:s + chunk_rows] = grad @ weight
            if need_w:
                dw += (grad.t() @ h).float()  # (vocab, D); fp32 sum of the per-chunk products
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad_total.to(dh.dtype)
        dw = None if dw is None else (dw * grad_total).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None,
                         compile: bool | None = None) -> torch.Tensor:
    """Summed cross entropy of the logits ``hidden @ weight.T`` against ``targets`` (rows equal to
    ``ignore_index`` add nothing), without materialising all logits: the rows go through in chunks of
    ``chunk_rows`` (default: about 2^26 logits), so memory holds one chunk's fp32 logits instead of
    (rows x vocab) fp32 logits and their gradient.

    hidden: (N, D); weight: (vocab, D); targets: (N,) int. Returns a 0-dim fp32 tensor, differentiable in
    ``hidden`` and ``weight`` (their gradients are computed during this call when autograd needs them).
    ``compile``: run each chunk's loss and gradient through ``torch.compile`` (None: for CUDA inputs).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, D) and weight (vocab, D), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    chunk_rows = _chunk_rows(weight.shape[0]) if chunk_rows is None else int(chunk_rows)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    targets = targets.long()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows, compile)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    chunk = compiled_body(_ce_chunk, hidden, compile)
    for s in range(0, hidden.shape[0], chunk_rows):
        total += chunk(hidden[s:s + chunk_rows] @ weight.t(), targets[s:s + chunk_rows], ignore_index, False)[0]
    return total
