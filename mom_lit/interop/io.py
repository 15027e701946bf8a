"""Files shared by the checkpoint formats: JSON configs, (sharded) safetensors, building a model from tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mom_lit.config import MoMConfig
from mom_lit.model import MoMForCausalLM

__all__ = ["build_model", "read_json", "read_safetensors_dir", "require_directory", "save_safetensors"]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def require_directory(directory: str | Path) -> Path:
    path = Path(directory).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint {path} is not a directory")
    return path


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name}")
    with path.open() as f:
        return json.load(f)


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors``, or of the shards named by ``model.safetensors.index.json``."""
    single = directory / SAFETENSORS
    if single.is_file():
        return load_file(single)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
    else:
        # An index-less set of shards (model-00001-of-00002.safetensors, ...) is still unambiguous.
        shards = sorted(p.name for p in directory.glob("model-*.safetensors"))
    if not shards:
        other = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = f" (found {other}: only safetensors weights are read)" if other else ""
        raise FileNotFoundError(f"{directory} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or model-*.safetensors{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = directory / shard
        if not path.is_file():
            raise FileNotFoundError(f"{index} names shard {shard}, which is missing")
        tensors.update(load_file(path))
    return tensors


def _umask() -> int:
    """The process's file-creation mask, read without changing it where the system tells it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors that share storage (views of one fused parameter): every entry is copied.
    save_file({name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}, str(path),
              metadata={"format": "pt"})
    # safetensors renames a private (0600) temporary file into place: give the weights the permissions of any
    # other new file, as the umask says, so that an exported model is as readable as its config.json.
    os.chmod(path, 0o666 & ~_umask())


def build_model(config: MoMConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                device: str | torch.device = "cpu") -> MoMForCausalLM:
    """A ``MoMForCausalLM(config)`` (eval mode) holding exactly ``state``; shapes and names are checked.

    The model is built on the meta device, so no time goes into a random initialisation that is overwritten.
    """
    with torch.device("meta"):
        model = MoMForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit MoMForCausalLM({config}): missing {missing}, "
                         f"unexpected {unexpected}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"checkpoint parameter {name!r} has shape {tuple(state[name].shape)}, "
                             f"the config needs {shape}")
    state = {name: t.to(device=device, dtype=dtype if dtype is not None else t.dtype) for name, t in state.items()}
    no_decay = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    model.load_state_dict(state, strict=True, assign=True)
    for name, p in model.named_parameters():
        if name in no_decay:  # assign=True brings new Parameter objects: keep the weight-decay exemption
            p._no_weight_decay = True
    if config.tie_embeddings:
        # assign=True replaced the embedding Parameter; the head must point at the new one again.
        model.lm_head.weight = model.embed.weight
    return model.eval()
