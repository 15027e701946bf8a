"""Slot stage: each memory-sorted slot's q, k, v and gates from the layer input (gather, projections, short
convolution, norms, gates); the reference short convolution and the Triton stage."""

from mom_lit.ops.slots.conv import varlen_short_conv
from mom_lit.ops.slots.stage import SlotSourceShare, projected_slot_conv, rebuild_projected_qkv, slot_conv, slot_qkv

__all__ = ["SlotSourceShare", "projected_slot_conv", "rebuild_projected_qkv", "slot_conv", "slot_qkv",
           "varlen_short_conv"]
