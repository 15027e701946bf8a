"""Forward Triton kernels of the chunked scan.

Per chunk of BT = 64 tokens (local inclusive cumulative log-gate ``gamma``, ``Gamma = exp(gamma)``)::

    A     = strict_lower(diag(beta) (K K^T) * exp(gamma_i - gamma_j))       (delta rule only)
    Tinv  = (I + A)^-1,   W = Tinv diag(beta Gamma) K,   Uv = Tinv diag(beta) V
    U     = Uv - W S0                                   (additive rules: U = V)
    O     = scale (diag(Gamma) Q S0 + (Q K^T * exp(gamma_i - gamma_j), j <= i) U)
    S_C   = Gamma_C S0 + (K * exp(gamma_C - gamma))^T U

Kernels, in launch order:
    wy_solve_kernel   per (chunk, head): gamma and Tinv (blockwise forward substitution on 16-row blocks)
    wy_apply_kernel   per (chunk, head): W and Uv
    state_fwd_kernel  per (segment, head, V block): the sequential pass; stores every chunk's start state and U
    state_recompute_kernel  the same pass reading U instead of forming it: the backward's recomputation of the
                      start states that the forward did not keep (a kernel of its own name, so that profiles
                      and launch settings tell the two passes apart)
    output_kernel     per (chunk, head, V block): O
Every exponent is a difference of cumulative gates inside one chunk with the later position first, so it is
<= 0 for decays and nothing overflows whatever the gate magnitude.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mom_lit.ops.scan.triton.common import (chunk_rows, chunk_tile, load_gates, load_state, mm, mm32, state_program,
                                      store_chunk_tile, store_state)

__all__ = ["output_kernel", "state_fwd_kernel", "state_recompute_kernel", "wy_apply_kernel", "wy_solve_kernel"]


@triton.jit
def _invert_unit_lower16(a_rows, row_stride, n_rows):
    """(I + a)^-1 for a strictly lower (16, 16) block, by forward substitution one row at a time. Row i of ``a``
    is read from memory at ``a_rows + i * row_stride`` (rows from ``n_rows`` on are zero): a load instead of
    extracting the row from a register tile, which would take a reduction across the program's threads."""
    r = tl.arange(0, 16)
    x = (r[:, None] == r[None, :]).to(tl.float32)
    for i in tl.static_range(1, 16):
        a_row = tl.load(a_rows + i * row_stride + r, mask=(r < i) & (i < n_rows), other=0.0)  # (16,) a[i, :]
        # rows j < i of x are final and a[i, j] = 0 for j >= i, so this is sum_{j<i} a[i, j] x[j, :]
        acc = tl.sum(a_row[:, None] * x, 0)
        x = tl.where(r[:, None] == i, (r[None, :] == i).to(tl.float32) - acc[None, :], x)
    return x


@triton.jit
def _gated_block(a, b_i, c_i, c_j, DIAG: tl.constexpr):
    """beta_i * exp(gamma_i - gamma_j) * a for one (16, 16) block of K K^T, strictly lower on the diagonal."""
    r = tl.arange(0, 16)
    if DIAG:
        keep = r[:, None] > r[None, :]
    else:
        keep = r[:, None] >= 0
    decay = tl.exp(tl.where(keep, c_i[:, None] - c_j[None, :], float("-inf")))
    return a * decay * b_i[:, None]


@triton.jit
def _store_block(ptr, rows, rmask, col0: tl.constexpr, blk):
    r = tl.arange(0, 16)
    tl.store(ptr + rows[:, None] * 64 + col0 + r[None, :], blk, mask=rmask[:, None])


