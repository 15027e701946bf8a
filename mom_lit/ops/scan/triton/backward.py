"""Backward Triton kernels of the chunked scan (notation of ``forward.py``; Qs = scale Q, Qg = diag(Gamma) Qs,
Kd = diag(exp(gamma_C - gamma)) K, P = (Qs K^T * exp(gamma_i - gamma_j), j <= i)).

Per chunk, with dO and the gradient dS1 of the chunk's end state::

    dU   = P^T dO + Kd dS1                                   (total gradient of U)
    dS0  = Gamma_C dS1 + Qg^T dO - W^T dU                    (passed backwards through the chunks)
    dQs  = diag(Gamma) dO S0^T + (dO U^T * mask * decay) K
    dK  += (dO U^T * mask * decay)^T Qs + diag(exp(gamma_C - gamma)) U dS1^T
    dW   = -dU S0^T
    dTinv = dW (beta Gamma K)^T + dU (beta V)^T,   dA = -Tinv^T dTinv Tinv^T (strictly lower)
    then dK, dV, dbeta through W = Tinv (beta Gamma K), Uv = Tinv (beta V) and A, and dgamma from every decay;
    dg is the reversed cumulative sum of dgamma inside the chunk.

Kernels, in launch order:
    du_local_kernel   per (chunk, head, V block): P^T dO
    state_bwd_kernel  per (segment, head, V block): reverse pass; stores dS1 per chunk, completes dU, dS0 of
                      the segment's first chunk is d initial_state
    dqk_kernel        per (chunk, head): dq, the attention/state part of dk, dW, most of dgamma
    wy_bwd_kernel     per (chunk, head): the WY part of dk, dv, dbeta; sums dgamma and integrates it into dg
"""

from __future__ import annotations

import triton
import triton.language as tl

from mom_lit.ops.scan.triton.common import (chunk_rows, chunk_tile, load_gates, load_state, mm, mm32, rows_tile,
                                      state_program, store_chunk_tile, store_state)

__all__ = ["dqk_kernel", "du_local_kernel", "state_bwd_kernel", "wy_bwd_kernel"]


@triton.jit
def du_local_kernel(q, k, gamma, do, du, chunk_seg, chunk_start, cu, scale,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    USE_G: tl.constexpr, MODE: tl.constexpr):
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
    pt = tl.zeros([64, 64], dtype=tl.float32)  # pt[j, i] = k_j . q_i
    for kk in range(0, K, BK):
        cols = kk + tl.arange(0, BK)
        mk = mr[:, None] & (cols[None, :] < K)
        qc = tl.load(q + tok[:, None] * K + cols[None, :], mask=mk, other=0.0)
        kc = tl.load(k + tok[:, None] * K + cols[None, :], mask=mk, other=0.0)
        pt += mm(kc, tl.trans(qc), MODE)
    keep = rows[None, :] >= rows[:, None]
    if USE_G:
        gam, _ = load_gates(gamma, tok, mr, start, length, H, h)
        pt = pt * tl.exp(tl.where(keep, gam[None, :] - gam[:, None], float("-inf")))
    else:
        pt = tl.where(keep, pt, 0.0)
    rv = vb * BV + tl.arange(0, BV)
    mv = mr[:, None] & (rv[None, :] < V)
    doc = tl.load(do + tok[:, None] * V + rv[None, :], mask=mv, other=0.0)
    tl.store(du + tok[:, None] * V + rv[None, :], (mm(pt, doc, MODE) * scale).to(du.dtype.element_ty), mask=mv)


