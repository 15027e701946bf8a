"""The mix stage in plain torch: the routing-weighted sum of every token's slot outputs, then the gated RMSNorm."""

from __future__ import annotations

import torch

from mom_lit.norm import GatedRMSNorm

__all__ = ["mix_reference"]


def mix_reference(o: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, norm: GatedRMSNorm) -> torch.Tensor:
    """(N_tok, J, H, V) slot outputs, (N_tok, J) routing weights and (N_tok, H, V) gate or None -> (N_tok, H, V)
    ``norm(sum_j weight[:, j] o[:, j], gate)`` in o's dtype (the sum rounds to it before the norm)."""
    o = (o * weight.to(o.dtype)[:, :, None, None]).sum(1)  # (N_tok, J, H, V) -> (N_tok, H, V)
    return norm(o, gate)
