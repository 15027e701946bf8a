"""mom_lit's own checkpoint directory, Lightning checkpoints, and one loader for every format.

A *pretrained directory* is what ``MoMForCausalLM.save_pretrained`` writes: a flat ``config.json`` with
``"model_type": "mom_lit"``, ``model.safetensors``, the tokenizer and a model card (layout in
:mod:`mom_lit.interop.hub`, which also reads the earlier layout that nested the fields under ``"config"``).

A Lightning checkpoint (``.ckpt`` of ``MoMLightningModule``) holds the model under ``state_dict`` with the prefix
``model.``, its :class:`MoMConfig` under ``hyper_parameters["config"]`` and, when the data module saved its
hyper-parameters (``TextDataModule`` does), the tokeniser under ``datamodule_hyper_parameters["tokenizer"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mom_lit.config import MoMConfig
from mom_lit.interop.fla import FLA_MODEL_TYPES, load_fla
from mom_lit.interop.hub import MODEL_TYPE, read_pretrained, write_pretrained
from mom_lit.interop.io import build_model, read_json, require_directory
from mom_lit.model import MoMForCausalLM
from mom_lit.safe_load import load_checkpoint_file

__all__ = ["LoadedModel", "PRETRAINED_MODEL_TYPE", "export_lightning_checkpoint", "load_checkpoint",
           "load_lightning_checkpoint", "load_pretrained", "read_lightning_checkpoint", "save_pretrained"]

PRETRAINED_MODEL_TYPE = MODEL_TYPE
_TOKENIZER_FILE = "tokenizer.json"
# Segments that wrappers (activation checkpointing, FSDP, torch.compile) may leave in parameter names.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


@dataclass
class LoadedModel:
    model: MoMForCausalLM
    config: MoMConfig
    tokenizer: str | None
    """Tokeniser spec recorded with the checkpoint (``"byte"``, a path, a hub name), or None if unknown."""
    source: str
    """``"lightning"``, ``"pretrained"`` or the fla model type."""


# Our own directory ----------------------------------------------------------------------------------------------
def save_pretrained(model: MoMForCausalLM, directory: str | Path, tokenizer: str | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a pretrained directory; a file-based ``tokenizer`` is copied in. Returns the directory."""
    return model.save_pretrained(directory, tokenizer=tokenizer, dtype=dtype)


def _write_pretrained(config: MoMConfig, state: dict[str, torch.Tensor], directory: str | Path,
                      tokenizer: str | None, dtype: torch.dtype | None) -> Path:
    return write_pretrained(config, state, directory, tokenizer, dtype)


def _read_pretrained(directory: Path, dtype: torch.dtype | None, device) -> LoadedModel:
    model, config, tokenizer = read_pretrained(directory, dtype, device)
    return LoadedModel(model, config, tokenizer, "pretrained")


def load_pretrained(directory: str | Path, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[MoMForCausalLM, MoMConfig]:
    """Load a directory written by :func:`save_pretrained` or :func:`export_lightning_checkpoint`.

    ``dtype`` None keeps the stored dtype. Returns the model (eval mode) and its config.
    """
    loaded = _read_pretrained(require_directory(directory), dtype, device)
    return loaded.model, loaded.config


# Lightning checkpoints ------------------------------------------------------------------------------------------
def _canonical(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def read_lightning_checkpoint(path: str | Path) -> tuple[MoMConfig, dict[str, torch.Tensor], str | None]:
    """(config, model parameters with ``MoMForCausalLM`` names, tokeniser spec or None) of a ``.ckpt`` file.

    Loaded without running code (:func:`~mom_lit.safe_load.load_checkpoint_file`): a file holding anything but
    tensors, plain values and mom_lit's own types is refused with ``UnsafeCheckpointError``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory: a sharded (distributed) Lightning checkpoint. Consolidate it "
                         f"into one file first: python -m lightning.pytorch.utilities.consolidate_checkpoint {path}")
    ckpt: dict[str, Any] = load_checkpoint_file(path, map_location="cpu")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = ckpt.get("hyper_parameters") or {}
    if "config" not in hparams:
        raise ValueError(f"{path} has no hyper_parameters['config']: not a MoMLightningModule checkpoint")
    config = hparams["config"]
    config = config if isinstance(config, MoMConfig) else MoMConfig.from_dict(dict(config))
    state = {_canonical(name)[len("model."):]: t for name, t in ckpt["state_dict"].items()
             if _canonical(name).startswith("model.")}
    if config.tie_embeddings and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    data_hparams = ckpt.get("datamodule_hyper_parameters") or {}
    tokenizer = data_hparams.get("tokenizer", hparams.get("tokenizer"))
    return config, state, tokenizer if isinstance(tokenizer, str) else None


def load_lightning_checkpoint(path: str | Path, dtype: torch.dtype | None = torch.float32,
                              device: str | torch.device = "cpu") -> tuple[MoMForCausalLM, MoMConfig]:
    """The model (eval mode) and config of a ``MoMLightningModule`` checkpoint file."""
    config, state, _ = read_lightning_checkpoint(path)
    return build_model(config, state, dtype, device), config


def export_lightning_checkpoint(path: str | Path, directory: str | Path, dtype: torch.dtype | None = None,
                                tokenizer: str | None = None) -> Path:
    """Write the model of a Lightning ``.ckpt`` as a pretrained directory (no optimizer or loop state).

    ``tokenizer`` overrides the one recorded in the checkpoint. The parameters are checked against the config
    before anything is written. Returns the directory.
    """
    config, state, recorded = read_lightning_checkpoint(path)
    build_model(config, state, None, "meta")  # validates names and shapes, copies nothing
    return _write_pretrained(config, state, directory, tokenizer if tokenizer is not None else recorded, dtype)


# Any format -----------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu") -> LoadedModel:
    """Load a Lightning ``.ckpt`` file, a pretrained directory, or an fla checkpoint directory.

    A directory's kind is read from ``config.json``'s ``model_type``. An fla directory's tokeniser is the
    ``tokenizer.json`` beside the weights, if there is one.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file() or (path.is_dir() and not (path / "config.json").is_file() and (path / "meta.pt").is_file()):
        config, state, tokenizer = read_lightning_checkpoint(path)
        return LoadedModel(build_model(config, state, dtype, device), config, tokenizer, "lightning")
    model_type = read_json(path / "config.json").get("model_type")
    if model_type == PRETRAINED_MODEL_TYPE:
        return _read_pretrained(path, dtype, device)
    if model_type in FLA_MODEL_TYPES:
        model, config = load_fla(path, dtype, device)
        tokenizer = str(path) if (path / _TOKENIZER_FILE).is_file() else None
        return LoadedModel(model, config, tokenizer, model_type)
    raise ValueError(f"{path / 'config.json'} has model_type {model_type!r}; expected "
                     f"{PRETRAINED_MODEL_TYPE!r} or one of fla's {FLA_MODEL_TYPES}")
