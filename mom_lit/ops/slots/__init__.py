"""Slot stage: each memory-sorted slot's q, k, v and gates from the layer input (gather, projections, short
convolution, norms, gates); the reference short convolution and the Triton stage (public function
:func:`triton_slots`)."""

from mom_lit.ops.slots.conv import varlen_short_conv
from mom_lit.ops.slots.stage import (QKVSources, ScanInputs, SlotInputs, projected_slot_conv, slot_conv, slot_qkv,
                                     triton_slots)

__all__ = ["QKVSources", "ScanInputs", "SlotInputs", "projected_slot_conv", "slot_conv", "slot_qkv", "triton_slots",
           "varlen_short_conv"]
