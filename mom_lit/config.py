"""Typed, validated configuration of a MoM language model, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

UpdateRule = Literal["gated_delta", "delta", "gla", "simple_gla", "linear"]
UPDATE_RULES: tuple[str, ...] = ("gated_delta", "delta", "gla", "simple_gla", "linear")
AuxLossType = Literal["global", "per_layer", "per_sequence"]
AUX_LOSS_TYPES: tuple[str, ...] = ("global", "per_layer", "per_sequence")
Backend = Literal["auto", "triton", "compiled", "eager"]
ActivationMemory = Literal["fast", "balanced", "lean"]


@dataclass
class MoMConfig:
    """Shape and behaviour of a Mixture-of-Memories language model.

    Every field is validated in ``__post_init__``; an invalid value raises ``ValueError`` naming the field.
    """

    vocab_size: int = 32000
    """Size of the token vocabulary (embedding rows and LM-head outputs)."""
    hidden_size: int = 1024
    """Width of the residual stream."""
    num_layers: int = 24
    """Number of blocks (MoM layer + MLP each)."""
    num_heads: int = 4
    """Heads of every memory; each head holds a (head_dim x head_v_dim) state matrix."""
    head_dim: int = 256
    """Query/key width per head."""
    expand_v: float = 1.0
    """Value width per head is ``head_dim * expand_v``."""
    mlp_ratio: float = 3.0
    """SwiGLU hidden width is ``mlp_ratio * hidden_size * 2/3``, rounded up to a multiple of 64."""
    intermediate_size: int | None = None
    """Explicit SwiGLU hidden width; overrides ``mlp_ratio`` when set."""
    num_memories: int = 4
    """Routed memories per layer. 1 (with topk 1 and no shared memory) is a plain single-memory layer."""
    topk: int = 2
    """Memories each token writes to and reads from."""
    shared_memory: bool = True
    """An always-active memory beside the routed ones."""
    update_rule: UpdateRule = "gated_delta"
    """Memory recurrence: gated_delta | delta | gla | simple_gla | linear."""
    conv_size: int = 4
    """Kernel of the causal short convolution on q, k, v (0 disables it)."""
    use_output_gate: bool = True
    """Gate the per-head output RMSNorm by ``swish(W x)``."""
    gla_gate_rank: int = 16
    """Rank of the low-rank per-key-dimension gate projection of the ``gla`` rule."""
    gla_gate_normalizer: float = 16.0
    """The ``gla`` log-gate is ``logsigmoid(.) / gla_gate_normalizer`` (slow forgetting at init)."""
    norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = True
    """Share the input embedding with the LM head."""
    initializer_range: float = 0.02
    """Std of the normal init of embeddings and MLP/LM-head matrices."""
    aux_loss_type: AuxLossType = "global"
    """Which tokens one load-balancing group holds (each group scores ``E * sum_e f_e * P_e``, 1 when balanced).
    ``global``: all layers' tokens of the batch pooled (as Mixtral's loss does); single layers may stay imbalanced
    while the pooled load is even. ``per_layer``: one group per layer over the batch's tokens, the mean over layers
    (the MoM paper's layer-wise loss). ``per_sequence``: one group per (layer, sequence), the mean over groups."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss in ``loss``."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of router logits); 0 disables it."""
    chunk_size: int = 64
    """Chunk length of the chunked scan."""
    backend: Backend = "auto"
    """Scan backend: auto (Triton on CUDA, compiled reference elsewhere) | triton | compiled | eager."""
    activation_memory: ActivationMemory = "fast"
    """What the Triton path keeps for the backward. ``fast``: the scan's q, k, v, its W, U and the chunks'
    triangular inverses, and the projections (in bf16 on Hopper / Blackwell GPUs a grouped product of each token's
    selected streams only, else every stream's). ``balanced``: the projections only; the scan rebuilds q, k, v
    from them (the slot stage's forward again) and W, U and the inverses (delta rules) in its backward: per scanned
    slot and head 3K + 2V elements and 64 fp32 values less (2K + V elements without a delta rule). ``lean``: as
    balanced, and the backward recomputes the grouped projections from the layer input (once, for the scan and the
    slot stage) instead of keeping them: neither the query projection nor the slots x heads x (K + V + 2) elements
    of the per-stream ones. The reference 12-layer model at 8 x 2048 (bf16 weights, H200, graphed step): 16.9 GiB
    fast, 10.9 GiB balanced at 0.91x fast's tokens/s, 8.5 GiB lean at 0.87x (BENCHMARKS.md). Triton path only;
    under bf16-mixed autocast the projections run in bf16 from one cast of the layer input, so the same applies
    (lean 10.6 GiB there, against 19.7 GiB, measured before fast took the grouped product too)."""

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoMConfig.{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "num_memories", "topk",
                     "chunk_size", "gla_gate_rank"):
            positive(name)
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"MoMConfig.update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")
        if self.aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(f"MoMConfig.aux_loss_type must be one of {AUX_LOSS_TYPES}, got {self.aux_loss_type!r}")
        if self.backend not in ("auto", "triton", "compiled", "eager"):
            raise ValueError(f"MoMConfig.backend must be auto|triton|compiled|eager, got {self.backend!r}")
        if self.activation_memory not in ("fast", "balanced", "lean"):
            raise ValueError("MoMConfig.activation_memory must be 'fast', 'balanced' or 'lean', "
                             f"got {self.activation_memory!r}")
        if self.topk > self.num_memories:
            raise ValueError(f"MoMConfig.topk={self.topk} exceeds num_memories={self.num_memories}")
        if self.expand_v <= 0 or float(self.head_dim * self.expand_v) != int(self.head_dim * self.expand_v):
            raise ValueError(
                f"MoMConfig.expand_v={self.expand_v!r} must be positive and make head_dim*expand_v an integer "
                f"(head_dim={self.head_dim})")
        if not isinstance(self.conv_size, int) or self.conv_size < 0:
            raise ValueError(f"MoMConfig.conv_size must be a non-negative integer, got {self.conv_size!r}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"MoMConfig.intermediate_size must be positive, got {self.intermediate_size!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"MoMConfig.mlp_ratio must be positive, got {self.mlp_ratio!r}")
        for name in ("aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoMConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"MoMConfig.norm_eps must be positive, got {self.norm_eps!r}")
        if self.gla_gate_normalizer <= 0:
            raise ValueError(f"MoMConfig.gla_gate_normalizer must be positive, got {self.gla_gate_normalizer!r}")

    # Derived sizes -----------------------------------------------------------------------------------------
    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim

    @property
    def mlp_hidden_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        width = int(self.hidden_size * self.mlp_ratio * 2 / 3)
        return 64 * ((width + 63) // 64)

    @property
    def num_streams(self) -> int:
        """Memories with their own state: routed ones plus the shared one."""
        return self.num_memories + int(self.shared_memory)

    @property
    def has_router(self) -> bool:
        return self.num_memories > 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MoMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MoMConfig fields: {unknown}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MoMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown MoMConfig preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_PAPER_340M = dict(hidden_size=1024, num_layers=24, num_heads=4, head_dim=256, expand_v=1.0, mlp_ratio=3.0,
                   num_memories=4, topk=2, shared_memory=True, vocab_size=32000, tie_embeddings=True,
                   aux_loss_type="per_layer")

PRESETS: dict[str, dict] = {
    # A few thousand parameters per layer: unit tests and smoke runs.
    "debug": dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, head_dim=16, num_memories=4, topk=2,
                  shared_memory=True, chunk_size=16),
    # Trains on a 2-core CPU in minutes (byte-level vocabulary).
    "quickstart": dict(vocab_size=256, hidden_size=128, num_layers=4, num_heads=2, head_dim=32, num_memories=4,
                       topk=2, shared_memory=True),
    # The paper's 340M/380M recipe (24 layers, hidden 1024, 4 heads x 256, E=4, top-2, shared memory, per-layer
    # load balancing).
    "mom_340m": dict(_PAPER_340M),
    # The single-memory Gated DeltaNet baseline of the same shape.
    "gdn_340m": dict(_PAPER_340M, num_memories=1, topk=1, shared_memory=False),
    # The paper's 1.3B shape.
    "mom_1.3b": dict(_PAPER_340M, hidden_size=2048, mlp_ratio=4.0),
    "gdn_1.3b": dict(_PAPER_340M, hidden_size=2048, mlp_ratio=4.0, num_memories=1, topk=1, shared_memory=False),
}
