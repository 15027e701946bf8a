"""Triton kernels of the memory scan (CUDA; the kernels also run on CPU under ``TRITON_INTERPRET=1``)."""

from mom_lit.ops.scan.triton.scan import triton_scan

__all__ = ["triton_scan"]
