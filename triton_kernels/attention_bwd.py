"""Attention backward kernels (the family and its flags: attention_common.py)."""

import triton
import triton.language as tl

from dit_fast.triton_kernels.attention_common import (_dot_head, _first_query, _grid_position, _hidden_keys,
                                                      _key_span, _key_tiles, _keys_kept, _last_query, _load_chunks,
                                                      _load_tile_pair, _mask_scores, _mma_chunks, _program_coords,
                                                      _query_span, _rotate_chunks, _store_chunks, _tile_grid,
                                                      _tile_inside_windows, _tile_order_tokens, _tile_ptrs,
                                                      _zero_rows)

# ---------------------------------------------------------------------------------------------
# Backward (flash attention 2). With s = scale * q.k, p = exp(s - lse), o = p v and dO given:
#   dv = p^T dO                    dp = dO v^T
#   ds = p * (dp - delta),  delta = rowsum(dO * o)  (precomputed once per query)
#   dq = scale * ds k              dk = scale * ds^T q
# Deterministic (the default): two kernels, no atomics: one per key tile accumulating dk, dv over
# the query tiles that can see it (scores computed transposed, (keys, queries)), one per query tile
# accumulating dq over its key tiles: 7 matrix products per tile pair (s and dp twice).
# DQ_ATOMIC (FlashAttention-2's original and FA3's backward): the key-tile kernel alone, which also
# adds each pair's ds k into an fp32 dq buffer with atomic adds, then a convert kernel scales (and
# rotates) it: 5 products per pair, the FLOP count's own, but the order of the fp32 additions into
# dq follows the scheduling, so dq is not bitwise reproducible.
# With RoPE, q and k are the rotated ones and dq, dk are rotated back at the end:
# q_rot = R q  =>  dq = R^T dq_rot.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    O_ptr,  # forward output, (B, S, heads, D)
    DO_ptr,  # its gradient, (B, S, heads, D)
    DELTA_ptr,  # out: rowsum(dO * O), (B, heads, S) fp32
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    HEADS, S, D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(S, BLOCK_M)
    bh = (pid // num_m).to(tl.int64)
    b = bh // HEADS
    h = bh % HEADS
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S)[:, None] & (offs_d < D)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O_ptr + b * stride_ob + h * stride_oh + rows * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO_ptr + b * stride_dob + h * stride_doh + rows * stride_dos + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA_ptr + bh * S + offs_m, delta, mask=offs_m < S)


@triton.jit
def _backward_rows(lse, delta):
    """(lse in log2 units, delta) of query rows as the products use them: p = exp2(s * scale - lse) and
    ds = p * (dp - delta). Two kinds of rows pass no gradient, as in the reference's autograd: a row
    with no visible key (lse = -inf) and a row that met a non-finite key or value (lse = NaN: the
    forward returned it as NaN, _finish_rows). For both, lse = +inf makes p exactly 0 on every finite
    score and delta = 0 keeps the keys hidden from the row clean: there p = 0 by a select, and
    0 * (dp - NaN) would carry the row's NaN to their dk (dq: the row's own). Per row, not per score."""
    lse = lse * 1.4426950408889634
    blocked = (lse == float("-inf")) | (lse != lse)
    return tl.where(blocked, float("inf"), lse), tl.where(blocked, 0.0, delta)


@triton.jit
def _query_rows(start, BLOCK: tl.constexpr, tok, TILED: tl.constexpr):
    """Positions of the query tile [start, start + BLOCK) in its group: where its rows are (TILED: the
    gathered tokens themselves, full mode)."""
    offs = start + tl.arange(0, BLOCK)
    if TILED:
        offs = tok
    return offs


