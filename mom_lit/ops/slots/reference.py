"""The slot stage's elementwise pieces in plain torch (the reference, also run through ``torch.compile``): the
gates of the scalar-gate rules, the low-rank per-key log-decay of ``gla`` and the split of the convolved q and k|v
into normalised heads. The projections and the gathers are the layer's (its weights); the short convolution is
``conv.py``'s."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mom_lit.norm import l2_normalize

__all__ = ["per_key_log_decay", "qkv_heads", "scalar_gates_reference"]


def scalar_gates_reference(rest: torch.Tensor, a_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
                           heads: int, has_beta: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Log-decay ``g = -exp(A_log) softplus(a + dt_bias)`` and ``beta = sigmoid(b)``, each (L, H) fp32 or None,
    from the gate columns ``rest = [b | a]`` (L, >= extra) of each slot (``mom_lit.ops.slots.gates`` in Triton)."""
    beta = g = None
    if has_beta:
        beta = torch.sigmoid(rest[:, :heads].float())  # (L, H)
    if a_log is not None:
        a = rest[:, heads:2 * heads] if has_beta else rest[:, :heads]
        g = -a_log.float().exp() * F.softplus(a.float() + dt_bias.float())  # (L, H)
    return g, beta


def per_key_log_decay(down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor, normalizer: float) -> torch.Tensor:
    """``gla``'s per-key log-decay ``logsigmoid(down @ up^T + bias) / normalizer`` of every (token, stream): down
    (N, S, R) rank-R codes, up (S, H*K, R), bias (S, H*K) -> (N, S, H*K) fp32 (no (N, S, H*K, R) temporary)."""
    logit = torch.einsum("nsr,skr->nsk", down.float(), up.float()) + bias.float()
    return F.logsigmoid(logit) / normalizer


def qkv_heads(q: torch.Tensor, kv: torch.Tensor, heads: int, key_dim: int, value_dim: int):
    """Convolved q (..., HK) and k|v (..., HK + HV) -> L2-normalised q, k (..., H, K) and v (..., H, V)."""
    k, v = kv.split([heads * key_dim, heads * value_dim], dim=-1)
    lead = q.shape[:-1]
    return (l2_normalize(q.reshape(*lead, heads, key_dim)), l2_normalize(k.reshape(*lead, heads, key_dim)),
            v.reshape(*lead, heads, value_dim))
