"""Typed, validated configuration of a MoM language model, with named presets."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Literal, NoReturn, get_args, get_type_hints

UpdateRule = Literal["gated_delta", "delta", "gla", "simple_gla", "linear"]
UPDATE_RULES: tuple[str, ...] = get_args(UpdateRule)
AuxLossType = Literal["global", "per_layer", "per_sequence"]
AUX_LOSS_TYPES: tuple[str, ...] = get_args(AuxLossType)
Backend = Literal["auto", "triton", "compiled", "eager"]
BACKENDS: tuple[str, ...] = get_args(Backend)
Stages = Literal["auto", "triton", "reference"]
Projections = Literal["auto", "dense"]
ActivationMemory = Literal["fast", "balanced", "lean"]


class ConfigError(ValueError):
    """An invalid ``MoMConfig`` value; the message names the field and the value."""


@dataclass
class MoMConfig:
    """Shape and behaviour of a Mixture-of-Memories language model.

    Every field's type and range are validated in ``__post_init__``; an invalid value raises ``ConfigError`` (a
    ``ValueError``) naming the field and the value.
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
    chunk_size: int | None = None
    """Chunk length of the chunked reference scan (``compiled``, ``eager``). None: the plan's choice for the head
    dims, 32 where the key and value heads are at most 32 wide and 64 above (the faster of the two on CPU: a
    token's intra-chunk work grows with C, its share of the per-chunk state products with K V / C). The Triton
    scan's tile is 64: with ``backend="triton"`` another value is an error; with ``auto`` the Triton scan runs its
    own tile (the plan, logged once, says which chunk length runs)."""
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
    of the per-stream ones. Each step down trades speed for memory (BENCHMARKS.md, "Peak memory of the training step"). Triton path
    only; under bf16-mixed autocast the projections run in bf16 from one cast of the layer input, so the same
    applies."""

    stages: Stages = "auto"
    """The stages around the scan (slot inputs: gather, short convolution, norms, gates; mix: weighted sum of the
    slots, gated norm). ``auto``: Triton kernels next to the Triton scan on CUDA (run once on a few tokens first; a
    Triton that cannot build them leaves the reference stages, with one warning), the reference elsewhere.
    ``triton``: the Triton kernels with any scan backend and device, without that trial run (on CPU under
    ``TRITON_INTERPRET=1``). ``reference``: the plain-torch stages (``torch.compile``d on CUDA)."""
    projections: Projections = "auto"
    """How the slot kernels project each slot's k, v and gates. ``auto``: only the streams each token selected, by
    one grouped product over the memory-sorted slots, wherever that applies (bf16 on sm90 / sm100 GPUs with torch's
    grouped kernels, fp32 or bf16 on CPU; a token skipping some stream; no per-key gate). ``dense``: every stream
    for every token in one matrix product (for measurements)."""
    compile_stages: bool = True
    """Run the reference slot stage through ``torch.compile`` on CUDA next to the Triton scan (a forward with a
    conv cache, or ``stages="reference"``). The training module turns it off under FSDP, whose flat parameters
    dynamo cannot trace."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "num_memories", "topk",
                     "gla_gate_rank"):
            self._check_int(name, minimum=1)
        if self.chunk_size is not None:
            self._check_int("chunk_size", minimum=1)
        self._check_int("conv_size", minimum=0)
        if self.intermediate_size is not None:
            self._check_int("intermediate_size", minimum=1)
        for name in ("shared_memory", "tie_embeddings", "use_output_gate", "compile_stages"):
            self._check_bool(name)
        for name in ("expand_v", "mlp_ratio", "gla_gate_normalizer", "norm_eps", "initializer_range"):
            self._check_real(name, positive=True)
        for name in ("aux_loss_coef", "router_z_loss_coef"):
            self._check_real(name, positive=False)
        for name in ("update_rule", "aux_loss_type", "backend", "activation_memory", "stages", "projections"):
            self._check_choice(name)
        if self.topk > self.num_memories:
            raise ConfigError(f"MoMConfig.topk={self.topk} exceeds num_memories={self.num_memories}")
        if float(self.head_dim * self.expand_v) != int(self.head_dim * self.expand_v):
            raise ConfigError(f"MoMConfig.expand_v={self.expand_v!r} must make head_dim*expand_v an integer "
                              f"(head_dim={self.head_dim})")

    # Validation helpers: each names the field, the value and its type ------------------------------------------
    def _refuse(self, name: str, requirement: str) -> NoReturn:
        value = getattr(self, name)
        raise ConfigError(f"MoMConfig.{name} must be {requirement}, got {value!r} ({type(value).__name__})")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        # bool is an int subclass, and a float such as 2.0 would pass a comparison: both are refused.
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self._refuse(name, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")

    def _check_bool(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):  # a string such as 'false' would be truthy
            self._refuse(name, "a boolean (true or false)")

    def _check_real(self, name: str, positive: bool) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value <= 0 if positive else value < 0):
            self._refuse(name, "a finite number > 0" if positive else "a finite number >= 0")

    def _check_choice(self, name: str) -> None:
        choices = get_args(_field_types()[name])
        if getattr(self, name) not in choices:
            self._refuse(name, "one of " + ", ".join(repr(c) for c in choices))

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

    @property
    def has_beta(self) -> bool:
        """Whether the update rule writes with a delta correction of strength ``beta`` (its own projection)."""
        return self.update_rule in ("gated_delta", "delta")

    @property
    def has_scalar_gate(self) -> bool:
        """Whether the update rule decays each head's memory by a scalar gate (``a`` projection, ``A_log``,
        ``dt_bias``)."""
        return self.update_rule in ("gated_delta", "simple_gla")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MoMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown MoMConfig fields: {unknown}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MoMConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown MoMConfig preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


@functools.cache
def _field_types() -> dict[str, object]:
    """The resolved annotation of every ``MoMConfig`` field (the choices of a ``Literal`` field come from it)."""
    return get_type_hints(MoMConfig)


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
