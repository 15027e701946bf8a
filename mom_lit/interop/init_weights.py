"""The weights a new training run starts from: an exported mom_lit directory, an fla directory or a ``.ckpt``.

Unlike resuming (``--ckpt_path``), only the model's parameters are taken: the optimizer, the step count, the
LR schedule and the data position start afresh. The directory's architecture must be the run's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mom_lit.config import MoMConfig

__all__ = ["ARCHITECTURE", "architecture_differences", "load_init_weights"]

ARCHITECTURE: tuple[str, ...] = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "head_v_dim",
                                 "mlp_hidden_size", "num_memories", "topk", "shared_memory", "update_rule",
                                 "conv_size", "use_output_gate", "norm_eps", "tie_embeddings")
"""What makes two configs compute the same function of the same parameters. Derived widths are compared rather
than the fields that set them (``expand_v``; ``mlp_ratio`` / ``intermediate_size``). Left out are the settings of
training and of the kernels: initialisation, auxiliary-loss weights, ``chunk_size``, ``backend``,
``activation_memory``."""
_GLA_ONLY = ("gla_gate_rank", "gla_gate_normalizer")  # parameters of the gla rule's gate only


def architecture_differences(run: MoMConfig, weights: MoMConfig) -> list[str]:
    """``"field: run X, weights Y"`` for every architecture field on which the two configs differ."""
    names = ARCHITECTURE + (_GLA_ONLY if "gla" in (run.update_rule, weights.update_rule) else ())
    return [f"{name}: run {getattr(run, name)!r}, weights {getattr(weights, name)!r}" for name in names
            if getattr(run, name) != getattr(weights, name)]


def load_init_weights(source: str | Path, config: MoMConfig) -> dict[str, torch.Tensor]:
    """The parameters (``MoMForCausalLM`` names, as stored) of the model in ``source`` for a run of ``config``.

    ``source`` is a directory written by ``MoMForCausalLM.save_pretrained`` / ``mom-lit convert`` (either
    ``config.json`` layout), an fla ``MomForCausalLM`` / ``GatedDeltaNetForCausalLM`` directory, or a
    ``MoMLightningModule`` checkpoint file, of which only the model's parameters are taken.

    Raises:
        FileNotFoundError: ``source`` does not exist or lacks its config or weights.
        ValueError: ``source`` is no model directory, or its architecture differs from ``config``'s (every
            differing field is named).
    """
    from mom_lit.interop.pretrained import load_checkpoint

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"init_weights {path}: no such model directory or checkpoint")
    loaded = load_checkpoint(path, dtype=None)
    differences = architecture_differences(config, loaded.config)
    if differences:
        raise ValueError(f"init_weights {path} holds another architecture than the run's model.config: "
                         + "; ".join(differences))
    return loaded.model.state_dict()
