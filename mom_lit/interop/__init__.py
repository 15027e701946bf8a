"""Checkpoint formats: flash-linear-attention (fla) directories, Lightning ``.ckpt`` files, mom_lit directories.

``mom-lit convert --help`` converts between them from the command line.
"""

from mom_lit.interop.fla import (FLA_GDN, FLA_MODEL_TYPES, FLA_MOM, config_from_fla, config_to_fla,
                                 fla_model_type_for, load_fla, save_fla, state_dict_from_fla, state_dict_to_fla)
from mom_lit.interop.pretrained import (PRETRAINED_MODEL_TYPE, LoadedModel, export_lightning_checkpoint,
                                        load_checkpoint, load_lightning_checkpoint, load_pretrained,
                                        read_lightning_checkpoint, save_pretrained)

__all__ = ["FLA_GDN", "FLA_MODEL_TYPES", "FLA_MOM", "LoadedModel", "PRETRAINED_MODEL_TYPE", "config_from_fla",
           "config_to_fla", "export_lightning_checkpoint", "fla_model_type_for", "load_checkpoint", "load_fla",
           "load_lightning_checkpoint", "load_pretrained", "read_lightning_checkpoint", "save_fla",
           "save_pretrained", "state_dict_from_fla", "state_dict_to_fla"]