@triton.jit
def _state_bwd_block(ds, q, w, row0, ck, mr, col0: tl.constexpr, doc, duc, decay, H: tl.constexpr,
                     K: tl.constexpr, USE_G: tl.constexpr, IS_DELTA: tl.constexpr, MODE: tl.constexpr):
    """dS0 = Gamma_C dS1 + Q^T dO' - W^T dU on rows col0 .. col0 + BKS of the state (dO' = scale Gamma dO)."""
    if USE_G:
        ds = ds * decay
    ds += mm(tl.trans(chunk_tile(q, row0, col0, ck, mr, H, K)), doc, MODE)
    if IS_DELTA:
        ds -= mm(tl.trans(chunk_tile(w, row0, col0, ck, mr, H, K)), duc, MODE)
    return ds


@triton.jit
def state_bwd_kernel(q, k, w, gamma, do, du, dh, dht, dh0, chunk_offsets, order, cu, scale,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
                     USE_G: tl.constexpr, IS_DELTA: tl.constexpr, HAS_DHT: tl.constexpr,
                     STORE_DH0: tl.constexpr, MODE: tl.constexpr):
    # the (K, BV) state gradient is held as up to four (BKS, BV) register blocks d1..d4, as in the forward
    NKS: tl.constexpr = (K + BKS - 1) // BKS
    nh, h, rv, c0, c1, bos, eos = state_program(chunk_offsets, order, cu, H, V, BV)
    dht_seg = dht + nh.to(tl.int64) * K * V
    d1 = load_state(dht_seg, 0, rv, K, V, BKS, HAS_DHT)
    if NKS > 1:
        d2 = load_state(dht_seg, BKS, rv, K, V, BKS, HAS_DHT)
    if NKS > 2:
        d3 = load_state(dht_seg, 2 * BKS, rv, K, V, BKS, HAS_DHT)
    if NKS > 3:
        d4 = load_state(dht_seg, 3 * BKS, rv, K, V, BKS, HAS_DHT)
    rows = tl.arange(0, 64)
    ck = tl.arange(0, BKS)  # key columns of one register block, from its first
    for i in range(0, c1 - c0):
        c = c1 - 1 - i  # int64 chunk id, last chunk first
        start = bos + (c - c0) * 64
        length = eos - start
        mr = rows < length
        row0 = start * H + h  # int64 (token, head) row of the chunk's first token
        dh_c = dh + (c * H + h) * K * V
        store_state(dh_c, 0, rv, d1, K, V, BKS)
        if NKS > 1:
            store_state(dh_c, BKS, rv, d2, K, V, BKS)
        if NKS > 2:
            store_state(dh_c, 2 * BKS, rv, d3, K, V, BKS)
        if NKS > 3:
            store_state(dh_c, 3 * BKS, rv, d4, K, V, BKS)
        # the gates scale the (BT, BV) tiles rather than every key block: (Q * Gamma)^T dO = Q^T (Gamma dO) and
        # (K * exp(gamma_C - gamma)) dS1 = exp(gamma_C - gamma) (K dS1), so the token tiles go into the products
        # as loaded
        doc = chunk_tile(do, row0, 0, rv, mr, H, V).to(tl.float32) * scale
        duc = chunk_tile(du, row0, 0, rv, mr, H, V).to(tl.float32)
        decay = 1.0
        kd = mm(chunk_tile(k, row0, 0, ck, mr, H, K), d1, MODE)
        if NKS > 1:
            kd += mm(chunk_tile(k, row0, BKS, ck, mr, H, K), d2, MODE)
        if NKS > 2:
            kd += mm(chunk_tile(k, row0, 2 * BKS, ck, mr, H, K), d3, MODE)
        if NKS > 3:
            kd += mm(chunk_tile(k, row0, 3 * BKS, ck, mr, H, K), d4, MODE)
        if USE_G:
            gam, g_last = load_gates(gamma, row0 + rows * H, mr, start, length, H, h)
            decay = tl.exp(g_last)
            kd = kd * tl.exp(tl.where(mr, g_last - gam, 0.0))[:, None]
            doc = doc * tl.exp(gam)[:, None]
        duc += kd  # dU = P^T dO (already in du) + Kd dS1
        store_chunk_tile(du, row0, rv, mr, H, V, duc)
        d1 = _state_bwd_block(d1, q, w, row0, ck, mr, 0, doc, duc, decay, H, K, USE_G, IS_DELTA, MODE)
        if NKS > 1:
            d2 = _state_bwd_block(d2, q, w, row0, ck, mr, BKS, doc, duc, decay, H, K, USE_G, IS_DELTA, MODE)
        if NKS > 2:
            d3 = _state_bwd_block(d3, q, w, row0, ck, mr, 2 * BKS, doc, duc, decay, H, K, USE_G, IS_DELTA, MODE)
        if NKS > 3:
            d4 = _state_bwd_block(d4, q, w, row0, ck, mr, 3 * BKS, doc, duc, decay, H, K, USE_G, IS_DELTA, MODE)
    if STORE_DH0:
        dh0_seg = dh0 + nh.to(tl.int64) * K * V
        store_state(dh0_seg, 0, rv, d1, K, V, BKS)
        if NKS > 1:
            store_state(dh0_seg, BKS, rv, d2, K, V, BKS)
        if NKS > 2:
            store_state(dh0_seg, 2 * BKS, rv, d3, K, V, BKS)
        if NKS > 3:
            store_state(dh0_seg, 3 * BKS, rv, d4, K, V, BKS)


