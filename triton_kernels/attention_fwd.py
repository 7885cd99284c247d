"""Attention forward kernel (the family and its flags: attention_common.py)."""

import triton
import triton.language as tl

from dit_fast.triton_kernels.attention_common import (_cast_chunks, _dot_head, _head_descriptors, _hidden_keys,
                                                      _key_span, _key_tiles, _keys_kept, _load_chunks,
                                                      _load_chunks_tma, _load_tile_pair, _mask_scores, _mma_chunks,
                                                      _nonfinite_rows, _program_coords, _rotate_chunks, _store_chunks,
                                                      _tile_inside_windows, _tile_order_tokens, _zero_rows)


# ---------------------------------------------------------------------------------------------
# Forward. Online softmax (flash attention 2): per query tile, running max m, running sum l and
# unnormalised output acc over key tiles; scores in log2 units (scale * log2(e) folded in).
# https://arxiv.org/abs/2205.14135, https://arxiv.org/abs/2307.08691
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(acc0, acc1, m_i, l_i, q0, q1, tok_q, start_n, end_n, window_mask, k_base, v_base, kpm_base, ROPE_ptr,
              stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale,
              GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2,
              D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
              HAS_ROPE: tl.constexpr, HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, TILED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, EVEN: tl.constexpr, OFFS_64: tl.constexpr, ALIGNED: tl.constexpr,
              TMA: tl.constexpr = False, k_desc0=0, k_desc1=0, v_desc0=0, v_desc1=0):
    """One key tile of the forward. EVEN: the tile lies inside the sequence (no bounds masks). TMA: k and v
    arrive through the group's descriptors (rows past the group's end as zeros)."""
    if TMA:
        k0, k1 = _load_chunks_tma(k_desc0, k_desc1, start_n, BLOCK_D0, BLOCK_D1)
        v0, v1 = _load_chunks_tma(v_desc0, v_desc1, start_n, BLOCK_D0, BLOCK_D1)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        tok_k, valid_n = g_off + offs_n * TOKEN_STRIDE, offs_n < end_n
    else:
        k0, k1, v0, v1, tok_k, valid_n = _load_tile_pair(
            start_n, end_n, k_base, v_base, ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, GRID_T, GRID_H,
            GRID_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0, BLOCK_D1, HAS_ROPE, TILED, EVEN,
            OFFS_64, ALIGNED)
    s = _dot_head(q0, q1, k0, k1, BLOCK_D1, DOT_PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
    key_ok = _keys_kept(kpm_base, tok_k, valid_n, HAS_MASK)
    poison = None
    if HAS_MASK or WINDOW:  # masked keys' values must not reach p v as 0 * NaN (k's reach s, dropped below)
        poison = _hidden_keys(v0, v1, v0, v1, key_ok, window_mask, HAS_MASK, WINDOW, BLOCK_D1)
        v0, v1 = _zero_rows(v0, v1, poison, BLOCK_D1)
        poison = poison[None, :]
    s = _mask_scores(s, float("-inf"), tok_q[:, None], tok_k[None, :], valid_n[None, :], key_ok[None, :], window_mask,
                     GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, HAS_MASK, WINDOW, EVEN, poison)
    # the scale (> 0) goes on the row max, and into the exponent's FMA: no multiply per score
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units
    # a row with no visible key so far keeps m = -inf: subtract 0 instead, so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(tl.fma(s, qk_scale, -m_safe[:, None]))
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc0 = acc0 * alpha[:, None]
    if BLOCK_D1 > 0:
        acc1 = acc1 * alpha[:, None]
    acc0, acc1 = _mma_chunks(acc0, acc1, p.to(v0.dtype), v0, v1, BLOCK_D1, DOT_PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _finish_rows(acc0, acc1, m_i, l_i, BLOCK_D1: tl.constexpr):
    """(out0, out1, lse): the output rows acc / l and the natural-log logsumexp, from the loop's state.

    A fully masked row has l = 0 and acc = 0: it returns zeros, and lse = -inf. A row that met a
    non-finite key or value it may see (a NaN or inf reached acc or l: keys hidden from it never do, see
    MASKED) returns NaN in every column and lse = NaN, whichever tile brought it (the reference's
    contract); the backward then passes no gradient through it (_backward_rows, attention_bwd.py).
    Once per query tile, after the key loop: nothing is added to the loop itself."""
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    out0 = acc0 * inv_l[:, None]
    out1 = acc1
    if BLOCK_D1 > 0:
        out1 = acc1 * inv_l[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
    bad = _nonfinite_rows(out0, out1, BLOCK_D1)
    out0 = tl.where(bad[:, None], float("nan"), out0)
    if BLOCK_D1 > 0:
        out1 = tl.where(bad[:, None], float("nan"), out1)
    return out0, out1, tl.where(bad, float("nan"), lse)


@triton.jit
def _attn_fwd_kernel(
    Q_ptr,  # queries, (B, Sq, heads, D), last dim contiguous
    K_ptr,  # keys, (B, Sk, heads, D)
    V_ptr,  # values, (B, Sk, heads, D)
    O_ptr,  # out: (B, Sq, heads, D)
    LSE_ptr,  # out: natural-log logsumexp of the scaled scores, (B, heads, Sq) fp32
    KPM_ptr,  # key padding mask, (B, Sk) or per head (B, heads, Sk) uint8, nonzero = attend  [HAS_MASK]
    ROPE_ptr,  # RoPE cos / sin table, (max(T, H, W), 2, D / 2) fp32, from rope_tables  [HAS_ROPE]
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_mb, stride_mh,  # key padding mask batch and head strides (0: one mask for every head)
    HEADS, GROUPS,  # groups: frames (spatial), columns (temporal), 1 otherwise
    SQ,  # total query tokens (LSE row length)
    LQ, LK,  # query / key positions per group: tokens, or (TILED) tiles x tokens per tile, holes included
    GROUP_STRIDE, TOKEN_STRIDE,  # token of (group g, position i) = g * GROUP_STRIDE + i * TOKEN_STRIDE
    GRID_T, GRID_H, GRID_W,
    WIN_T, WIN_H, WIN_W,  # window: in tokens (WINDOW), in tiles (TILED)
    ROPE_DT2, ROPE_DTH2,  # RoPE pair boundaries: d_t / 2 and (d_t + d_h) / 2
    D: tl.constexpr,  # head dim: a compile-time constant, so masks on it keep 16-byte vector loads
    sm_scale,
    LQ_BUCKET, LK_BUCKET,  # autotune keys: next power of two of LQ / LK
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
    TMA: tl.constexpr = False,  # Hopper: q, k, v through TMA descriptors (not TILED, WINDOW or HAS_ROPE; ALIGNED)
    WARP_SPECIALIZE: tl.constexpr = False,  # TMA without HAS_MASK: warp-specialized dense loop (4 warps)
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
    k_base = K_ptr + b * stride_kb + h * stride_kh + g_off64 * stride_ks
    v_base = V_ptr + b * stride_vb + h * stride_vh + g_off64 * stride_vs
    k_desc0, k_desc1, v_desc0, v_desc1 = 0, 0, 0, 0
    if TMA:  # every load through a descriptor (a pointer load beside them defeats the warp specialization)
        q_desc0, q_desc1 = _head_descriptors(q_base, LQ, TOKEN_STRIDE * stride_qs, D, BLOCK_M, BLOCK_D0, BLOCK_D1)
        k_desc0, k_desc1 = _head_descriptors(k_base, LK, TOKEN_STRIDE * stride_ks, D, BLOCK_N, BLOCK_D0, BLOCK_D1)
        v_desc0, v_desc1 = _head_descriptors(v_base, LK, TOKEN_STRIDE * stride_vs, D, BLOCK_N, BLOCK_D0, BLOCK_D1)
        q0, q1 = _load_chunks_tma(q_desc0, q_desc1, m_blk * BLOCK_M, BLOCK_D0, BLOCK_D1)
    else:
        q0, q1 = _load_chunks(q_base, offs_m, valid_m, TOKEN_STRIDE, stride_qs, D, BLOCK_D0, BLOCK_D1, False, OFFS_64,
                              ALIGNED)
    if HAS_ROPE:
        r0, r1 = _rotate_chunks(q0, q1, tok_q, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D0,
                                BLOCK_D1, False)
        q0, q1 = _cast_chunks(r0, r1, q0, BLOCK_D1)
    kpm_base = KPM_ptr + b * stride_mb + h * stride_mh
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 is the native instruction

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, BLOCK_D0), dtype=tl.float32)
    acc1 = 0.0  # the second chunk's accumulator (a placeholder without one)
    if BLOCK_D1 > 0:
        acc1 = tl.zeros((BLOCK_M, BLOCK_D1), dtype=tl.float32)
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
                    acc0, acc1, m_i, l_i = _fwd_tile(
                        acc0, acc1, m_i, l_i, q0, q1, tok_q, start_n, hi, window_mask, k_base, v_base, kpm_base,
                        ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale, GRID_T, GRID_H, GRID_W, WIN_T,
                        WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0, BLOCK_D1,
                        HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, False, OFFS_64, ALIGNED)
    elif TILED:
        # every token of the WIN_T x WIN_H x WIN_W key tiles around the query's tile, no window mask; the
        # WIN_W tiles of a (t, h) tile row are one run of positions, V // BLOCK_N blocks per tile
        V, TILES_H, TILES_W, ka0, kb0, kc0 = _key_tiles(m_blk * BLOCK_M, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H,
                                                        WIN_W, TILE_T, TILE_H, TILE_W)
        for ka in range(ka0, ka0 + WIN_T):
            for kb in range(kb0, kb0 + WIN_H):
                lo = ((ka * TILES_H + kb) * TILES_W + kc0) * V
                for start_n in range(lo, lo + WIN_W * V, BLOCK_N):
                    acc0, acc1, m_i, l_i = _fwd_tile(
                        acc0, acc1, m_i, l_i, q0, q1, tok_q, start_n, LK, False, k_base, v_base, kpm_base,
                        ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale, GRID_T, GRID_H, GRID_W, WIN_T,
                        WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0, BLOCK_D1,
                        HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, False, OFFS_64, ALIGNED)
    elif WARP_SPECIALIZE:
        # one loop over every key tile, each bounds-masked (a tile after the loop keeps Triton from
        # specializing it): a producer warp issues the TMA loads, two warpgroups compute
        for start_n in tl.range(0, LK, BLOCK_N, warp_specialize=True):
            acc0, acc1, m_i, l_i = _fwd_tile(
                acc0, acc1, m_i, l_i, q0, q1, tok_q, start_n, LK, False, k_base, v_base, kpm_base,
                ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale, GRID_T, GRID_H, GRID_W, WIN_T,
                WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0, BLOCK_D1,
                HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, False, OFFS_64, ALIGNED, TMA, k_desc0, k_desc1,
                v_desc0, v_desc1)
    else:
        # whole tiles without bounds masks, then the partial last tile
        n_full = LK - LK % BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc0, acc1, m_i, l_i = _fwd_tile(
                acc0, acc1, m_i, l_i, q0, q1, tok_q, start_n, LK, False, k_base, v_base, kpm_base,
                ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale, GRID_T, GRID_H, GRID_W, WIN_T,
                WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0, BLOCK_D1,
                HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, True, OFFS_64, ALIGNED, TMA, k_desc0, k_desc1,
                v_desc0, v_desc1)
        if n_full < LK:
            acc0, acc1, m_i, l_i = _fwd_tile(
                acc0, acc1, m_i, l_i, q0, q1, tok_q, n_full, LK, False, k_base, v_base, kpm_base,
                ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, qk_scale, GRID_T, GRID_H, GRID_W, WIN_T,
                WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_N, BLOCK_D0, BLOCK_D1,
                HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, False, OFFS_64, ALIGNED, TMA, k_desc0, k_desc1,
                v_desc0, v_desc1)

    out0, out1, lse = _finish_rows(acc0, acc1, m_i, l_i, BLOCK_D1)
    o_base = O_ptr + b * stride_ob + h * stride_oh + g_off64 * stride_os
    _store_chunks(o_base, offs_m, valid_m, TOKEN_STRIDE, stride_os, out0, out1, D, BLOCK_D0, BLOCK_D1, OFFS_64,
                  ALIGNED)
    tl.store(LSE_ptr + (b * HEADS + h) * SQ + tok_q, lse, mask=valid_m)
