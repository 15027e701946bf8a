"""mom_lit's model directory in the Hugging Face layout, read and written for ``MoMForCausalLM.from_pretrained``.

A directory holds:

- ``config.json``: a flat Hugging Face style config, ``{"model_type": "mom_lit", "architectures":
  ["MoMForCausalLM"], <every MoMConfig field>, "tokenizer": ..., "dtype": ...}``. ``tokenizer`` is ``"byte"``,
  ``"tokenizer.json"`` (the file beside it), a Hub repository id, or null when unknown.
- ``model.safetensors``: ``MoMForCausalLM.state_dict()``, with ``lm_head.weight`` left out when it is tied to
  the embedding (or shards named by ``model.safetensors.index.json``).
- the tokenizer: ``tokenizer.json`` for a Hugging Face tokenizer, ``tokenizer_config.json`` describing the
  byte-level one.
- ``README.md``: the model card (kept if the directory already has one).

Directories of the earlier layout, whose ``config.json`` nests the fields under ``"config"``, still load.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from mom_lit.config import MoMConfig
from mom_lit.data.tokenizers import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, ByteTokenizer
from mom_lit.interop.io import build_model, read_json, read_safetensors_dir, require_directory, save_safetensors
from mom_lit.model import MoMForCausalLM
from mom_lit.model_card import render_model_card

__all__ = ["MODEL_TYPE", "config_from_hf", "config_to_hf", "download_pretrained", "read_pretrained",
           "write_pretrained"]

MODEL_TYPE = "mom_lit"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
# Keys of config.json that describe the file rather than the model: not MoMConfig fields.
_BOOKKEEPING = ("model_type", "architectures", "tokenizer", "dtype", "torch_dtype", "transformers_version")
# What a Hub download fetches: configs, weights, the tokenizer and the card.
_HUB_FILES = ["*.json", "*.safetensors", CARD_FILE]


def config_to_hf(config: MoMConfig, tokenizer: str | None, dtype: torch.dtype | None) -> dict:
    """The flat ``config.json`` of a model of ``config``."""
    return {"model_type": MODEL_TYPE, "architectures": [MoMForCausalLM.__name__], **config.to_dict(),
            "tokenizer": tokenizer, "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None}


def config_from_hf(values: Mapping, source: str | Path = CONFIG_FILE) -> tuple[MoMConfig, str | None]:
    """(config, tokenizer entry) of a ``config.json``: the flat layout or the earlier nested one."""
    if values.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{source} is not a mom_lit config: model_type is {values.get('model_type')!r}, "
                         f"expected {MODEL_TYPE!r}")
    if isinstance(values.get("config"), dict):  # the earlier layout: {"model_type", "config": {...}, "tokenizer"}
        fields = values["config"]
    else:
        fields = {key: value for key, value in values.items() if key not in _BOOKKEEPING}
    try:
        config = MoMConfig.from_dict(dict(fields))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error
    return config, values.get("tokenizer")


def _byte_tokenizer_config() -> dict:
    return {"tokenizer_class": ByteTokenizer.__name__, "library_name": "mom_lit", "eos_token_id": ByteTokenizer.eos_id,
            "vocab_size": ByteTokenizer.vocab_size,
            "description": "UTF-8 bytes as tokens: ids 0-255 are the bytes, 256 ends a document; the vocabulary "
                           f"is padded to {ByteTokenizer.vocab_size}. Load it with mom_lit.data.load_tokenizer."}


def _tokenizer_source(tokenizer: str | None) -> tuple[str | None, Path | None]:
    """(entry for config.json, ``tokenizer.json`` file to copy or None). A missing path is taken as a Hub name."""
    if tokenizer is None or tokenizer == "byte":
        return tokenizer, None
    path = Path(tokenizer).expanduser()
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        path = path / TOKENIZER_FILE
    if path.is_file():
        return TOKENIZER_FILE, path
    return tokenizer, None


def write_pretrained(config: MoMConfig, state: Mapping[str, torch.Tensor], directory: str | Path,
                     tokenizer: str | None = None, dtype: torch.dtype | None = None,
                     model_id: str | None = None) -> Path:
    """Write a model directory (see the module docstring); a file-based ``tokenizer`` is copied in.

    ``state`` holds ``MoMForCausalLM`` names; ``dtype`` None keeps each tensor's own; ``model_id`` is the name the
    model card loads it by (default: the directory's name). Returns the directory.
    """
    entry, tokenizer_file = _tokenizer_source(tokenizer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    if dtype is not None:
        state = {name: t.to(dtype) for name, t in state.items()}
    stored = {t.dtype for t in state.values()}
    if tokenizer_file is not None and tokenizer_file.resolve() != (directory / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    if entry == "byte":
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(_byte_tokenizer_config(), indent=2) + "\n")
    hf_config = config_to_hf(config, entry, stored.pop() if len(stored) == 1 else None)
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    save_safetensors(state, directory / "model.safetensors")
    if not (directory / CARD_FILE).exists():  # a card edited by hand is kept
        num_parameters = sum(t.numel() for t in state.values())
        card = render_model_card(config, num_parameters, entry, model_id=model_id or directory.name)
        card.save(directory / CARD_FILE)
    return directory


def read_pretrained(directory: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> tuple[MoMForCausalLM, MoMConfig, str | None]:
    """(model in eval mode, config, tokenizer spec) of a model directory; ``dtype`` None keeps the stored one.

    The tokenizer spec is ``"byte"``, the path of the directory's ``tokenizer.json``, a Hub name, or None.
    """
    directory = require_directory(directory)
    config, tokenizer = config_from_hf(read_json(directory / CONFIG_FILE), directory / CONFIG_FILE)
    state = read_safetensors_dir(directory)
    if config.tie_embeddings:
        if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["embed.weight"]):
            raise ValueError(f"{directory}: tie_embeddings is set but lm_head.weight differs from embed.weight")
        if "embed.weight" in state:
            state["lm_head.weight"] = state["embed.weight"]
    if tokenizer == TOKENIZER_FILE:
        tokenizer = str(directory / TOKENIZER_FILE)
    return build_model(config, state, dtype, device), config, tokenizer


def download_pretrained(model_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                        force_download: bool = False, local_files_only: bool = False,
                        token: str | bool | None = None) -> Path:
    """A local folder with the files of ``model_id``: the folder itself, or a snapshot in the Hugging Face cache."""
    if Path(model_id).expanduser().is_dir():
        return Path(model_id).expanduser()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                  local_files_only=local_files_only, token=token, allow_patterns=_HUB_FILES))
