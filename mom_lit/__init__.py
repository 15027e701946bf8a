"""mom_lit: Mixture-of-Memories linear-recurrent language models."""

from mom_lit.config import PRESETS, MoMConfig

__all__ = ["MoMConfig", "PRESETS"]
__version__ = "0.1.0"
