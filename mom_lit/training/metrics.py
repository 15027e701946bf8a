"""Accuracy per benchmark slice (e.g. number of key-value pairs of an MQAR example), synchronised across ranks."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class SliceAccuracy(Metric):
    """Token accuracy on the supervised positions (target != -100), grouped by a per-example slice id.

    States are per-example counts concatenated across batches and ranks; grouping happens once in
    ``compute`` so that ``update`` never reads a value back to the host.
    """

    full_state_update = False

    def __init__(self, ignore_index: int = -100, **kwargs):
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("slices", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("total", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor, slices: torch.Tensor) -> None:
        """logits (B, T, V), targets (B, T), slices (B,)."""
        if slices.shape != targets.shape[:1]:
            raise ValueError(f"slices must have shape ({targets.shape[0]},), got {tuple(slices.shape)}")
        mask = targets != self.ignore_index
        hits = (logits.argmax(-1) == targets) & mask
        self.slices.append(slices.reshape(-1).long())
        self.correct.append(hits.sum(-1))
        self.total.append(mask.sum(-1))

    def compute(self) -> dict[int, torch.Tensor]:
        """{slice id: accuracy over all its supervised tokens}; slices without such tokens are left out."""
        slices, correct, total = (torch.cat(s) if isinstance(s, list) else s
                                  for s in (self.slices, self.correct, self.total))
        ids, group = torch.unique(slices, return_inverse=True)
        correct = torch.zeros(len(ids), device=ids.device).index_add_(0, group, correct.float())
        total = torch.zeros(len(ids), device=ids.device).index_add_(0, group, total.float())
        return {int(i): c / t for i, c, t in zip(ids.tolist(), correct, total) if t > 0}