@triton.jit
def dqk_kernel(q, k, u, gamma, h_in, dh, do, du, dq, dk, dw, dgam, chunk_seg, chunk_start, cu, scale, part_stride,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               USE_G: tl.constexpr, IS_DELTA: tl.constexpr, MODE: tl.constexpr):
    # one program per (chunk, key block, head): the key blocks of a chunk are consecutive programs, sharing its
    # dO, U and dU tiles via L2. Each forms dP = dO U^T over all of V itself (at K = 256 and BK = 128, ~6% more
    # products than forming it once per chunk), for K / BK times the programs of a chunk-wide one, each holding
    # the accumulators of one key block.
    NKB: tl.constexpr = (K + BK - 1) // BK
    c = tl.program_id(0) // NKB
    kb = tl.program_id(0) % NKB
    h = tl.program_id(1)
    seg, start, length = chunk_rows(chunk_seg, chunk_start, cu, c)
    if seg < 0:
        return
    rows = tl.arange(0, 64)
    mr = rows < length
    tok = (start + rows) * H + h
    cols = kb * BK + tl.arange(0, BK)
    mk = mr[:, None] & (cols[None, :] < K)
    h_base = (c.to(tl.int64) * H + h) * K * V

    dp = tl.zeros([64, 64], dtype=tl.float32)  # dO U^T
    dqg = tl.zeros([64, BK], dtype=tl.float32)  # dO S0^T
    dkd = tl.zeros([64, BK], dtype=tl.float32)  # U dS1^T
    dwc = tl.zeros([64, BK], dtype=tl.float32)  # -dU S0^T
    sdot = tl.sum(tl.zeros([16], dtype=tl.float32), 0)  # <S0, dS1> over this key block
    for vv in range(0, V, BV):
        rv = vv + tl.arange(0, BV)
        mkv = (cols[:, None] < K) & (rv[None, :] < V)
        s0 = tl.load(h_in + h_base + cols[:, None] * V + rv[None, :], mask=mkv, other=0.0)  # (BK, BV)
        ds1 = tl.load(dh + h_base + cols[:, None] * V + rv[None, :], mask=mkv, other=0.0)
        doc = rows_tile(do, tok, mr, vv, V, BV)
        uc = rows_tile(u, tok, mr, vv, V, BV)
        dp += mm(doc, tl.trans(uc), MODE)
        dqg += mm(doc, tl.trans(s0), MODE)
        dkd += mm(uc, tl.trans(ds1), MODE)
        if IS_DELTA:
            dwc -= mm(rows_tile(du, tok, mr, vv, V, BV), tl.trans(s0), MODE)
        if USE_G:
            sdot += tl.sum(tl.sum(s0.to(tl.float32) * ds1.to(tl.float32), 1), 0)

    causal = rows[:, None] >= rows[None, :]
    qc = tl.load(q + tok[:, None] * K + cols[None, :], mask=mk, other=0.0).to(tl.float32) * scale
    kc = tl.load(k + tok[:, None] * K + cols[None, :], mask=mk, other=0.0).to(tl.float32)
    if USE_G:
        gam, g_last = load_gates(gamma, tok, mr, start, length, H, h)
        decay = tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
        dpm = dp * decay
        e_q = tl.exp(gam)
        e_k = tl.exp(tl.where(mr, g_last - gam, 0.0))
        dqs = mm(dpm, kc, MODE) + e_q[:, None] * dqg
        dkc = mm(tl.trans(dpm), qc, MODE) + e_k[:, None] * dkd
    else:
        dpm = tl.where(causal, dp, 0.0)
        dqs = mm(dpm, kc, MODE) + dqg
        dkc = mm(tl.trans(dpm), qc, MODE) + dkd
    tl.store(dq + tok[:, None] * K + cols[None, :], (dqs * scale).to(dq.dtype.element_ty), mask=mk)
    tl.store(dk + tok[:, None] * K + cols[None, :], dkc.to(dk.dtype.element_ty), mask=mk)
    if IS_DELTA:
        tl.store(dw + tok[:, None] * K + cols[None, :], dwc.to(dw.dtype.element_ty), mask=mk)
    if USE_G:
        # this key block's share of dgamma (the decays in P, the query gate, the key-to-end gate, the state
        # decay), written to its own slice of dgam: wy_bwd_kernel sums the key blocks' slices
        r = dp * mm(qc, tl.trans(kc), MODE) * decay
        dgv = tl.sum(r, 1) - tl.sum(r, 0)
        dgv += tl.sum(qc * e_q[:, None] * dqg, 1)
        kdd = tl.sum(kc * e_k[:, None] * dkd, 1)
        last = tl.minimum(length, 64) - 1
        dgv += tl.where(rows == last, tl.sum(kdd, 0) + tl.exp(g_last) * sdot, 0.0) - kdd
        tl.store(dgam + kb * part_stride + tok, dgv, mask=mr)


