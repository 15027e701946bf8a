"""Token log-probabilities of many sequences under a MoM model: packed batches, chunked long inputs.

Short sequences are packed into one row with ``cu_seqlens`` (no padding, no information crossing a boundary);
a sequence longer than the token budget runs alone in chunks that carry the recurrent cache, so memory stays
bounded by the budget whatever the length. Both give the same numbers as one unpacked forward pass over each
sequence (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mom_lit.model import MoMForCausalLM

__all__ = ["TokenScores", "pack_batches", "score_continuations"]


@dataclass
class TokenScores:
    """Scores of the last ``n`` tokens of one sequence, each predicted from all tokens before it."""

    logprobs: torch.Tensor
    """(n,) float32 log-probabilities."""
    greedy: torch.Tensor
    """(n,) bool: the token is the model's most likely next token."""

    @property
    def total(self) -> float:
        return float(self.logprobs.double().sum())

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())


def pack_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Group sequence indices, longest first, into batches of at most ``max_batch_tokens`` tokens in total.

    A sequence longer than the budget forms a batch of its own. Longest-first keeps the packed rows full and puts
    the batches most likely to run out of memory at the start.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (used + lengths[i] > max_batch_tokens or full):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def _scored(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) logits and (K,) targets -> (K,) float32 log-probabilities and (K,) greedy flags."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (K, V)
    picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)  # (K,)
    return picked, logits.argmax(-1) == targets


def _packed(model: MoMForCausalLM, seqs: Sequence[Sequence[int]], counts: Sequence[int],
            device: torch.device) -> Iterator[TokenScores]:
    # Each sequence feeds all its tokens but the last; position t predicts token t + 1.
    inputs = [s[:-1] for s in seqs]
    lengths = torch.tensor([len(x) for x in inputs])
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])  # (N+1,)
    flat = torch.tensor([t for x in inputs for t in x], dtype=torch.long)
    logits = model(flat[None].to(device), cu_seqlens=cu_seqlens.to(device)).logits[0]  # (total, V)
    # Positions and targets of the scored tokens: the last counts[i] positions of each sequence.
    positions = torch.cat([torch.arange(int(end) - n, int(end)) for end, n in zip(cu_seqlens[1:], counts)])
    targets = torch.tensor([t for s, n in zip(seqs, counts) for t in s[len(s) - n:]], dtype=torch.long)
    picked, greedy = _scored(logits[positions.to(device)], targets.to(device))
    for lp, gr in zip(picked.cpu().split(list(counts)), greedy.cpu().split(list(counts))):
        yield TokenScores(lp, gr)


def _chunked(model: MoMForCausalLM, seq: Sequence[int], count: int, chunk: int, device: torch.device) -> TokenScores:
    tokens = torch.tensor(seq, dtype=torch.long)
    inputs, targets = tokens[:-1], tokens[1:]
    first = inputs.numel() - count  # first scored position
    cache = None
    picked, greedy = [], []
    for start in range(0, inputs.numel(), chunk):
        stop = min(start + chunk, inputs.numel())
        out = model(inputs[None, start:stop].to(device), cache=cache, use_cache=True)
        cache = out.cache
        lo = max(first, start)
        if lo < stop:
            p, g = _scored(out.logits[0, lo - start:], targets[lo:stop].to(device))
            picked.append(p.cpu())
            greedy.append(g.cpu())
    return TokenScores(torch.cat(picked), torch.cat(greedy))


@torch.no_grad()
def score_continuations(model: MoMForCausalLM, sequences: Sequence[Sequence[int]], num_scored: Sequence[int],
                        max_batch_tokens: int = 4096, max_batch_size: int | None = None) -> list[TokenScores]:
    """Log-probabilities of the last ``num_scored[i]`` tokens of ``sequences[i]``, in the order given.

    Args:
        model: the language model (its mode is left as it is; call ``eval()`` first).
        sequences: token id lists; every scored token must have at least one token before it.
        num_scored: how many trailing tokens of each sequence to score (0 gives empty scores).
        max_batch_tokens: token budget of one forward pass: shorter sequences are packed together up to it,
            longer ones run alone in chunks of this size that carry the recurrent cache.
        max_batch_size: at most this many sequences per packed batch (None: no limit).
    """
    if len(sequences) != len(num_scored):
        raise ValueError(f"{len(sequences)} sequences but {len(num_scored)} num_scored values")
    for i, (seq, n) in enumerate(zip(sequences, num_scored)):
        if not 0 <= n < max(len(seq), 1):
            raise ValueError(f"sequence {i}: cannot score {n} of its {len(seq)} tokens (the first has no context)")
    device = model.embed.weight.device
    results: list[TokenScores | None] = [None] * len(sequences)
    empty = TokenScores(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    todo = [i for i, n in enumerate(num_scored) if n > 0]
    for i in set(range(len(sequences))) - set(todo):
        results[i] = empty
    lengths = [len(sequences[i]) - 1 for i in todo]  # tokens fed to the model
    for batch in pack_batches(lengths, max_batch_tokens, max_batch_size):
        ids = [todo[b] for b in batch]
        if len(ids) == 1 and lengths[batch[0]] > max_batch_tokens:
            results[ids[0]] = _chunked(model, sequences[ids[0]], num_scored[ids[0]], max_batch_tokens, device)
            continue
        scores = _packed(model, [sequences[i] for i in ids], [num_scored[i] for i in ids], device)
        for i, score in zip(ids, scores):
            results[i] = score
    return results  # type: ignore[return-value]
