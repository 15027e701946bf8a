"""Memory-recurrence ops: the token-by-token oracle, the chunked reference and the dispatching ``scan``."""

from mom_lit.ops.dispatch import scan
from mom_lit.ops.recurrent import recurrent_scan

__all__ = ["recurrent_scan", "scan"]
