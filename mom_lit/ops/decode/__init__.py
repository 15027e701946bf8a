"""Decoding step: one token of B sequences through their selected memories (reference and Triton)."""

from mom_lit.ops.decode.step import decode_step, decode_step_reference

__all__ = ["decode_step", "decode_step_reference"]