@triton.jit
def wy_solve_kernel(k, g, beta, gamma, tinv, chunk_seg, chunk_start, cu,
                    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                    USE_G: tl.constexpr, IS_DELTA: tl.constexpr, MODE: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    seg, start, length = chunk_rows(chunk_seg, chunk_start, cu, c)
    if seg < 0:
        return
    r = tl.arange(0, 16)
    t0 = (start + r) * H + h  # (16,) int64 (token, head) index of each 16-row block
    t1 = t0 + 16 * H
    t2 = t0 + 32 * H
    t3 = t0 + 48 * H
    m0 = r < length
    m1 = r + 16 < length
    m2 = r + 32 < length
    m3 = r + 48 < length

    c0 = tl.zeros([16], dtype=tl.float32)
    c1 = tl.zeros([16], dtype=tl.float32)
    c2 = tl.zeros([16], dtype=tl.float32)
    c3 = tl.zeros([16], dtype=tl.float32)
    if USE_G:
        g0 = tl.load(g + t0, mask=m0, other=0.0).to(tl.float32)
        g1 = tl.load(g + t1, mask=m1, other=0.0).to(tl.float32)
        g2 = tl.load(g + t2, mask=m2, other=0.0).to(tl.float32)
        g3 = tl.load(g + t3, mask=m3, other=0.0).to(tl.float32)
        s0 = tl.sum(g0, 0)
        s1 = s0 + tl.sum(g1, 0)
        s2 = s1 + tl.sum(g2, 0)
        c0 = tl.cumsum(g0, 0)
        c1 = tl.cumsum(g1, 0) + s0
        c2 = tl.cumsum(g2, 0) + s1
        c3 = tl.cumsum(g3, 0) + s2
        tl.store(gamma + t0, c0, mask=m0)
        tl.store(gamma + t1, c1, mask=m1)
        tl.store(gamma + t2, c2, mask=m2)
        tl.store(gamma + t3, c3, mask=m3)

    if IS_DELTA:
        a00 = tl.zeros([16, 16], dtype=tl.float32)
        a10 = tl.zeros([16, 16], dtype=tl.float32)
        a11 = tl.zeros([16, 16], dtype=tl.float32)
        a20 = tl.zeros([16, 16], dtype=tl.float32)
        a21 = tl.zeros([16, 16], dtype=tl.float32)
        a22 = tl.zeros([16, 16], dtype=tl.float32)
        a30 = tl.zeros([16, 16], dtype=tl.float32)
        a31 = tl.zeros([16, 16], dtype=tl.float32)
        a32 = tl.zeros([16, 16], dtype=tl.float32)
        a33 = tl.zeros([16, 16], dtype=tl.float32)
        for kk in range(0, K, BK):
            cols = kk + tl.arange(0, BK)
            mc = cols[None, :] < K
            k0 = tl.load(k + t0[:, None] * K + cols[None, :], mask=m0[:, None] & mc, other=0.0)
            k1 = tl.load(k + t1[:, None] * K + cols[None, :], mask=m1[:, None] & mc, other=0.0)
            k2 = tl.load(k + t2[:, None] * K + cols[None, :], mask=m2[:, None] & mc, other=0.0)
            k3 = tl.load(k + t3[:, None] * K + cols[None, :], mask=m3[:, None] & mc, other=0.0)
            k0t = tl.trans(k0)
            k1t = tl.trans(k1)
            k2t = tl.trans(k2)
            a00 += mm(k0, k0t, MODE)
            a10 += mm(k1, k0t, MODE)
            a11 += mm(k1, k1t, MODE)
            a20 += mm(k2, k0t, MODE)
            a21 += mm(k2, k1t, MODE)
            a22 += mm(k2, k2t, MODE)
            a30 += mm(k3, k0t, MODE)
            a31 += mm(k3, k1t, MODE)
            a32 += mm(k3, k2t, MODE)
            a33 += mm(k3, tl.trans(k3), MODE)
        b0 = tl.load(beta + t0, mask=m0, other=0.0).to(tl.float32)
        b1 = tl.load(beta + t1, mask=m1, other=0.0).to(tl.float32)
        b2 = tl.load(beta + t2, mask=m2, other=0.0).to(tl.float32)
        b3 = tl.load(beta + t3, mask=m3, other=0.0).to(tl.float32)
        a00 = _gated_block(a00, b0, c0, c0, True)
        a10 = _gated_block(a10, b1, c1, c0, False)
        a11 = _gated_block(a11, b1, c1, c1, True)
        a20 = _gated_block(a20, b2, c2, c0, False)
        a21 = _gated_block(a21, b2, c2, c1, False)
        a22 = _gated_block(a22, b2, c2, c2, True)
        a30 = _gated_block(a30, b3, c3, c0, False)
        a31 = _gated_block(a31, b3, c3, c1, False)
        a32 = _gated_block(a32, b3, c3, c2, False)
        a33 = _gated_block(a33, b3, c3, c3, True)

        # block forward substitution: T_IJ = -T_II sum_{J <= L < I} A_IL T_LJ (the solve always runs in fp32).
        # The diagonal blocks are put in their place of tinv first, where the substitution reads their rows.
        _store_block(tinv, t0, m0, 0, a00)
        _store_block(tinv, t1, m1, 16, a11)
        _store_block(tinv, t2, m2, 32, a22)
        _store_block(tinv, t3, m3, 48, a33)
        tl.debug_barrier()
        row0 = tinv + (start * H + h) * 64  # row 0 of the chunk's (64, 64) block of tinv
        stride = H * 64  # from one row to the next
        i00 = _invert_unit_lower16(row0, stride, length)
        i11 = _invert_unit_lower16(row0 + 16 * stride + 16, stride, length - 16)
        i22 = _invert_unit_lower16(row0 + 32 * stride + 32, stride, length - 32)
        i33 = _invert_unit_lower16(row0 + 48 * stride + 48, stride, length - 48)
        tl.debug_barrier()  # every row is read before the inverse overwrites it
        i10 = -mm(i11, mm(a10, i00, 0), 0)
        i21 = -mm(i22, mm(a21, i11, 0), 0)
        i32 = -mm(i33, mm(a32, i22, 0), 0)
        i20 = -mm(i22, mm(a20, i00, 0) + mm(a21, i10, 0), 0)
        i31 = -mm(i33, mm(a31, i11, 0) + mm(a32, i21, 0), 0)
        i30 = -mm(i33, mm(a30, i00, 0) + mm(a31, i10, 0) + mm(a32, i20, 0), 0)

        zero = tl.zeros([16, 16], dtype=tl.float32)
        _store_block(tinv, t0, m0, 0, i00)
        _store_block(tinv, t0, m0, 16, zero)
        _store_block(tinv, t0, m0, 32, zero)
        _store_block(tinv, t0, m0, 48, zero)
        _store_block(tinv, t1, m1, 0, i10)
        _store_block(tinv, t1, m1, 16, i11)
        _store_block(tinv, t1, m1, 32, zero)
        _store_block(tinv, t1, m1, 48, zero)
        _store_block(tinv, t2, m2, 0, i20)
        _store_block(tinv, t2, m2, 16, i21)
        _store_block(tinv, t2, m2, 32, i22)
        _store_block(tinv, t2, m2, 48, zero)
        _store_block(tinv, t3, m3, 0, i30)
        _store_block(tinv, t3, m3, 16, i31)
        _store_block(tinv, t3, m3, 32, i32)
        _store_block(tinv, t3, m3, 48, i33)


@triton.jit
def wy_apply_kernel(k, v, beta, gamma, tinv, w, u, chunk_seg, chunk_start, cu,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    USE_G: tl.constexpr, MODE: tl.constexpr, LOW: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    seg, start, length = chunk_rows(chunk_seg, chunk_start, cu, c)
    if seg < 0:
        return
    rows = tl.arange(0, 64)
    mr = rows < length
    tok = (start + rows) * H + h  # (BT,) int64
    t_inv = tl.load(tinv + tok[:, None] * 64 + rows[None, :], mask=mr[:, None], other=0.0)  # (BT, BT)
    b = tl.load(beta + tok, mask=mr, other=0.0).to(tl.float32)
    bk = b
    if USE_G:
        bk = b * tl.exp(tl.load(gamma + tok, mask=mr, other=0.0))
    for kk in range(0, K, BK):
        cols = kk + tl.arange(0, BK)
        mask = mr[:, None] & (cols[None, :] < K)
        kb = tl.load(k + tok[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32) * bk[:, None]
        wc = mm32(t_inv, kb, MODE, LOW)
        tl.store(w + tok[:, None] * K + cols[None, :], wc.to(w.dtype.element_ty), mask=mask)
    for vv in range(0, V, BV):
        cols = vv + tl.arange(0, BV)
        mask = mr[:, None] & (cols[None, :] < V)
        vb = tl.load(v + tok[:, None] * V + cols[None, :], mask=mask, other=0.0).to(tl.float32) * b[:, None]
        uc = mm32(t_inv, vb, MODE, LOW)
        tl.store(u + tok[:, None] * V + cols[None, :], uc.to(u.dtype.element_ty), mask=mask)


@triton.jit
def state_fwd_kernel(k, v, w, u, gamma, h_out, h0, ht, chunk_offsets, order, cu,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
                     USE_G: tl.constexpr, IS_DELTA: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                     MODE: tl.constexpr):
    _sequential_pass(k, v, w, u, gamma, h_out, h0, ht, chunk_offsets, order, cu, H, K, V, BKS, BV, USE_G,
                     IS_DELTA, HAS_H0, STORE_HT, False, MODE)


@triton.jit
def state_recompute_kernel(k, v, w, u, gamma, h_out, h0, ht, chunk_offsets, order, cu,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
                           USE_G: tl.constexpr, IS_DELTA: tl.constexpr, HAS_H0: tl.constexpr,
                           STORE_HT: tl.constexpr, MODE: tl.constexpr):
    _sequential_pass(k, v, w, u, gamma, h_out, h0, ht, chunk_offsets, order, cu, H, K, V, BKS, BV, USE_G,
                     IS_DELTA, HAS_H0, STORE_HT, True, MODE)


@triton.jit
def _sequential_pass(k, v, w, u, gamma, h_out, h0, ht, chunk_offsets, order, cu,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
                     USE_G: tl.constexpr, IS_DELTA: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                     U_FINAL: tl.constexpr, MODE: tl.constexpr):
    # U_FINAL: ``u`` already holds U = Uv - W S0 (a recomputation of the states in the backward): read it, never
    # write it; the states come out as in the forward, which also rounded U to u's dtype before using it.
    # the (K, BV) state is held as up to four (BKS, BV) register blocks s1..s4 (K <= 4 * BKS)
    NKS: tl.constexpr = (K + BKS - 1) // BKS
    nh, h, rv, c0, c1, bos, eos = state_program(chunk_offsets, order, cu, H, V, BV)
    h0_seg = h0 + nh.to(tl.int64) * K * V
    s1 = load_state(h0_seg, 0, rv, K, V, BKS, HAS_H0)
    if NKS > 1:
        s2 = load_state(h0_seg, BKS, rv, K, V, BKS, HAS_H0)
    if NKS > 2:
        s3 = load_state(h0_seg, 2 * BKS, rv, K, V, BKS, HAS_H0)
    if NKS > 3:
        s4 = load_state(h0_seg, 3 * BKS, rv, K, V, BKS, HAS_H0)
    rows = tl.arange(0, 64)
    ck = tl.arange(0, BKS)  # key columns of one register block, from its first
    for j in range(0, c1 - c0):
        c = c0 + j  # int64 chunk id
        start = bos + j * 64
        length = eos - start
        mr = rows < length
        row0 = start * H + h  # int64 (token, head) row of the chunk's first token
        h_c = h_out + (c * H + h) * K * V
        store_state(h_c, 0, rv, s1, K, V, BKS)
        if NKS > 1:
            store_state(h_c, BKS, rv, s2, K, V, BKS)
        if NKS > 2:
            store_state(h_c, 2 * BKS, rv, s3, K, V, BKS)
        if NKS > 3:
            store_state(h_c, 3 * BKS, rv, s4, K, V, BKS)
        if IS_DELTA:
            uc = chunk_tile(u, row0, 0, rv, mr, H, V).to(tl.float32)
            if not U_FINAL:
                uc -= mm(chunk_tile(w, row0, 0, ck, mr, H, K), s1, MODE)
                if NKS > 1:
                    uc -= mm(chunk_tile(w, row0, BKS, ck, mr, H, K), s2, MODE)
                if NKS > 2:
                    uc -= mm(chunk_tile(w, row0, 2 * BKS, ck, mr, H, K), s3, MODE)
                if NKS > 3:
                    uc -= mm(chunk_tile(w, row0, 3 * BKS, ck, mr, H, K), s4, MODE)
                store_chunk_tile(u, row0, rv, mr, H, V, uc)
                # continue from U as stored, as a recomputation of the states reads it back
                uc = uc.to(u.dtype.element_ty).to(tl.float32)
        else:
            uc = chunk_tile(v, row0, 0, rv, mr, H, V).to(tl.float32)
        if USE_G:
            # (K * exp(gamma_C - gamma))^T U as K^T (exp(gamma_C - gamma) U): the token tiles go into the products
            # as loaded, and one (BT, BV) tile is scaled instead of every key block
            gam, g_last = load_gates(gamma, row0 + rows * H, mr, start, length, H, h)
            uc = uc * tl.exp(tl.where(mr, g_last - gam, 0.0))[:, None]
            decay = tl.exp(g_last)
            s1 *= decay
            if NKS > 1:
                s2 *= decay
            if NKS > 2:
                s3 *= decay
            if NKS > 3:
                s4 *= decay
        s1 += mm(tl.trans(chunk_tile(k, row0, 0, ck, mr, H, K)), uc, MODE)
        if NKS > 1:
            s2 += mm(tl.trans(chunk_tile(k, row0, BKS, ck, mr, H, K)), uc, MODE)
        if NKS > 2:
            s3 += mm(tl.trans(chunk_tile(k, row0, 2 * BKS, ck, mr, H, K)), uc, MODE)
        if NKS > 3:
            s4 += mm(tl.trans(chunk_tile(k, row0, 3 * BKS, ck, mr, H, K)), uc, MODE)
    if STORE_HT:
        ht_seg = ht + nh.to(tl.int64) * K * V
        store_state(ht_seg, 0, rv, s1, K, V, BKS)
        if NKS > 1:
            store_state(ht_seg, BKS, rv, s2, K, V, BKS)
        if NKS > 2:
            store_state(ht_seg, 2 * BKS, rv, s3, K, V, BKS)
        if NKS > 3:
            store_state(ht_seg, 3 * BKS, rv, s4, K, V, BKS)


@triton.jit
def output_kernel(q, k, v, u, gamma, h_in, o, chunk_seg, chunk_start, cu, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  USE_G: tl.constexpr, IS_DELTA: tl.constexpr, MODE: tl.constexpr):
    # V blocks of one chunk are consecutive programs, sharing its q and k tiles via L2
    NVB: tl.constexpr = (V + BV - 1) // BV
    c = tl.program_id(0) // NVB
    vb = tl.program_id(0) % NVB
    h = tl.program_id(1)
    seg, start, length = chunk_rows(chunk_seg, chunk_start, cu, c)
    if seg < 0:
        return
    rows = tl.arange(0, 64)
    mr = rows < length
    tok = (start + rows) * H + h
    rv = vb * BV + tl.arange(0, BV)
    mv = mr[:, None] & (rv[None, :] < V)
    acc_o = tl.zeros([64, BV], dtype=tl.float32)
    acc_p = tl.zeros([64, 64], dtype=tl.float32)
    h_base = (c.to(tl.int64) * H + h) * K * V
    for kk in range(0, K, BK):
        cols = kk + tl.arange(0, BK)
        mk = mr[:, None] & (cols[None, :] < K)
        qc = tl.load(q + tok[:, None] * K + cols[None, :], mask=mk, other=0.0)
        kc = tl.load(k + tok[:, None] * K + cols[None, :], mask=mk, other=0.0)
        hc = tl.load(h_in + h_base + cols[:, None] * V + rv[None, :],
                     mask=(cols[:, None] < K) & (rv[None, :] < V), other=0.0)
        acc_o += mm(qc, hc, MODE)
        acc_p += mm(qc, tl.trans(kc), MODE)
    causal = rows[:, None] >= rows[None, :]
    if USE_G:
        gam, _ = load_gates(gamma, tok, mr, start, length, H, h)
        acc_o = acc_o * tl.exp(gam)[:, None]
        acc_p = acc_p * tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
    else:
        acc_p = tl.where(causal, acc_p, 0.0)
    if IS_DELTA:
        uc = tl.load(u + tok[:, None] * V + rv[None, :], mask=mv, other=0.0)
    else:
        uc = tl.load(v + tok[:, None] * V + rv[None, :], mask=mv, other=0.0)
    out = (acc_o + mm(acc_p, uc, MODE)) * scale
    tl.store(o + tok[:, None] * V + rv[None, :], out.to(o.dtype.element_ty), mask=mv)
