"""Model-level invariants shared by the tests of the fast paths (imported by test modules, not collected)."""

from __future__ import annotations

import torch


def assert_model_invariants(model, ids: torch.Tensor, cut: int, cu_seqlens: list[int], prefill: int, atol: float,
                            seed: int = 1) -> None:
    """For ``model`` in eval mode and ``ids`` (2, T), under ``torch.no_grad()``, within ``atol``:

    * causality: tokens from ``cut`` on, replaced, leave the logits before ``cut`` unchanged;
    * row independence: row 1 replaced leaves row 0 unchanged;
    * packing: row 0 packed as the documents ``cu_seqlens`` (0 ... T) equals each document run alone;
    * decoding: a prefill of ``prefill`` tokens, then one token per step on the cache, equals the full forward.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, seq_len = ids.shape
    vocab = model.config.vocab_size

    def fresh(*shape):
        return torch.randint(0, vocab, shape, generator=gen).to(ids.device)

    full = model(ids).logits
    tol = dict(atol=atol, rtol=0)
    changed = ids.clone()
    changed[:, cut:] = fresh(batch, seq_len - cut)
    torch.testing.assert_close(model(changed).logits[:, :cut], full[:, :cut], **tol)
    other = ids.clone()
    other[1] = fresh(seq_len)
    torch.testing.assert_close(model(other).logits[0], full[0], **tol)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=ids.device)
    packed = model(ids[:1], cu_seqlens=cu).logits[0]
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        torch.testing.assert_close(packed[start:end], model(ids[:1, start:end]).logits[0], **tol)
    out = model(ids[:, :prefill], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(prefill, seq_len):
        step = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        pieces.append(step.logits)
        cache = step.cache
    torch.testing.assert_close(torch.cat(pieces, 1), full, **tol)
