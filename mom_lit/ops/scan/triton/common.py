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

__all__ = ["BT", "chunk_rows", "chunk_tile", "dot_mode", "load_gates", "load_state", "mm", "mm32", "rows_tile",
           "state_program", "store_chunk_tile", "store_state"]

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
def mm32(a, b, MODE: tl.constexpr, LOW: tl.constexpr):
    """a @ b on fp32 operands: exact for fp32 inputs, tf32 otherwise (for factors with a wide range), or with
    operands rounded to the input precision when LOW."""
    if MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif LOW:
        return mm(a, b, MODE)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def chunk_rows(chunk_seg, chunk_start, cu, c):
    """(segment, first token (int64), valid rows) of chunk ``c``; segment -1 marks a chunk past the end."""
    seg = tl.load(chunk_seg + c)
    start = tl.load(chunk_start + c).to(tl.int64)
    end = tl.load(cu + tl.maximum(seg, 0) + 1).to(tl.int64)
    return seg, start, end - start


@triton.jit
def rows_tile(ptr, tok, mr, col0: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """(BT, BD) tile of a (T, H, D) tensor: rows ``tok``, columns col0 .. col0 + BD."""
    cols = col0 + tl.arange(0, BD)
    return tl.load(ptr + tok[:, None] * D + cols[None, :], mask=mr[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def _tile_mask(mr, col0: tl.constexpr, cols, D: tl.constexpr):
    """Rows ``mr`` of a tile; its columns col0 + cols need no mask when the tile width divides D (then every block
    of columns lies inside)."""
    if tl.constexpr(D) % cols.shape[0] == 0:
        mask = mr[:, None]
    else:
        mask = mr[:, None] & (col0 + cols[None, :] < D)
    return mask


@triton.jit
def chunk_tile(ptr, row0, col0: tl.constexpr, cols, mr, H: tl.constexpr, D: tl.constexpr):
    """(BT, len(cols)) tile of a (T, H, D) tensor: the chunk whose first (token * H + head) row is ``row0``
    (int64), columns col0 + cols.

    For the sequential passes: the element offsets past the chunk's first element are int32 and the same for every
    chunk, so the compiler computes them once per program instead of holding int64 addresses across the loop.
    """
    offs = tl.arange(0, 64)[:, None] * (H * D) + cols[None, :]
    return tl.load(ptr + row0 * D + col0 + offs, mask=_tile_mask(mr, col0, cols, D), other=0.0)


@triton.jit
def store_chunk_tile(ptr, row0, cols, mr, H: tl.constexpr, D: tl.constexpr, value):
    """Store ``value`` at the rows and columns :func:`chunk_tile` reads with col0 = 0, in ptr's dtype."""
    offs = tl.arange(0, 64)[:, None] * (H * D) + cols[None, :]
    tl.store(ptr + row0 * D + offs, value.to(ptr.dtype.element_ty), mask=_tile_mask(mr, 0, cols, D))


@triton.jit
def _state_block(row0: tl.constexpr, rv, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr):
    """int32 offsets (from row row0) and mask of rows row0 .. row0 + BKS, columns rv, of a (K, V) state."""
    rk = tl.arange(0, BKS)
    return rk[:, None] * V + rv[None, :], (row0 + rk[:, None] < K) & (rv[None, :] < V)


@triton.jit
def load_state(ptr, row0: tl.constexpr, rv, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr,
               LOAD: tl.constexpr):
    """fp32 rows row0 .. row0 + BKS, columns rv, of the (K, V) state at ``ptr`` if LOAD, else zeros."""
    s = tl.zeros([BKS, rv.shape[0]], dtype=tl.float32)
    if LOAD:
        offs, mask = _state_block(row0, rv, K, V, BKS)
        s = tl.load(ptr + row0 * V + offs, mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def store_state(ptr, row0: tl.constexpr, rv, value, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr):
    """Store one register block of a state (as :func:`load_state` reads it) in ptr's dtype; unmasked where the
    blocks divide K and V (the sequential passes store one per chunk)."""
    offs, mask = _state_block(row0, rv, K, V, BKS)
    if K % BKS == 0 and tl.constexpr(V) % rv.shape[0] == 0:
        tl.store(ptr + row0 * V + offs, value.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + row0 * V + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def state_program(chunk_offsets, order, cu, H: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """Where a program of a sequential state pass works: one (segment, head) and one block of BV state columns.

    Segments are taken in ``order`` (longest first), so the longest chains of dependent steps start first. The V
    blocks of one (segment, head) are consecutive programs, so they run together and share q, k, w via L2.
    Returns (nh = segment * H + head, head, the block's columns, first and end chunk ids, first and end tokens).
    """
    NVB: tl.constexpr = (V + BV - 1) // BV
    slot = tl.program_id(0) // NVB
    vb = tl.program_id(0) % NVB
    n = tl.load(order + slot // H)
    nh = n * H + slot % H
    c0 = tl.load(chunk_offsets + n).to(tl.int64)
    c1 = tl.load(chunk_offsets + n + 1).to(tl.int64)
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    return nh, nh % H, vb * BV + tl.arange(0, BV), c0, c1, bos, eos


@triton.jit
def load_gates(gamma, tok, mr, start, length, H: tl.constexpr, h):
    """Cumulative log-gates of a chunk and their last valid value.

    Padded rows repeat the last valid value, so that every decay exponent gamma_i - gamma_j with j <= i stays
    <= 0 on padded rows too (a padded row of 0 after a strongly decayed chunk would give exp(+large) = inf, and
    inf * 0 = NaN in the products that mix padded and valid rows).
    """
    g_last = tl.load(gamma + (start + tl.minimum(length, 64) - 1) * H + h)
    gam = tl.load(gamma + tok, mask=mr, other=0.0)
    return tl.where(mr, gam, g_last), g_last