@triton.jit
def _atomic_add_chunks(base, offs, valid, TOKEN_STRIDE, stride_s, x0, x1, D: tl.constexpr, BLOCK_D0: tl.constexpr,
                       BLOCK_D1: tl.constexpr, OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """base[rows at offs] += x^T for the transposed chunks x0 (BLOCK_D0, R), x1 (BLOCK_D1, R): fp32 atomic
    adds (relaxed: only their sum is read, by the convert kernel after this one ends)."""
    offs_d = tl.arange(0, BLOCK_D0)
    ptrs = _tile_ptrs(base, offs, TOKEN_STRIDE, stride_s, offs_d, OFFS_64, ALIGNED)
    mask = valid[:, None] & (offs_d[None, :] < D)
    tl.atomic_add(tl.trans(ptrs), x0, mask=tl.trans(mask), sem="relaxed")
    if BLOCK_D1 > 0:
        offs_d = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        ptrs = _tile_ptrs(base, offs, TOKEN_STRIDE, stride_s, offs_d, OFFS_64, ALIGNED)
        mask = valid[:, None] & (offs_d[None, :] < D)
        tl.atomic_add(tl.trans(ptrs), x1, mask=tl.trans(mask), sem="relaxed")


@triton.jit
def _dkdv_tile(dk0, dk1, dv0, dv1, k0, k1, v0, v1, tok_k, kpm_k, start_m, end_m, window_mask, q_base, do_base,
               lse_base, delta_base, dqa_base, ROPE_ptr, stride_qs, stride_dos, stride_dqas, g_off, TOKEN_STRIDE,
               qk_scale, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
               HAS_ROPE: tl.constexpr, HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, TILED: tl.constexpr,
               DQ_ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN: tl.constexpr, OFFS_64: tl.constexpr,
               ALIGNED: tl.constexpr):
    """One query tile of the dk/dv backward (and, DQ_ATOMIC, its dq share). EVEN: the tile lies inside
    the sequence."""
    q0, q1, do0, do1, tok_q, valid_m = _load_tile_pair(
        start_m, end_m, q_base, do_base, ROPE_ptr, stride_qs, stride_dos, g_off, TOKEN_STRIDE, GRID_T, GRID_H, GRID_W,
        TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_M, BLOCK_D0, BLOCK_D1, HAS_ROPE, TILED, EVEN, OFFS_64,
        ALIGNED)
    lse, delta = _backward_rows(tl.load(lse_base + tok_q, mask=valid_m, other=0.0),
                                tl.load(delta_base + tok_q, mask=valid_m, other=0.0))
    s_t = _dot_head(k0, k1, q0, q1, BLOCK_D1, DOT_PRECISION)  # (BLOCK_N, BLOCK_M), unscaled
    p_t = tl.math.exp2(tl.fma(s_t, qk_scale, -lse[None, :]))  # one FMA per score, whatever Triton's fusion default
    p_t = _mask_scores(p_t, 0.0, tok_q[None, :], tok_k[:, None], valid_m[None, :], kpm_k[:, None], window_mask,
                       GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, HAS_MASK, WINDOW, EVEN)
    dv0, dv1 = _mma_chunks(dv0, dv1, p_t.to(do0.dtype), do0, do1, BLOCK_D1, DOT_PRECISION)
    dp_t = _dot_head(v0, v1, do0, do1, BLOCK_D1, DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk0, dk1 = _mma_chunks(dk0, dk1, ds_t.to(q0.dtype), q0, q1, BLOCK_D1, DOT_PRECISION)
    if DQ_ATOMIC:
        # this pair's share of dq (unscaled, rotated), transposed: dq^T = k^T ds^T, (chunk, BLOCK_N) x
        # (BLOCK_N, BLOCK_M): the head dim is the product's M, so a 32-query tile still feeds the wgmma units
        ds_t = ds_t.to(k0.dtype)
        dq0 = tl.dot(tl.trans(k0), ds_t, input_precision=DOT_PRECISION)
        dq1 = 0.0
        if BLOCK_D1 > 0:
            dq1 = tl.dot(tl.trans(k1), ds_t, input_precision=DOT_PRECISION)
        _atomic_add_chunks(dqa_base, _query_rows(start_m, BLOCK_M, tok_q, TILED), valid_m, TOKEN_STRIDE,
                           stride_dqas, dq0, dq1, D, BLOCK_D0, BLOCK_D1, OFFS_64, ALIGNED)
    return dk0, dk1, dv0, dv1


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr,  # (B, S, heads, D) inputs of the forward
    DO_ptr,  # grad of the output, (B, Sq, heads, D)
    LSE_ptr,  # (B, heads, Sq) fp32, from the forward
    DELTA_ptr,  # rowsum(dO * O), (B, heads, Sq) fp32
    DK_ptr, DV_ptr,  # out: (B, Sk, heads, D), contiguous
    DQA_ptr,  # out [DQ_ATOMIC]: dq before its scale, (B, Sq, heads, D) fp32 zeros, added into
    KPM_ptr, ROPE_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dqab, stride_dqas, stride_dqah,
    stride_mb, stride_mh,  # key padding mask batch and head strides (0: one mask for every head)
    HEADS, GROUPS, SQ, LQ, LK, GROUP_STRIDE, TOKEN_STRIDE,
    GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, ROPE_DT2, ROPE_DTH2,
    D: tl.constexpr, sm_scale, LQ_BUCKET, LK_BUCKET,
    BLOCK_M: tl.constexpr,  # query tile (inner loop)
    BLOCK_N: tl.constexpr,  # key tile (owned by the program)
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,  # the head dim's chunks (attention_common.py: HEAD DIM)
    HAS_ROPE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr,
    TILED: tl.constexpr,  # positions in 3D-tile order, window counted in tiles (see _tile_order_tokens)
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,  # TILED's 3D tile, in tokens (1 otherwise)
    DQ_ATOMIC: tl.constexpr,  # also accumulate dq into DQA_ptr (one-pass backward, not bitwise reproducible)
    DOT_PRECISION: tl.constexpr,
    OFFS_64: tl.constexpr,  # int64 element offsets inside a group (see _tile_ptrs)
    ALIGNED: tl.constexpr,  # every pointer and stride a multiple of 16 bytes (see _tile_ptrs)
):
    n_blk, b, h, g_off = _program_coords(LK, BLOCK_N, GROUPS, HEADS, GROUP_STRIDE)

    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_k = offs_n < LK
    tok_k = g_off + offs_n * TOKEN_STRIDE
    if TILED:  # rows gathered through their tokens (full mode: group offset 0, token stride 1)
        tok_k, valid_k = _tile_order_tokens(n_blk * BLOCK_N, BLOCK_N, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W)
        offs_n = tok_k
    g_off64 = g_off.to(tl.int64)
    k_base = K_ptr + b * stride_kb + h * stride_kh + g_off64 * stride_ks
    v_base = V_ptr + b * stride_vb + h * stride_vh + g_off64 * stride_vs
    k0, k1, v0, v1, _, _ = _load_tile_pair(n_blk * BLOCK_N, LK, k_base, v_base, ROPE_ptr, stride_ks, stride_vs, g_off,
                                           TOKEN_STRIDE, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W, ROPE_DT2,
                                           ROPE_DTH2, D, BLOCK_N, BLOCK_D0, BLOCK_D1, HAS_ROPE, TILED, False, OFFS_64,
                                           ALIGNED)
    kpm_k = valid_k
    if HAS_MASK:
        kpm_k = tl.load(KPM_ptr + b * stride_mb + h * stride_mh + tok_k, mask=valid_k, other=0) != 0
    if DQ_ATOMIC and (HAS_MASK or WINDOW):
        # dq's share ds k meets every owned key, hidden or not: a hidden key's row must not bring 0 * NaN
        # through dp = v dO^T or ds k (the deterministic kernel needs no such select: a hidden key's own
        # dk, dv are zeroed at the end, and no other key's gradient reads its row)
        hide = _hidden_keys(k0, k1, v0, v1, kpm_k, True, HAS_MASK, WINDOW, BLOCK_D1)
        k0, k1 = _zero_rows(k0, k1, hide, BLOCK_D1)
        v0, v1 = _zero_rows(v0, v1, hide, BLOCK_D1)
    q_base = Q_ptr + b * stride_qb + h * stride_qh + g_off64 * stride_qs
    do_base = DO_ptr + b * stride_dob + h * stride_doh + g_off64 * stride_dos
    dqa_base = DQA_ptr + b * stride_dqab + h * stride_dqah + g_off64 * stride_dqas
    lse_base = LSE_ptr + (b * HEADS + h) * SQ
    delta_base = DELTA_ptr + (b * HEADS + h) * SQ
    qk_scale = sm_scale * 1.4426950408889634

    dk0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
    dk1 = 0.0  # the second chunk's accumulators (placeholders without one)
    dv1 = 0.0
    if BLOCK_D1 > 0:
        dk1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
    if WINDOW:
        first = tl.minimum(n_blk * BLOCK_N, LK - 1)
        last = tl.minimum(n_blk * BLOCK_N + BLOCK_N, LK) - 1
        f_lo, f_hi, r_lo, runs, c_lo, c_hi = _query_span(first, last, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H,
                                                         WIN_W)
        for f in range(f_lo, f_hi + 1):
            for run in range(0, runs):
                lo = (f * GRID_H + r_lo + run) * GRID_W + c_lo
                hi = lo - c_lo + c_hi + 1
                for start_m in range(lo, hi, BLOCK_M):
                    window_mask = (start_m + BLOCK_M > hi) | (_tile_inside_windows(
                        start_m, start_m + BLOCK_M - 1, first, last, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W) == 0)
                    dk0, dk1, dv0, dv1 = _dkdv_tile(
                        dk0, dk1, dv0, dv1, k0, k1, v0, v1, tok_k, kpm_k, start_m, hi, window_mask, q_base, do_base,
                        lse_base, delta_base, dqa_base, ROPE_ptr, stride_qs, stride_dos, stride_dqas, g_off,
                        TOKEN_STRIDE, qk_scale, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                        ROPE_DT2, ROPE_DTH2, D, BLOCK_M, BLOCK_D0, BLOCK_D1, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                        DQ_ATOMIC, DOT_PRECISION, False, OFFS_64, ALIGNED)
    elif TILED:
        # every token of the query tiles whose window of tiles contains this key tile: along each axis the
        # tiles _first_query.._last_query; those of a (t, h) tile row are one run of positions
        V, TILES_T, TILES_H, TILES_W = _tile_grid(GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W)
        ka, kb, kc = _grid_position((n_blk * BLOCK_N) // V, TILES_H, TILES_W)
        qc0, qc1 = _first_query(kc, WIN_W, TILES_W), _last_query(kc, WIN_W, TILES_W)
        for qa in range(_first_query(ka, WIN_T, TILES_T), _last_query(ka, WIN_T, TILES_T) + 1):
            for qb in range(_first_query(kb, WIN_H, TILES_H), _last_query(kb, WIN_H, TILES_H) + 1):
                row = (qa * TILES_H + qb) * TILES_W
                for start_m in range((row + qc0) * V, (row + qc1 + 1) * V, BLOCK_M):
                    dk0, dk1, dv0, dv1 = _dkdv_tile(
                        dk0, dk1, dv0, dv1, k0, k1, v0, v1, tok_k, kpm_k, start_m, LQ, False, q_base, do_base,
                        lse_base, delta_base, dqa_base, ROPE_ptr, stride_qs, stride_dos, stride_dqas, g_off,
                        TOKEN_STRIDE, qk_scale, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                        ROPE_DT2, ROPE_DTH2, D, BLOCK_M, BLOCK_D0, BLOCK_D1, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                        DQ_ATOMIC, DOT_PRECISION, False, OFFS_64, ALIGNED)
    else:
        m_full = LQ - LQ % BLOCK_M
        for start_m in range(0, m_full, BLOCK_M):
            dk0, dk1, dv0, dv1 = _dkdv_tile(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, tok_k, kpm_k, start_m, LQ, False, q_base, do_base,
                lse_base, delta_base, dqa_base, ROPE_ptr, stride_qs, stride_dos, stride_dqas, g_off,
                TOKEN_STRIDE, qk_scale, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                ROPE_DT2, ROPE_DTH2, D, BLOCK_M, BLOCK_D0, BLOCK_D1, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                DQ_ATOMIC, DOT_PRECISION, True, OFFS_64, ALIGNED)
        if m_full < LQ:
            dk0, dk1, dv0, dv1 = _dkdv_tile(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, tok_k, kpm_k, m_full, LQ, False, q_base, do_base,
                lse_base, delta_base, dqa_base, ROPE_ptr, stride_qs, stride_dos, stride_dqas, g_off,
                TOKEN_STRIDE, qk_scale, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                ROPE_DT2, ROPE_DTH2, D, BLOCK_M, BLOCK_D0, BLOCK_D1, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                DQ_ATOMIC, DOT_PRECISION, False, OFFS_64, ALIGNED)

    dk0 = dk0 * sm_scale
    if BLOCK_D1 > 0:
        dk1 = dk1 * sm_scale
    if HAS_ROPE:
        dk0, dk1 = _rotate_chunks(dk0, dk1, tok_k, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D0,
                                  BLOCK_D1, True)
    if HAS_MASK:  # a padded key's gradients are zero, whatever 0 * NaN its own row made of them
        dk0, dk1 = _zero_rows(dk0, dk1, kpm_k == 0, BLOCK_D1)
        dv0, dv1 = _zero_rows(dv0, dv1, kpm_k == 0, BLOCK_D1)
    out_base = b * stride_dkb + h * stride_dkh + g_off64 * stride_dks  # dk and dv share the layout
    _store_chunks(DK_ptr + out_base, offs_n, valid_k, TOKEN_STRIDE, stride_dks, dk0, dk1, D, BLOCK_D0, BLOCK_D1,
                  OFFS_64, ALIGNED)
    _store_chunks(DV_ptr + out_base, offs_n, valid_k, TOKEN_STRIDE, stride_dks, dv0, dv1, D, BLOCK_D0, BLOCK_D1,
                  OFFS_64, ALIGNED)


@triton.jit
def _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, tok_q, start_n, end_n, window_mask, k_base, v_base, kpm_base,
             ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale,
             GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2,
             D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
             HAS_ROPE: tl.constexpr, HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, TILED: tl.constexpr,
             DOT_PRECISION: tl.constexpr, EVEN: tl.constexpr, OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """One key tile of the dq backward. EVEN: the tile lies inside the sequence."""
    k0, k1, v0, v1, tok_k, valid_n = _load_tile_pair(
        start_n, end_n, k_base, v_base, ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, GRID_T, GRID_H, GRID_W,
        TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0, BLOCK_D1, HAS_ROPE, TILED, EVEN, OFFS_64,
        ALIGNED)
    s = _dot_head(q0, q1, k0, k1, BLOCK_D1, DOT_PRECISION)  # unscaled
    key_ok = _keys_kept(kpm_base, tok_k, valid_n, HAS_MASK)
    p = tl.math.exp2(tl.fma(s, qk_scale, -lse[:, None]))  # one FMA per score, whatever Triton's fusion default
    p = _mask_scores(p, 0.0, tok_q[:, None], tok_k[None, :], valid_n[None, :], key_ok[None, :], window_mask,
                     GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, HAS_MASK, WINDOW, EVEN)
    if HAS_MASK or WINDOW:  # masked keys reach nothing through 0 * NaN in dO v^T or ds k
        hide = _hidden_keys(k0, k1, v0, v1, key_ok, window_mask, HAS_MASK, WINDOW, BLOCK_D1)
        k0, k1 = _zero_rows(k0, k1, hide, BLOCK_D1)
        v0, v1 = _zero_rows(v0, v1, hide, BLOCK_D1)
    dp = _dot_head(do0, do1, v0, v1, BLOCK_D1, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return _mma_chunks(dq0, dq1, ds.to(k0.dtype), k0, k1, BLOCK_D1, DOT_PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, DELTA_ptr,
    DQ_ptr,  # out: (B, Sq, heads, D), contiguous
    KPM_ptr, ROPE_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_mb, stride_mh,  # key padding mask batch and head strides (0: one mask for every head)
    HEADS, GROUPS, SQ, LQ, LK, GROUP_STRIDE, TOKEN_STRIDE,
    GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, ROPE_DT2, ROPE_DTH2,
    D: tl.constexpr, sm_scale, LQ_BUCKET, LK_BUCKET,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,  # the head dim's chunks (attention_common.py: HEAD DIM)
    HAS_ROPE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr,
    TILED: tl.constexpr,  # positions in 3D-tile order, window counted in tiles (see _tile_order_tokens)
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,  # TILED's 3D tile, in tokens (1 otherwise)
    DOT_PRECISION: tl.constexpr,
    OFFS_64: tl.constexpr,  # int64 element offsets inside a group (see _tile_ptrs)
    ALIGNED: tl.constexpr,  # every pointer and stride a multiple of 16 bytes (see _tile_ptrs)
):
    m_blk, b, h, g_off = _program_coords(LQ, BLOCK_M, GROUPS, HEADS, GROUP_STRIDE)

    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_m < LQ
    tok_q = g_off + offs_m * TOKEN_STRIDE
    if TILED:  # rows gathered through their tokens (full mode: group offset 0, token stride 1)
        tok_q, valid_m = _tile_order_tokens(m_blk * BLOCK_M, BLOCK_M, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W)
        offs_m = tok_q
    g_off64 = g_off.to(tl.int64)
    q_base = Q_ptr + b * stride_qb + h * stride_qh + g_off64 * stride_qs
    do_base = DO_ptr + b * stride_dob + h * stride_doh + g_off64 * stride_dos
    q0, q1, do0, do1, _, _ = _load_tile_pair(m_blk * BLOCK_M, LQ, q_base, do_base, ROPE_ptr, stride_qs, stride_dos,
                                             g_off, TOKEN_STRIDE, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W,
                                             ROPE_DT2, ROPE_DTH2, D, BLOCK_M, BLOCK_D0, BLOCK_D1, HAS_ROPE, TILED,
                                             False, OFFS_64, ALIGNED)
    lse, delta = _backward_rows(tl.load(LSE_ptr + (b * HEADS + h) * SQ + tok_q, mask=valid_m, other=0.0),
                                tl.load(DELTA_ptr + (b * HEADS + h) * SQ + tok_q, mask=valid_m, other=0.0))
    k_base = K_ptr + b * stride_kb + h * stride_kh + g_off64 * stride_ks
    v_base = V_ptr + b * stride_vb + h * stride_vh + g_off64 * stride_vs
    kpm_base = KPM_ptr + b * stride_mb + h * stride_mh
    qk_scale = sm_scale * 1.4426950408889634

    dq0 = tl.zeros((BLOCK_M, BLOCK_D0), dtype=tl.float32)
    dq1 = 0.0  # the second chunk's accumulator (a placeholder without one)
    if BLOCK_D1 > 0:
        dq1 = tl.zeros((BLOCK_M, BLOCK_D1), dtype=tl.float32)
    if WINDOW:
        first = tl.minimum(m_blk * BLOCK_M, LQ - 1)
        last = tl.minimum(m_blk * BLOCK_M + BLOCK_M, LQ) - 1
        f_lo, f_hi, r_lo, runs, c_lo, c_hi = _key_span(first, last, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W)
        for f in range(f_lo, f_hi + 1):
            for run in range(0, runs):
                lo = (f * GRID_H + r_lo + run) * GRID_W + c_lo
                hi = lo - c_lo + c_hi + 1
                for start_n in range(lo, hi, BLOCK_N):
                    window_mask = (start_n + BLOCK_N > hi) | (_tile_inside_windows(
                        first, last, start_n, start_n + BLOCK_N - 1, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W) == 0)
                    dq0, dq1 = _dq_tile(
                        dq0, dq1, q0, q1, do0, do1, lse, delta, tok_q, start_n, hi, window_mask, k_base, v_base,
                        kpm_base, ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale, GRID_T, GRID_H,
                        GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0,
                        BLOCK_D1, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, False, OFFS_64, ALIGNED)
    elif TILED:  # the forward's key tiles (see _attn_fwd_kernel)
        V, TILES_H, TILES_W, ka0, kb0, kc0 = _key_tiles(m_blk * BLOCK_M, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H,
                                                        WIN_W, TILE_T, TILE_H, TILE_W)
        for ka in range(ka0, ka0 + WIN_T):
            for kb in range(kb0, kb0 + WIN_H):
                lo = ((ka * TILES_H + kb) * TILES_W + kc0) * V
                for start_n in range(lo, lo + WIN_W * V, BLOCK_N):
                    dq0, dq1 = _dq_tile(
                        dq0, dq1, q0, q1, do0, do1, lse, delta, tok_q, start_n, LK, False, k_base, v_base,
                        kpm_base, ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale, GRID_T, GRID_H,
                        GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0,
                        BLOCK_D1, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, False, OFFS_64, ALIGNED)
    else:
        n_full = LK - LK % BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            dq0, dq1 = _dq_tile(
                dq0, dq1, q0, q1, do0, do1, lse, delta, tok_q, start_n, LK, False, k_base, v_base,
                kpm_base, ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale, GRID_T, GRID_H,
                GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0,
                BLOCK_D1, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, True, OFFS_64, ALIGNED)
        if n_full < LK:
            dq0, dq1 = _dq_tile(
                dq0, dq1, q0, q1, do0, do1, lse, delta, tok_q, n_full, LK, False, k_base, v_base,
                kpm_base, ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale, GRID_T, GRID_H,
                GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0,
                BLOCK_D1, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, False, OFFS_64, ALIGNED)

    dq0 = dq0 * sm_scale
    if BLOCK_D1 > 0:
        dq1 = dq1 * sm_scale
    if HAS_ROPE:
        dq0, dq1 = _rotate_chunks(dq0, dq1, tok_q, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D0,
                                  BLOCK_D1, True)
    dq_base = DQ_ptr + b * stride_dqb + h * stride_dqh + g_off64 * stride_dqs
    _store_chunks(dq_base, offs_m, valid_m, TOKEN_STRIDE, stride_dqs, dq0, dq1, D, BLOCK_D0, BLOCK_D1, OFFS_64,
                  ALIGNED)


@triton.jit
def _attn_bwd_dq_convert_kernel(
    DQA_ptr,  # dq before its scale, (B, S, heads, D) fp32 contiguous, from the DQ_ATOMIC dk/dv kernel
    DQ_ptr,  # out: (B, S, heads, D) in the input dtype, contiguous
    ROPE_ptr,
    HEADS, S, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, sm_scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    OFFS_64: tl.constexpr,  # int64 offsets inside a batch entry (S * heads * D can pass 2^31)
    ALIGNED: tl.constexpr,  # rows of both buffers 16-byte aligned (D * 4 and D * itemsize multiples of 16)
):
    """dq = scale * dqa, rotated back with RoPE (dq = R^T dq_rot), cast: one read, one write per element."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(S, BLOCK_M)
    bh = (pid // num_m).to(tl.int64)
    tok = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)  # raster tokens: RoPE positions in every mode
    valid = tok < S
    base = (bh // HEADS) * S * HEADS * D + (bh % HEADS) * D  # both buffers contiguous (B, S, heads, D)
    stride_s = HEADS * D
    x0, x1 = _load_chunks(DQA_ptr + base, tok, valid, 1, stride_s, D, BLOCK_D0, BLOCK_D1, False, OFFS_64, ALIGNED)
    x0 = x0 * sm_scale
    if BLOCK_D1 > 0:
        x1 = x1 * sm_scale
    if HAS_ROPE:
        x0, x1 = _rotate_chunks(x0, x1, tok, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D0,
                                BLOCK_D1, True)
    _store_chunks(DQ_ptr + base, tok, valid, 1, stride_s, x0, x1, D, BLOCK_D0, BLOCK_D1, OFFS_64, ALIGNED)
