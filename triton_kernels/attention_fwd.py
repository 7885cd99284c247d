"""Attention forward kernel (the family and its flags: attention_common.py)."""

import triton
import triton.language as tl

from dit_fast.triton_kernels.attention_common import (_hidden_keys, _key_span, _key_tiles, _keys_kept,
                                                      _load_tile_pair, _mask_scores, _program_coords, _rotate,
                                                      _tile_inside_windows, _tile_order_tokens, _tile_ptrs)


# ---------------------------------------------------------------------------------------------
# Forward. Online softmax (flash attention 2): per query tile, running max m, running sum l and
# unnormalised output acc over key tiles; scores in log2 units (scale * log2(e) folded in).
# https://arxiv.org/abs/2205.14135, https://arxiv.org/abs/2307.08691
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, tok_q, start_n, end_n, window_mask, k_base, v_base, kpm_base, ROPE_ptr,
              stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
              GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr,
              HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, TILED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, EVEN: tl.constexpr,
              OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """One key tile of the forward. EVEN: the tile lies inside the sequence (no bounds masks)."""
    k, v, tok_k, valid_n = _load_tile_pair(start_n, end_n, k_base, v_base, ROPE_ptr, stride_ks, stride_vs, g_off,
                                           TOKEN_STRIDE, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W, ROPE_DT2,
                                           ROPE_DTH2, D, BLOCK_N, BLOCK_D, HAS_ROPE, TILED, EVEN, OFFS_64, ALIGNED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
    key_ok = _keys_kept(kpm_base, tok_k, valid_n, HAS_MASK)
    poison = None
    if HAS_MASK or WINDOW:  # masked keys' values must not reach p v as 0 * NaN (k's reach s, dropped below)
        poison = _hidden_keys(v, v, key_ok, window_mask, HAS_MASK, WINDOW)
        v = tl.where(poison[:, None], tl.zeros_like(v), v)
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
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q_ptr,  # queries, (B, Sq, heads, D), last dim contiguous
    K_ptr,  # keys, (B, Sk, heads, D)
    V_ptr,  # values, (B, Sk, heads, D)
    O_ptr,  # out: (B, Sq, heads, D)
    LSE_ptr,  # out: natural-log logsumexp of the scaled scores, (B, heads, Sq) fp32
    KPM_ptr,  # key padding mask, (B, Sk) uint8, nonzero = attend  [HAS_MASK]
    ROPE_ptr,  # RoPE cos / sin table, (max(T, H, W), 2, D / 2) fp32, from rope_tables  [HAS_ROPE]
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_mb,  # key padding mask batch stride
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
    BLOCK_D: tl.constexpr,
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
    offs_d = tl.arange(0, BLOCK_D)
    valid_m = offs_m < LQ
    tok_q = g_off + offs_m * TOKEN_STRIDE
    if TILED:  # rows gathered through their tokens (full mode: group offset 0, token stride 1)
        tok_q, valid_m = _tile_order_tokens(m_blk * BLOCK_M, BLOCK_M, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W)
        offs_m = tok_q
    q_mask = valid_m[:, None] & (offs_d[None, :] < D)
    g_off64 = g_off.to(tl.int64)
    q_base = Q_ptr + b * stride_qb + h * stride_qh + g_off64 * stride_qs
    q = tl.load(_tile_ptrs(q_base, offs_m, TOKEN_STRIDE, stride_qs, offs_d, OFFS_64, ALIGNED), mask=q_mask, other=0.0)
    if HAS_ROPE:
        q = _rotate(q, tok_q, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D, False).to(
            Q_ptr.dtype.element_ty)
    k_base = K_ptr + b * stride_kb + h * stride_kh + g_off64 * stride_ks
    v_base = V_ptr + b * stride_vb + h * stride_vh + g_off64 * stride_vs
    kpm_base = KPM_ptr + b * stride_mb
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 is the native instruction

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
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
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, tok_q, start_n, hi, window_mask,
                                              k_base, v_base, kpm_base,
                                              ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
                                              GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                                              ROPE_DT2, ROPE_DTH2, BLOCK_N, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                                              DOT_PRECISION, False, OFFS_64, ALIGNED)
    elif TILED:
        # every token of the WIN_T x WIN_H x WIN_W key tiles around the query's tile, no window mask; the
        # WIN_W tiles of a (t, h) tile row are one run of positions, V // BLOCK_N blocks per tile
        V, TILES_H, TILES_W, ka0, kb0, kc0 = _key_tiles(m_blk * BLOCK_M, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H,
                                                        WIN_W, TILE_T, TILE_H, TILE_W)
        for ka in range(ka0, ka0 + WIN_T):
            for kb in range(kb0, kb0 + WIN_H):
                lo = ((ka * TILES_H + kb) * TILES_W + kc0) * V
                for start_n in range(lo, lo + WIN_W * V, BLOCK_N):
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, tok_q, start_n, LK, False, k_base, v_base, kpm_base,
                                              ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
                                              GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                                              ROPE_DT2, ROPE_DTH2, BLOCK_N, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                                              DOT_PRECISION, False, OFFS_64, ALIGNED)
    else:
        # whole tiles without bounds masks, then the partial last tile
        n_full = LK - LK % BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, tok_q, start_n, LK, False, k_base, v_base, kpm_base,
                                      ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
                                      GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                                      ROPE_DT2, ROPE_DTH2, BLOCK_N, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                                      DOT_PRECISION, True, OFFS_64, ALIGNED)
        if n_full < LK:
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, tok_q, n_full, LK, False, k_base, v_base, kpm_base,
                                      ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
                                      GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                                      ROPE_DT2, ROPE_DTH2, BLOCK_N, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                                      DOT_PRECISION, False, OFFS_64, ALIGNED)

    # a fully masked row has l = 0 and acc = 0: it returns zeros, and lse = -inf
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_base = O_ptr + b * stride_ob + h * stride_oh + g_off64 * stride_os
    tl.store(_tile_ptrs(o_base, offs_m, TOKEN_STRIDE, stride_os, offs_d, OFFS_64, ALIGNED),
             out.to(O_ptr.dtype.element_ty),
             mask=q_mask)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE_ptr + (b * HEADS + h) * SQ + tok_q, lse, mask=valid_m)
