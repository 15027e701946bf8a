"""Memory-recurrence ops: the token-by-token oracle, the chunked reference and the dispatching ``scan``."""

from mom_lit.ops.chunk import chunk_scan
from mom_lit.ops.dispatch import BACKENDS, scan
from mom_lit.ops.recurrent import recurrent_scan

__all__ = ["BACKENDS", "chunk_scan", "recurrent_scan", "scan"]
