"""The one public scan entry point: picks an implementation of the memory recurrence."""

from __future__ import annotations

import torch

from mom_lit.ops.recurrent import recurrent_scan

__all__ = ["scan"]


def scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    output_final_state: bool = True,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the memory recurrence (see ``mom_lit.ops.recurrent`` for the maths and shapes)."""
    if backend not in ("auto", "compiled", "eager", "triton"):
        raise ValueError(f"backend must be auto|compiled|eager|triton, got {backend!r}")
    return recurrent_scan(q, k, v, g=g, gk=gk, beta=beta, scale=scale, initial_state=initial_state,
                          cu_seqlens=cu_seqlens, output_final_state=output_final_state)