@triton.jit
def wy_bwd_kernel(k, v, beta, gamma, tinv, dw, du, dk_in, dgam, dk, dv, dbeta, dg, chunk_seg, chunk_start, cu,
                  part_stride, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, DGAM_PARTS: tl.constexpr, USE_G: tl.constexpr, IS_DELTA: tl.constexpr,
                  MODE: tl.constexpr, LOW: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    seg, start, length = chunk_rows(chunk_seg, chunk_start, cu, c)
    if seg < 0:
        return
    rows = tl.arange(0, 64)
    mr = rows < length
    tok = (start + rows) * H + h
    dgv = tl.zeros([64], dtype=tl.float32)
    e_g = tl.full([64], 1.0, dtype=tl.float32)
    if USE_G:
        for part in range(DGAM_PARTS):  # dqk_kernel's key blocks
            dgv += tl.load(dgam + part * part_stride + tok, mask=mr, other=0.0)
        gam, _ = load_gates(gamma, tok, mr, start, length, H, h)
        e_g = tl.exp(gam)
    if IS_DELTA:
        b = tl.load(beta + tok, mask=mr, other=0.0).to(tl.float32)
        bk = b * e_g
        t_inv = tl.load(tinv + tok[:, None] * 64 + rows[None, :], mask=mr[:, None], other=0.0)
        dti = tl.zeros([64, 64], dtype=tl.float32)  # d Tinv
        kkt = tl.zeros([64, 64], dtype=tl.float32)
        for kk in range(0, K, BK):
            cols = kk + tl.arange(0, BK)
            mk = mr[:, None] & (cols[None, :] < K)
            kc = tl.load(k + tok[:, None] * K + cols[None, :], mask=mk, other=0.0)
            dwc = tl.load(dw + tok[:, None] * K + cols[None, :], mask=mk, other=0.0).to(tl.float32)
            dti += mm32(dwc, tl.trans(kc.to(tl.float32) * bk[:, None]), MODE, LOW)
            kkt += mm(kc, tl.trans(kc), MODE)
        for vv in range(0, V, BV):
            cols = vv + tl.arange(0, BV)
            mv = mr[:, None] & (cols[None, :] < V)
            vc = tl.load(v + tok[:, None] * V + cols[None, :], mask=mv, other=0.0).to(tl.float32)
            duc = tl.load(du + tok[:, None] * V + cols[None, :], mask=mv, other=0.0).to(tl.float32)
            dti += mm32(duc, tl.trans(vc * b[:, None]), MODE, LOW)
        strict = (rows[:, None] > rows[None, :]) & mr[:, None]
        da = -mm32(tl.trans(t_inv), mm32(dti, tl.trans(t_inv), MODE, LOW), MODE, LOW)
        da = tl.where(strict, da, 0.0)
        if USE_G:
            e_a = tl.exp(tl.where(strict, gam[:, None] - gam[None, :], float("-inf")))
        else:
            e_a = tl.where(strict, 1.0, 0.0)
        dbv = tl.sum(da * kkt * e_a, 1)
        gm = da * e_a * b[:, None]  # dA_ij beta_i decay_ij: d(k_i . k_j) of A
        if USE_G:
            ra = gm * kkt  # dA * A
            dgv += tl.sum(ra, 1) - tl.sum(ra, 0)
        for kk in range(0, K, BK):
            cols = kk + tl.arange(0, BK)
            mk = mr[:, None] & (cols[None, :] < K)
            kc = tl.load(k + tok[:, None] * K + cols[None, :], mask=mk, other=0.0).to(tl.float32)
            dwc = tl.load(dw + tok[:, None] * K + cols[None, :], mask=mk, other=0.0).to(tl.float32)
            dkc = tl.load(dk_in + tok[:, None] * K + cols[None, :], mask=mk, other=0.0).to(tl.float32)
            dkb = mm32(tl.trans(t_inv), dwc, MODE, LOW)  # d (beta Gamma K)
            dkc += bk[:, None] * dkb + mm32(gm, kc, MODE, LOW) + mm32(tl.trans(gm), kc, MODE, LOW)
            tl.store(dk + tok[:, None] * K + cols[None, :], dkc.to(dk.dtype.element_ty), mask=mk)
            kdk = tl.sum(kc * dkb, 1)
            dbv += e_g * kdk
            if USE_G:
                dgv += bk * kdk
        for vv in range(0, V, BV):
            cols = vv + tl.arange(0, BV)
            mv = mr[:, None] & (cols[None, :] < V)
            vc = tl.load(v + tok[:, None] * V + cols[None, :], mask=mv, other=0.0).to(tl.float32)
            duc = tl.load(du + tok[:, None] * V + cols[None, :], mask=mv, other=0.0).to(tl.float32)
            dvb = mm32(tl.trans(t_inv), duc, MODE, LOW)  # d (beta V)
            tl.store(dv + tok[:, None] * V + cols[None, :], (b[:, None] * dvb).to(dv.dtype.element_ty), mask=mv)
            dbv += tl.sum(vc * dvb, 1)
        tl.store(dbeta + tok, dbv.to(dbeta.dtype.element_ty), mask=mr)
    if USE_G:
        # gamma_i = sum_{t <= i} g_t, so dg_t = sum_{i >= t} dgamma_i (padded rows hold zeros)
        dgt = tl.sum(dgv, 0) - tl.cumsum(dgv, 0) + dgv
        tl.store(dg + tok, dgt.to(dg.dtype.element_ty), mask=mr)
