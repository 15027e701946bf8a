"""Helpers shared by the forward and backward Triton kernels of the scan.

Layouts (all contiguous, tokens of every segment packed along one axis of ``T`` tokens):
    q, k, w (T, H, K); v, u, o (T, H, V); g, beta, gamma (T, H); tinv (T, H, BT) (row t holds the row of the
    chunk's (I + A)^-1 for token t); per-chunk states h (NC, H, K, V).
Every token offset is formed in int64: ``T * H * K`` overflows int32 at MoM sizes.

``MODE`` selects the arithmetic of the large matrix products: 0 = fp32 operands with exact fp32 products
(``ieee``), 1 = bf16 operands, 2 = fp16 operands; accumulation is always fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BT", "dot_mode", "mm", "mm32", "chunk_rows"]

BT = 64  # chunk length: four 16-row blocks in the triangular solve


def dot_mode(dtype: torch.dtype) -> int:
    """The ``MODE`` constant of kernels whose inputs have ``dtype``."""
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]


@triton.jit
def mm(a, b, MODE: tl.constexpr):
    """a @ b with operands in the input precision (fp32 operands give exact products)."""
    if MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif MODE == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def mm32(a, b, MODE: tl.constexpr):
    """a @ b on fp32 operands: exact for fp32 inputs, tf32 otherwise (for factors with a wide range)."""
    if MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def chunk_rows(chunk_seg, chunk_start, cu, c):
    """(segment, first token (int64), valid rows) of chunk ``c``; segment -1 marks a chunk past the end."""
    seg = tl.load(chunk_seg + c)
    start = tl.load(chunk_start + c).to(tl.int64)
    end = tl.load(cu + tl.maximum(seg, 0) + 1).to(tl.int64)
    return seg, start, end - start
