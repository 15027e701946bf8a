"""Memory scan: the token-by-token oracle, the chunked reference, the Triton kernels and the dispatching ``scan``."""

from mom_lit.ops.scan.chunk import chunk_scan
from mom_lit.ops.scan.dispatch import scan
from mom_lit.ops.scan.recurrent import recurrent_scan

__all__ = ["chunk_scan", "recurrent_scan", "scan"]
