"""Mix stage: the weighted sum of each token's slot outputs and the gated RMSNorm (reference and Triton)."""

from mom_lit.ops.mix.reference import mix_reference
from mom_lit.ops.mix.stage import mix_gated_rms_norm

__all__ = ["mix_gated_rms_norm", "mix_reference"]
