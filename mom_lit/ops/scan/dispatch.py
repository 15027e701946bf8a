"""The one public scan entry point: picks an implementation of the memory recurrence, logs the choice once.

Backends:
    eager     the chunked reference (``mom_lit.ops.scan.chunk``) in plain PyTorch.
    compiled  the same, with its two batched stages (intra-chunk work, output assembly) run through
              ``torch.compile`` with only the chunk/step count symbolic: a new batch composition (other segment
              lengths or counts) reuses the compiled code (a count of exactly 1 is specialised once). The
              layout gathers and the short per-chunk state loop stay eager. A compiler that fails raises
              an error naming ``MoMConfig.backend="eager"``, the same scan without compiling; nothing
              switches backend behind the caller's back.
    triton    ``mom_lit.ops.scan.triton.triton_scan`` (CUDA).
    auto      triton for CUDA inputs when it is importable, the rule has no per-key gate and the inputs are not
              float64; compiled otherwise.

``chunk_size`` is the chunk length of the chunked backends; the Triton kernels use their own fixed tile (the
result does not depend on the chunk length).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
import torch.fx.experimental._config as fx_config

from mom_lit.config import BACKENDS
from mom_lit.ops.scan.chunk import EAGER_KERNELS, ChunkKernels, assemble_output, chunk_scan_with, intra_chunk

__all__ = ["BACKENDS", "ScanCompileError", "compiled_kernels", "log_backend_choice", "scan"]

logger = logging.getLogger("mom_lit")


@functools.cache
def log_backend_choice(backend: str, reason: str) -> None:
    """Log the scan backend that runs and why, once per (backend, reason) for the process
    (``log_backend_choice.cache_clear()`` logs the next choice again)."""
    logger.info("memory scan backend: %s (%s)", backend, reason)


def _batch_dynamic(compiled: Callable) -> Callable:
    """Call ``compiled`` with only the leading (chunk / step / token count) dim of every tensor symbolic.

    Head counts, head dims and the chunk length stay static, so the generated loops are fixed-size and
    vectorised, while a new batch composition (other segment lengths or counts) reuses the compiled code.
    Duck sizing is off: two counts that happen to be equal on one call (say 5 segments and 5 chunk steps) must
    not become one symbol, or the next batch where they differ would recompile.
    """

    @functools.wraps(compiled)
    def run(*args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args)

    return run


@functools.cache
def compiled_kernels(compiler: Callable = torch.compile) -> ChunkKernels:
    """The chunked scan's two batched stages compiled by ``compiler`` (``torch.compile`` or a callable with its
    signature), built once per compiler. A compiler that fails here raises :class:`ScanCompileError`."""
    # Compilation happens on the first call and takes a while on CPU, with nothing else to show for it.
    logger.info("compiling the memory scan kernels with torch.compile: the first training or evaluation "
                "step takes about a minute on CPU")
    try:
        return ChunkKernels(_batch_dynamic(compiler(intra_chunk, dynamic=False)),
                            _batch_dynamic(compiler(assemble_output, dynamic=False)))
    except Exception as error:  # noqa: BLE001 - re-raised with the way out
        raise ScanCompileError(error) from error


class ScanCompileError(RuntimeError):
    """``torch.compile`` of the chunked scan failed; the message names the backend that runs without it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"torch.compile of the memory scan failed ({type(error).__name__}: {error}); choose "
                         "the same chunked scan without compiling with MoMConfig.backend='eager' (--model.config."
                         "backend eager on the command line, scan(backend='eager') when calling the op)")


def _load_triton_scan():
    """The Triton scan, or None when its module is missing or cannot be imported here."""
    try:
        from mom_lit.ops.scan.triton import triton_scan
    except (ImportError, AttributeError):
        return None
    return triton_scan


def scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    output_final_state: bool = True,
    backend: str = "auto",
    chunk_size: int = 64,
    rebuild_qkv=None,
    recompute: str | None = None,
    launch=None,
    compiler: Callable = torch.compile,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the memory recurrence with the chosen backend.

    Arguments and results are those of :func:`mom_lit.ops.scan.recurrent.recurrent_scan` (q, k: (B, T, H, K);
    v: (B, T, H, V); optional g (B, T, H), gk (B, T, H, K), beta (B, T, H), initial_state (N, H, K, V),
    cu_seqlens (N+1,)) -> (o (B, T, H, V) in v's dtype, final_state (N, H, K, V) fp32 or None), plus
    ``backend`` (auto | compiled | eager | triton) and ``chunk_size`` of the chunked backends. ``rebuild_qkv``,
    ``recompute`` and ``launch`` reach the Triton scan only (see :func:`mom_lit.ops.scan.triton.triton_scan`); the
    other backends keep what autograd keeps. ``compiler`` builds the ``compiled`` backend's kernels (once per
    compiler object); a compiler that fails raises :class:`ScanCompileError`, which names ``backend='eager'``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kwargs = dict(g=g, gk=gk, beta=beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
                  output_final_state=output_final_state)
    triton_only = {name: value for name, value in (("rebuild_qkv", rebuild_qkv), ("recompute", recompute),
                                                   ("launch", launch)) if value is not None}

    if backend in ("auto", "triton"):
        triton_scan = _load_triton_scan() if (q.is_cuda or backend == "triton") else None
        if backend == "triton":
            if triton_scan is None:
                raise RuntimeError("backend='triton' was requested but mom_lit.ops.scan.triton.triton_scan is not "
                                   "importable; use backend='compiled' or 'auto'")
            log_backend_choice("triton", "requested")
            return triton_scan(q, k, v, **kwargs, **triton_only)
        if triton_scan is not None and gk is None and q.dtype != torch.float64:
            log_backend_choice("triton", "auto: CUDA inputs")
            return triton_scan(q, k, v, **kwargs, **triton_only)
        backend = "compiled"
        reason = "auto: no Triton path for these inputs"
    else:
        reason = "requested"

    if backend == "compiled":
        kernels = compiled_kernels(compiler)
        try:
            out = chunk_scan_with(kernels, q, k, v, chunk_size=chunk_size, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:  # the compiler's failures, not the scan's
            raise ScanCompileError(error) from error
        log_backend_choice("compiled", reason)
        return out
    log_backend_choice("eager", reason)
    return chunk_scan_with(EAGER_KERNELS, q, k, v, chunk_size=chunk_size, **kwargs)
