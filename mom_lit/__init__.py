"""mom_lit: Mixture-of-Memories linear-recurrent language models."""

from mom_lit.config import PRESETS, UPDATE_RULES, MoMConfig
from mom_lit.layer import LayerState, MoMLayer
from mom_lit.model import MoMCache, MoMForCausalLM, MoMOutput

__all__ = ["MoMConfig", "PRESETS", "UPDATE_RULES", "MoMForCausalLM", "MoMOutput", "MoMCache", "MoMLayer",
           "LayerState"]
__version__ = "0.1.0"
