"""Which implementation runs each stage of the MoM layer: one plan per (config, device, compute dtype).

A MoM layer runs five stages: route, slot inputs (gather, projections, short convolution, norms, gates), scan,
mix (weighted sum of the slots, gated norm) and, one token at a time, the decoding step. Each has a plain-torch
reference and, on CUDA, Triton kernels. :func:`resolve_plan` decides every choice in one place, from the config's
fields and the device and dtype the layer computes in; the model keeps one plan per (device, dtype)
(:class:`PlanCache`), logs it once and hands it to every layer, whose forward only reads it. Launch settings of
the kernels are explicit arguments (for benchmarks and tests), never patched module state.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from mom_lit.config import MoMConfig

__all__ = ["ExecutionPlan", "PlanCache", "compute_dtype", "reference_chunk_size", "resolve_plan",
           "stage_kernels_build"]

logger = logging.getLogger("mom_lit")

ScanPath = Literal["triton", "compiled", "eager"]
SlotPath = Literal["grouped", "gathered", "compiled", "eager"]
MixPath = Literal["triton", "torch"]
DecodePath = Literal["triton", "torch"]
Recompute = Literal["none", "states", "wy"]
RECOMPUTE = ("none", "states", "wy")
TRITON_TILE = 64  # the Triton scan's chunk length (``mom_lit.ops.scan.triton.common.BT``)


def reference_chunk_size(config: MoMConfig) -> int:
    """Chunk length of the chunked reference scan: ``config.chunk_size``, or where that is None 32 for heads at
    most 32 wide (keys and values) and 64 for wider ones, the faster of the two on CPU for those head dims."""
    if config.chunk_size is not None:
        return config.chunk_size
    return 32 if max(config.head_dim, config.head_v_dim) <= 32 else 64


@dataclass(frozen=True)
class ExecutionPlan:
    """The implementation of every stage of a MoM layer for one (config, device, compute dtype)."""

    device: torch.device
    dtype: torch.dtype
    """The dtype the layer's matrix products run in (autocast's where autocast is on)."""
    scan: ScanPath
    """The memory scan: Triton kernels, or the chunked reference (``torch.compile``d or eager)."""
    slots: SlotPath
    """Slot inputs of a forward without a conv cache: Triton kernels reading the projections in place, each slot
    projected for its own memory by one grouped product (``grouped``) or every stream for every token
    (``gathered``); or the reference stage (``compiled`` by ``torch.compile``, or ``eager``)."""
    cached_slots: Literal["compiled", "eager"]
    """Slot inputs of a forward that reads or writes a conv cache (prefill): the reference stage always."""
    mix: MixPath
    """Weighted sum of the slot outputs and gated RMSNorm: one Triton kernel each way, or the reference."""
    decode: DecodePath
    """The one-token decoding step."""
    activation_memory: str
    """``MoMConfig.activation_memory``: what the Triton path keeps for the backward."""
    scan_recompute: Recompute
    """What the Triton scan's backward rebuilds instead of keeping (``triton_scan(recompute=...)``)."""
    chunk_size: int
    """Chunk length of the scan that runs: the Triton tile, or :func:`reference_chunk_size` on the reference."""
    blocks: Literal["compiled", "eager"] = "eager"
    """The elementwise bodies of the blocks' RMSNorm and MLP and of the LM loss (``mom_lit.fused``): one
    ``torch.compile``d kernel each (on CUDA by default), or eager."""
    scan_launch: object | None = None
    """Launch settings of the Triton scan (``mom_lit.ops.scan.triton.scan.LaunchConfig``); None: the library's."""
    stage_launch: object | None = None
    """Launch settings of the slot and mix kernels (``mom_lit.ops.stage_launch.StageLaunchConfig``); None: the
    library's."""

    @property
    def scan_backend(self) -> str:
        """The ``backend`` argument of :func:`mom_lit.ops.scan` for this plan."""
        return self.scan

    @property
    def rebuilds_qkv(self) -> bool:
        """Whether the Triton scan keeps the slot stage's sources and rebuilds q, k, v from them."""
        return self.activation_memory != "fast"

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        scan = f"chunk {self.chunk_size}"
        if self.scan == "triton":
            scan += f", backward recomputes {self.scan_recompute}"
        return (f"{self.device.type} {dtype}: scan={self.scan} ({scan}), slots={self.slots} (with a conv cache: "
                f"{self.cached_slots}), mix={self.mix}, decode={self.decode}, blocks={self.blocks}, "
                f"activation_memory={self.activation_memory}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matrix products run in: autocast's where autocast is on for x's device, else x's."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        from mom_lit.ops.scan.triton import triton_scan  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


def _scan_path(config: MoMConfig, device: torch.device, dtype: torch.dtype) -> ScanPath:
    backend = config.backend
    if backend == "triton":
        return "triton"  # requested: the scan reports what it cannot run
    if backend == "auto":
        if device.type == "cuda" and config.update_rule != "gla" and dtype != torch.float64 and _triton_importable():
            return "triton"
        if device.type == "cpu" and not cpu_compiler_available():
            return "eager"  # auto takes the best path this machine has; an explicit "compiled" would fail instead
        return "compiled"
    return backend


@functools.cache
def cpu_compiler_available() -> bool:
    """Whether ``torch.compile`` finds the C++ compiler it builds CPU code with (looked up once per process). A
    machine without one runs ``backend="auto"`` on the eager chunked scan, with one warning."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - torch raises several kinds for "no compiler"
        logger.warning("no C++ compiler for torch.compile (%s): the CPU memory scan runs the eager chunked "
                       "reference; install g++ (or set CXX) for the compiled one", error)
        return False
    return True


def _grouped_projections(config: MoMConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the slot kernels project each slot for its own memory only, by one grouped product (J per token)
    instead of every stream for every token (S per token): where a token skips some stream, without the per-key
    gate, and where torch runs the grouped product as one sync-free kernel for these operands."""
    from mom_lit.ops.slots.grouped import grouped_mm_available

    slots = (config.topk if config.has_router else 1) + int(config.shared_memory)
    return (config.projections == "auto" and config.update_rule != "gla" and config.num_streams > slots
            and grouped_mm_available(device, dtype, config.hidden_size, stream_rows(config, align=16)))


def stream_rows(config: MoMConfig, align: int = 1) -> int:
    """Rows of the stacked per-stream projections that the slot kernels read: k | v | beta, gate logits, padded
    to a multiple of ``align`` (the per-key gate's code of ``gla`` comes after)."""
    c = config
    rows = c.key_dim + c.value_dim + c.num_heads * (int(c.has_beta) + int(c.has_scalar_gate))
    return rows + (-rows % align)


def resolve_plan(config: MoMConfig, device: torch.device | str, dtype: torch.dtype, *,
                 scan_launch=None, stage_launch=None, scan_recompute: Recompute | None = None,
                 compile_blocks: bool | None = None, trial_run: bool = True) -> ExecutionPlan:
    """The plan of every stage for layers of ``config`` computing in ``dtype`` on ``device``.

    ``scan_launch`` / ``stage_launch``: launch settings of the Triton scan and of the slot/mix kernels (None: the
    library's). ``scan_recompute``: what the Triton scan's backward rebuilds (None: from
    ``config.activation_memory``, ``wy`` for balanced and lean, ``states`` for fast). ``compile_blocks``: run the
    elementwise bodies of the blocks' norm and MLP and of the LM loss through ``torch.compile`` (None: on CUDA;
    False where the compiler fails there). ``trial_run``: with
    ``config.stages="auto"`` on CUDA, run the slot and mix kernels once on a few tokens first, and keep the
    reference stages (one warning) where they cannot build.
    """
    device = torch.device(device)
    if compile_blocks is None:
        compile_blocks = device.type == "cuda"
    if not isinstance(compile_blocks, bool):
        raise ValueError(f"compile_blocks must be a bool or None, got {compile_blocks!r}")
    if scan_recompute is None:
        scan_recompute = "wy" if config.activation_memory in ("lean", "balanced") else "states"
    if scan_recompute not in RECOMPUTE:
        raise ValueError(f"scan_recompute must be one of {RECOMPUTE}, got {scan_recompute!r}")
    scan = _scan_path(config, device, dtype)
    if config.backend == "triton" and config.chunk_size not in (None, TRITON_TILE):
        raise ValueError(f"MoMConfig.chunk_size={config.chunk_size} cannot drive the Triton scan, whose chunk tile is "
                         f"{TRITON_TILE}: use chunk_size={TRITON_TILE} with backend='triton', or a chunked backend "
                         "('compiled', 'eager'), which takes any chunk length")
    compiled = (device.type == "cuda" and config.compile_stages and config.backend in ("auto", "triton"))
    reference: Literal["compiled", "eager"] = "compiled" if compiled else "eager"
    if config.stages == "triton":
        kernels = dtype != torch.float64
    else:
        kernels = (config.stages == "auto" and config.backend in ("auto", "triton") and device.type == "cuda"
                   and dtype != torch.float64)
        if kernels and trial_run:
            kernels = stage_kernels_build(config, device, dtype, stage_launch)
    slots: SlotPath = reference
    if kernels and config.conv_size > 0:
        slots = "grouped" if _grouped_projections(config, device, dtype) else "gathered"
    decode: DecodePath = "torch"
    if config.backend in ("auto", "triton") and config.update_rule != "gla" and (
            device.type == "cuda" or config.backend == "triton"):
        decode = "triton"
    return ExecutionPlan(device=device, dtype=dtype, scan=scan, slots=slots, cached_slots=reference,
                         mix="triton" if kernels else "torch", decode=decode,
                         activation_memory=config.activation_memory, scan_recompute=scan_recompute,
                         chunk_size=TRITON_TILE if scan == "triton" else reference_chunk_size(config),
                         blocks="compiled" if compile_blocks else "eager", scan_launch=scan_launch, stage_launch=stage_launch)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.compiler.disable
def stage_kernels_build(config: MoMConfig, device: torch.device | str, dtype: torch.dtype, launch=None) -> bool:
    """Run the slot, gate and mix kernels once, forward and backward, on a few tokens of the layer's dims. A
    Triton installation that cannot build them keeps the reference stages, with one warning."""
    from mom_lit.layout import build_layout
    from mom_lit.ops.mix import mix_gated_rms_norm
    from mom_lit.ops.slots import slot_conv
    from mom_lit.ops.slots.gates import scalar_gates

    c, device = config, torch.device(device)
    H, K, V, S, width = c.num_heads, c.head_dim, c.head_v_dim, c.num_streams, c.conv_size
    try:
        # Identity saved-tensor hooks shadow any outer ones: a first forward inside an activation checkpoint must
        # not record the trial's tensors as the block's.
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            gen = torch.Generator(device).manual_seed(0)  # leaves the global random streams alone

            def rand(*shape):
                return torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_()

            num_tokens = 5
            memory = torch.arange(num_tokens, device=device).remainder(S).unsqueeze(1)  # (N_tok, 1)
            layout = build_layout(memory, torch.zeros(num_tokens, dtype=torch.int64, device=device), 1, S)
            outs = []
            if width:
                outs += slot_conv(rand(num_tokens, H * K), rand(num_tokens * S, H * (K + V + 1)),
                                  rand(H * (2 * K + V), width), layout.token, layout.token * S + layout.memory,
                                  layout.position, layout.rank, H, K, V, H, launch=launch)
                decay, has_beta = c.has_scalar_gate, c.has_beta
                gates = scalar_gates(rand(num_tokens * S, (decay + has_beta) * H), rand(H) if decay else None,
                                     rand(H) if decay else None, H, has_beta)
                outs += [t for t in gates if t is not None]
            gate = rand(num_tokens, H, V) if c.use_output_gate else None
            ones = torch.ones(num_tokens, 1, device=device)
            outs.append(mix_gated_rms_norm(rand(num_tokens, H, V), layout.rank, ones, gate,
                                           torch.ones(V, device=device, dtype=dtype), 1e-5, launch=launch))
            torch.autograd.backward([t.float().sum() for t in outs])
    except Exception as error:  # noqa: BLE001 - any build or launch failure keeps the reference path
        warnings.warn(f"the Triton slot/mix kernels of the MoM layer failed to run ({type(error).__name__}: "
                      f"{error}); using the reference stages", RuntimeWarning, stacklevel=3)
        return False
    return True


class PlanCache:
    """The plans of one model, resolved once per (device, compute dtype) and logged once.

    ``overrides`` replace config fields that choose a path (``backend``, ``stages``, ``projections``,
    ``compile_stages``, ``chunk_size``) for this model only, without touching its config; ``launch`` holds the
    explicit keyword arguments of :func:`resolve_plan` (``scan_launch``, ``stage_launch``, ``scan_recompute``,
    ``compile_blocks``).
    """

    PATH_FIELDS = ("backend", "stages", "projections", "compile_stages", "chunk_size")
    PLAN_ARGUMENTS = ("scan_launch", "stage_launch", "scan_recompute", "compile_blocks")

    def __init__(self, config: MoMConfig, **overrides) -> None:
        launch = {name: overrides.pop(name) for name in self.PLAN_ARGUMENTS
                  if name in overrides}
        unknown = sorted(set(overrides) - set(self.PATH_FIELDS))
        if unknown:
            raise ValueError(f"unknown path overrides {unknown}; known: {list(self.PATH_FIELDS)} and "
                             f"{', '.join(self.PLAN_ARGUMENTS)}")
        # validated by MoMConfig's own checks
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.overrides = {**overrides, **launch}
        self._launch = launch
        self._plans: dict[tuple[torch.device, torch.dtype], ExecutionPlan] = {}

    def get(self, device: torch.device | str, dtype: torch.dtype) -> ExecutionPlan:
        key = (torch.device(device), dtype)
        plan = self._plans.get(key)
        return plan if plan is not None else self._resolve(key)

    @torch.compiler.disable
    def _resolve(self, key: tuple[torch.device, torch.dtype]) -> ExecutionPlan:
        plan = self._plans[key] = resolve_plan(self.config, key[0], key[1], **self._launch)
        logger.info("MoM layer paths: %s", plan.describe())
        return plan

    def for_input(self, x: torch.Tensor) -> ExecutionPlan:
        return self.get(x.device, compute_dtype(x))
