"""Triton flash attention over 3D-patchified video tokens: one kernel family, forward and backward.

Layout: q, k, v are (B, S, heads, D) as in flash-attn, read through their strides (last dim contiguous).
Video tokens are in (t, h, w) raster order over a grid (T, H, W): token s sits at t = s // (H * W),
h = (s // W) % H, w = s % W.

Masking modes, all served by the same three kernels:
  full      every query sees every key (self or cross attention, Sq != Sk)
  spatial   attention within each frame; temporal: within each (h, w) column across frames.
            Both are *groups* of tokens read in place: group g, position i is token
            g * GROUP_STRIDE + i * TOKEN_STRIDE, so a frame is (GROUP_STRIDE = H * W, TOKEN_STRIDE = 1) and a
            column is (GROUP_STRIDE = 1, TOKEN_STRIDE = H * W). Groups fold into the program id like a
            batch dimension: no permute, no copy.
  WINDOW    3D local attention (full mode): along each axis a query at p sees the WIN keys starting at
            clamp(p - (WIN - 1) // 2, 0, N - WIN) (a centred window shifted inside the grid at the
            borders, as NATTEN does). Tiles are skipped wholesale: a query tile only visits, frame by
            frame, the contiguous run of key rows that its window union can reach (and the backward's
            key tiles only the query rows that can reach them), so the work scales with the kept
            frames and rows, not with S^2; a tile inside one row (W wider than the tile) also skips
            the columns outside its windows. Inside visited tiles the exact token mask is applied.
            A raster-order tile spanning several rows visits whole rows: together their windows
            cover every column (TILED below avoids that).
  TILED     tile-granular window (full mode; Sliding Tile Attention, https://arxiv.org/abs/2502.04507):
            the grid is cut into 3D tiles of TILE_T x TILE_H x TILE_W = V tokens (partial at the edges)
            and WIN_T, WIN_H, WIN_W count tiles: the query tile at tile coordinate a sees the key tiles
            from clamp(a - (WIN - 1) // 2, 0, tiles - WIN) along each axis (the WINDOW rule on the
            tile grid), every token of them. A program's positions enumerate tokens in 3D-tile order
            (_tile_order_tokens: position p is offset p % V of tile p // V) and its rows are gathered
            through their raster tokens, so q, k, v, out, lse stay in raster layout, in place. Blocks
            divide V (_prune), so a query block lies in one tile and a key tile is V // BLOCK_N whole
            blocks: the forward and dq loop over exactly the kept key tiles, the dk/dv kernel over the
            query tiles whose window holds its key tile, with no window mask (only the holes of
            partial edge tiles are masked). The work is (kept tiles) x V^2 per query tile. The tile
            is a compile-time constant (one compile per tile shape): the token gather then divides
            by constants (sm_90a, D = 128: forward 222 registers instead of 254, no spills at 64 x 64;
            benchmarks/kernel_resources.py --variants tiled).
  HAS_MASK  boolean key padding mask (B, Sk); a query with no visible key returns zeros (lse = -inf).
  HAS_ROPE  3D rotary embedding of q and k inside the kernels (dit_fast/ops/rope.py's convention:
            interleaved pairs, pair j of axis a rotated by pos_a * theta^(-2i / d_a), cos and sin gathered
            from a small per-position table instead of computed per tile). Tiles are rotated
            after loading; the backward rotates dq and dk back with the inverse rotation.

Head dims up to 256 (72 and 96 run with the dot padded to a power of two, BLOCK_D, and masked loads).
The readable PyTorch reference is attention_reference in dit_fast/ops/attention.py.
"""

import os

import torch
import triton
import triton.language as tl

from dit_fast import _backend
from dit_fast.ops.rope import rope_split as _rope_split
from dit_fast.triton_kernels._layout import aligned_16

MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels: token -> (t, h, w), RoPE rotation, masks, window ranges.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grid_position(tok, GRID_H, GRID_W):
    """(t, h, w) of raster-order token indices."""
    return tok // (GRID_H * GRID_W), (tok // GRID_W) % GRID_H, tok % GRID_W


@triton.jit
def _rotate(x, tok, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D: tl.constexpr,
            INVERSE: tl.constexpr):
    """Rotates the interleaved pairs (x[2j], x[2j+1]) of each row of x (R, BLOCK_D) by the 3D RoPE angle
    of its token; fp32 result. Pairs j < ROPE_DT2 use t, j < ROPE_DTH2 use h, the rest w.

    ROPE_ptr is the (max(T, H, W), 2, D / 2) fp32 table of cos and sin of pos * theta^(-2i / d_a) (see
    rope_tables): gathering from it, hot in L1/L2, replaces a sin and a cos per pair and tile."""
    t, h, w = _grid_position(tok, GRID_H, GRID_W)
    t = tl.minimum(t, GRID_T - 1)  # rows past the sequence end (x = 0 there) must not read past the table
    pair = tl.arange(0, BLOCK_D // 2)[None, :]
    pos = tl.where(pair < ROPE_DT2, t[:, None], tl.where(pair < ROPE_DTH2, h[:, None], w[:, None]))
    in_table = pair < D // 2  # padding pairs (D < BLOCK_D): cos 1, sin 0, the identity
    cos = tl.load(ROPE_ptr + pos * D + pair, mask=in_table, other=1.0)  # (R, BLOCK_D / 2)
    sin = tl.load(ROPE_ptr + pos * D + D // 2 + pair, mask=in_table, other=0.0)
    if INVERSE:  # R(angle)^T = R(-angle): the backward maps gradients of rotated q/k back to q/k
        sin = -sin
    even, odd = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (x.shape[0], BLOCK_D))


@triton.jit
def _program_coords(LEN, BLOCK: tl.constexpr, GROUPS, HEADS, GROUP_STRIDE):
    """(tile, b, h, first token of the group) of this program. Programs walk the tiles of one group
    fastest, then groups, heads and the batch; b and h are int64 (their offsets pass 2^31 elements)."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(LEN, BLOCK)
    rest = pid // num_tiles
    h = ((rest // GROUPS) % HEADS).to(tl.int64)
    b = (rest // GROUPS // HEADS).to(tl.int64)
    return pid % num_tiles, b, h, (rest % GROUPS) * GROUP_STRIDE


@triton.jit
def _tile_ptrs(base, pos, TOKEN_STRIDE, stride_s, offs_d, OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers (R, BLOCK_D) to the tokens at positions pos of a group, from the group's base pointer.

    Offsets are int32 (fewer registers: int64 offsets make the tiles spill) unless the launcher saw
    that a group's extent can pass 2^31 elements; batch, head and group offsets live in the base.
    ALIGNED (the launcher checked every pointer and stride is a multiple of 16 bytes) tells Triton so:
    it cannot see it through a head stride such as 72, and without it loads one element at a time."""
    if OFFS_64:
        rows = pos.to(tl.int64) * TOKEN_STRIDE * stride_s
    else:
        rows = pos * (TOKEN_STRIDE * stride_s)
    ptrs = base + rows[:, None] + offs_d[None, :]
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, [16, 16])  # bytes: 16-byte vector loads and stores
    return ptrs


@triton.jit
def _window_start(p, WIN, N):
    """First position of the length-WIN window around p on an axis of N positions."""
    return tl.minimum(tl.maximum(p - (WIN - 1) // 2, 0), N - WIN)


@triton.jit
def _window_allowed(tok_q, tok_k, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W):
    """Token-exact window mask; tok_q and tok_k broadcast against each other."""
    qt, qh, qw = _grid_position(tok_q, GRID_H, GRID_W)
    kt, kh, kw = _grid_position(tok_k, GRID_H, GRID_W)
    st = _window_start(qt, WIN_T, GRID_T)
    sh = _window_start(qh, WIN_H, GRID_H)
    sw = _window_start(qw, WIN_W, GRID_W)
    return ((kt >= st) & (kt < st + WIN_T) & (kh >= sh) & (kh < sh + WIN_H) & (kw >= sw) & (kw < sw + WIN_W))


@triton.jit
def _load_rows(base, offs, valid, TOKEN_STRIDE, stride_s, offs_d, D: tl.constexpr, EVEN: tl.constexpr,
               OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """The (len(offs), BLOCK_D) tile of the tokens at positions offs of a group; zero where not valid
    and past D. EVEN: every row is inside the sequence (no row mask)."""
    if EVEN:
        mask = offs_d[None, :] < D
    else:
        mask = valid[:, None] & (offs_d[None, :] < D)
    return tl.load(_tile_ptrs(base, offs, TOKEN_STRIDE, stride_s, offs_d, OFFS_64, ALIGNED), mask=mask, other=0.0)


@triton.jit
def _tile_grid(GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W):
    """Tokens per 3D tile and tiles per axis (edge tiles partial when an axis is not a multiple)."""
    return (TILE_T * TILE_H * TILE_W, tl.cdiv(GRID_T, TILE_T), tl.cdiv(GRID_H, TILE_H),
            tl.cdiv(GRID_W, TILE_W))


@triton.jit
def _tile_order_tokens(start, BLOCK: tl.constexpr, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W):
    """Raster tokens of the positions start..start + BLOCK - 1 in 3D-tile order (TILED), and which lie
    inside the grid. Position p is offset p % V of tile p // V (V tokens per tile; tiles over the tile
    grid and offsets inside a tile both in (t, h, w) raster order). A block never crosses a tile
    (BLOCK divides V), so the tile coordinates are scalars. Partial edge tiles leave holes: positions
    outside the grid, masked on load, score and store."""
    V, TILES_T, TILES_H, TILES_W = _tile_grid(GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W)
    a, b, c = _grid_position(start // V, TILES_H, TILES_W)
    dt, dh, dw = _grid_position(start % V + tl.arange(0, BLOCK), TILE_H, TILE_W)
    t, h, w = a * TILE_T + dt, b * TILE_H + dh, c * TILE_W + dw
    return (t * GRID_H + h) * GRID_W + w, (t < GRID_T) & (h < GRID_H) & (w < GRID_W)


@triton.jit
def _key_tiles(q_start, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W):
    """TILED: tokens per tile, tiles along h and w, and the first key tile (t, h, w) of the window of
    the query tile holding position q_start; the window is WIN_T x WIN_H x WIN_W tiles from there."""
    V, TILES_T, TILES_H, TILES_W = _tile_grid(GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W)
    qa, qb, qc = _grid_position(q_start // V, TILES_H, TILES_W)
    return (V, TILES_H, TILES_W, _window_start(qa, WIN_T, TILES_T), _window_start(qb, WIN_H, TILES_H),
            _window_start(qc, WIN_W, TILES_W))


@triton.jit
def _load_tile_pair(start, end, rot_base, other_base, ROPE_ptr, stride_rot, stride_other, g_off, TOKEN_STRIDE,
                    GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2, D: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr, TILED: tl.constexpr,
                    EVEN: tl.constexpr, OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """Two operands' rows for the tile [start, start + BLOCK) of a group, the first rotated with RoPE
    (k and v, or q and dO), their tokens, and which are inside the sequence. Serves the tiles a
    kernel streams and the one it owns (dk/dv: k, v; dq: q, dO). TILED: start is a position in
    3D-tile order and the rows are gathered through their tokens (full mode: group offset 0, token
    stride 1)."""
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs < end
    tok = g_off + offs * TOKEN_STRIDE
    if TILED:
        tok, valid = _tile_order_tokens(start, BLOCK, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W)
        offs = tok
    rot = _load_rows(rot_base, offs, valid, TOKEN_STRIDE, stride_rot, offs_d, D, EVEN, OFFS_64, ALIGNED)
    other = _load_rows(other_base, offs, valid, TOKEN_STRIDE, stride_other, offs_d, D, EVEN, OFFS_64, ALIGNED)
    if HAS_ROPE:
        rot = _rotate(rot, tok, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D, False)
        rot = rot.to(other.dtype)
    return rot, other, tok, valid


@triton.jit
def _keys_kept(kpm_base, tok_k, valid_n, HAS_MASK: tl.constexpr):
    """Which keys the key padding mask lets through (HAS_MASK; else the valid ones). Called after the
    score product: loaded beside k and v it changes the compiled kernels' registers (see
    benchmarks/kernel_resources.py), for no measured gain."""
    key_ok = valid_n
    if HAS_MASK:
        key_ok = tl.load(kpm_base + tok_k, mask=valid_n, other=0) != 0
    return key_ok


@triton.jit
def _mask_scores(x, fill, tok_q, tok_k, valid, key_ok, window_mask, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W,
                 HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, EVEN: tl.constexpr):
    """x (scores, or probabilities) with ``fill`` where a query may not see a key. The other tensors
    come broadcast to x's orientation: (queries, keys), or (keys, queries) in the dk/dv kernel.
    valid: the streamed tile's tokens inside the sequence (only the streamed side needs it: rows of the
    owned side past the end are never stored); key_ok: the key padding mask (HAS_MASK);
    window_mask (runtime, WINDOW only): False for a full tile inside every query's window
    (_tile_inside_windows), which then costs what a dense tile does."""
    if ((not EVEN) and (not WINDOW)) or HAS_MASK:
        allowed = valid
        if HAS_MASK:
            allowed = allowed & key_ok
        x = tl.where(allowed, x, fill)
    if WINDOW:
        if window_mask:
            x = tl.where(valid & _window_allowed(tok_q, tok_k, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W), x, fill)
    return x


@triton.jit
def _tile_inside_windows(q_first, q_last, k_first, k_last, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W):
    """True when every key k_first..k_last lies in the window of every query q_first..q_last: the tile
    pair needs no window mask. Window starts never decrease with the position, so along an axis the
    windows of positions a..b share [start(b), start(a) + WIN); a range that crosses a row (frame)
    boundary is taken to cover every column (row) of the axis below it."""
    qt0, qh0, qw0 = _grid_position(q_first, GRID_H, GRID_W)
    qt1, qh1, qw1 = _grid_position(q_last, GRID_H, GRID_W)
    kt0, kh0, kw0 = _grid_position(k_first, GRID_H, GRID_W)
    kt1, kh1, kw1 = _grid_position(k_last, GRID_H, GRID_W)
    q_frame, k_frame = qt0 == qt1, kt0 == kt1
    q_row, k_row = q_frame & (qh0 == qh1), k_frame & (kh0 == kh1)
    qh0, qh1 = tl.where(q_frame, qh0, 0), tl.where(q_frame, qh1, GRID_H - 1)
    kh0, kh1 = tl.where(k_frame, kh0, 0), tl.where(k_frame, kh1, GRID_H - 1)
    qw0, qw1 = tl.where(q_row, qw0, 0), tl.where(q_row, qw1, GRID_W - 1)
    kw0, kw1 = tl.where(k_row, kw0, 0), tl.where(k_row, kw1, GRID_W - 1)
    inside_t = (kt0 >= _window_start(qt1, WIN_T, GRID_T)) & (kt1 < _window_start(qt0, WIN_T, GRID_T) + WIN_T)
    inside_h = (kh0 >= _window_start(qh1, WIN_H, GRID_H)) & (kh1 < _window_start(qh0, WIN_H, GRID_H) + WIN_H)
    inside_w = (kw0 >= _window_start(qw1, WIN_W, GRID_W)) & (kw1 < _window_start(qw0, WIN_W, GRID_W) + WIN_W)
    return inside_t & inside_h & inside_w


@triton.jit
def _runs(t0, h0, t1, h1, f_lo, f_hi, r_lo, r_hi, c_lo, c_hi, GRID_W):
    """The tokens to visit as runs: for each frame f_lo..f_hi, `runs` contiguous token ranges; run j of
    frame f is [(f * H + r_lo + j) * W + c_lo, (f * H + r_lo + j) * W + c_hi]. A tile inside one row
    visits columns c_lo..c_hi of each row; any other tile visits rows r_lo..r_hi whole, as one run."""
    one_row = (t0 == t1) & (h0 == h1)
    runs = tl.where(one_row, r_hi - r_lo + 1, 1)
    c_lo = tl.where(one_row, c_lo, 0)
    c_hi = tl.where(one_row, c_hi, (r_hi - r_lo + 1) * GRID_W - 1)
    return f_lo, f_hi, r_lo, runs, c_lo, c_hi


@triton.jit
def _key_span(first, last, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W):
    """The keys that queries first..last can see, as runs (see _runs)."""
    t0, h0, w0 = _grid_position(first, GRID_H, GRID_W)
    t1, h1, w1 = _grid_position(last, GRID_H, GRID_W)
    one_frame = t0 == t1
    hq0 = tl.where(one_frame, h0, 0)
    hq1 = tl.where(one_frame, h1, GRID_H - 1)
    # window starts grow with the position, so the union of windows is [start(first), start(last) + WIN)
    f_lo = _window_start(t0, WIN_T, GRID_T)
    f_hi = _window_start(t1, WIN_T, GRID_T) + WIN_T - 1
    r_lo = _window_start(hq0, WIN_H, GRID_H)
    r_hi = _window_start(hq1, WIN_H, GRID_H) + WIN_H - 1
    c_lo = _window_start(w0, WIN_W, GRID_W)
    c_hi = _window_start(w1, WIN_W, GRID_W) + WIN_W - 1
    return _runs(t0, h0, t1, h1, f_lo, f_hi, r_lo, r_hi, c_lo, c_hi, GRID_W)


@triton.jit
def _first_query(k, WIN, N):
    """Smallest query position whose window contains key position k."""
    return tl.where(k - WIN + 1 <= 0, 0, k - WIN + 1 + (WIN - 1) // 2)


@triton.jit
def _last_query(k, WIN, N):
    """Largest query position whose window contains key position k."""
    return tl.where(k >= N - WIN, N - 1, k + (WIN - 1) // 2)


@triton.jit
def _query_span(first, last, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W):
    """The queries that can see keys first..last, as runs (see _runs)."""
    t0, h0, w0 = _grid_position(first, GRID_H, GRID_W)
    t1, h1, w1 = _grid_position(last, GRID_H, GRID_W)
    one_frame = t0 == t1
    hk0 = tl.where(one_frame, h0, 0)
    hk1 = tl.where(one_frame, h1, GRID_H - 1)
    return _runs(t0, h0, t1, h1, _first_query(t0, WIN_T, GRID_T), _last_query(t1, WIN_T, GRID_T),
                 _first_query(hk0, WIN_H, GRID_H), _last_query(hk1, WIN_H, GRID_H),
                 _first_query(w0, WIN_W, GRID_W), _last_query(w1, WIN_W, GRID_W), GRID_W)


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
    s = _mask_scores(s, float("-inf"), tok_q[:, None], tok_k[None, :], valid_n[None, :], key_ok[None, :], window_mask,
                     GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, HAS_MASK, WINDOW, EVEN)
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


# ---------------------------------------------------------------------------------------------
# Backward (flash attention 2). With s = scale * q.k, p = exp(s - lse), o = p v and dO given:
#   dv = p^T dO                    dp = dO v^T
#   ds = p * (dp - delta),  delta = rowsum(dO * o)  (precomputed once per query)
#   dq = scale * ds k              dk = scale * ds^T q
# Two kernels, no atomics: one per key tile accumulating dk, dv over the query tiles that can see
# it (scores computed transposed, (keys, queries)), one per query tile accumulating dq over its key
# tiles. With RoPE, q and k are the rotated ones and dq, dk are rotated back at the end:
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
def _dkdv_tile(dk, dv, k, v, tok_k, kpm_k, start_m, end_m, window_mask, q_base, do_base, lse_base, delta_base,
               ROPE_ptr, stride_qs, stride_dos, g_off, TOKEN_STRIDE, D, qk_scale,
               GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr,
               HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, TILED: tl.constexpr,
               DOT_PRECISION: tl.constexpr, EVEN: tl.constexpr,
              OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """One query tile of the dk/dv backward. EVEN: the tile lies inside the sequence."""
    q, do, tok_q, valid_m = _load_tile_pair(start_m, end_m, q_base, do_base, ROPE_ptr, stride_qs, stride_dos,
                                            g_off, TOKEN_STRIDE, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W,
                                            ROPE_DT2, ROPE_DTH2, D, BLOCK_M, BLOCK_D, HAS_ROPE, TILED, EVEN, OFFS_64,
                                            ALIGNED)
    lse = tl.load(lse_base + tok_q, mask=valid_m, other=0.0) * 1.4426950408889634
    # rows without any visible key (lse = -inf) get p = 0, not exp2(-inf + inf) = NaN
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_base + tok_q, mask=valid_m, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M), unscaled
    p_t = tl.math.exp2(tl.fma(s_t, qk_scale, -lse[None, :]))  # one FMA per score, whatever Triton's fusion default
    p_t = _mask_scores(p_t, 0.0, tok_q[None, :], tok_k[:, None], valid_m[None, :], kpm_k[:, None], window_mask,
                       GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, HAS_MASK, WINDOW, EVEN)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr,  # (B, S, heads, D) inputs of the forward
    DO_ptr,  # grad of the output, (B, Sq, heads, D)
    LSE_ptr,  # (B, heads, Sq) fp32, from the forward
    DELTA_ptr,  # rowsum(dO * O), (B, heads, Sq) fp32
    DK_ptr, DV_ptr,  # out: (B, Sk, heads, D), contiguous
    KPM_ptr, ROPE_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_mb,
    HEADS, GROUPS, SQ, LQ, LK, GROUP_STRIDE, TOKEN_STRIDE,
    GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, ROPE_DT2, ROPE_DTH2,
    D: tl.constexpr, sm_scale, LQ_BUCKET, LK_BUCKET,
    BLOCK_M: tl.constexpr,  # query tile (inner loop)
    BLOCK_N: tl.constexpr,  # key tile (owned by the program)
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
    n_blk, b, h, g_off = _program_coords(LK, BLOCK_N, GROUPS, HEADS, GROUP_STRIDE)

    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid_k = offs_n < LK
    tok_k = g_off + offs_n * TOKEN_STRIDE
    if TILED:  # rows gathered through their tokens (full mode: group offset 0, token stride 1)
        tok_k, valid_k = _tile_order_tokens(n_blk * BLOCK_N, BLOCK_N, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W)
        offs_n = tok_k
    kv_mask = valid_k[:, None] & (offs_d[None, :] < D)
    g_off64 = g_off.to(tl.int64)
    k_base = K_ptr + b * stride_kb + h * stride_kh + g_off64 * stride_ks
    v_base = V_ptr + b * stride_vb + h * stride_vh + g_off64 * stride_vs
    k, v, _, _ = _load_tile_pair(n_blk * BLOCK_N, LK, k_base, v_base, ROPE_ptr, stride_ks, stride_vs, g_off,
                                 TOKEN_STRIDE, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2,
                                 D, BLOCK_N, BLOCK_D, HAS_ROPE, TILED, False, OFFS_64, ALIGNED)
    kpm_k = valid_k
    if HAS_MASK:
        kpm_k = tl.load(KPM_ptr + b * stride_mb + tok_k, mask=valid_k, other=0) != 0
    q_base = Q_ptr + b * stride_qb + h * stride_qh + g_off64 * stride_qs
    do_base = DO_ptr + b * stride_dob + h * stride_doh + g_off64 * stride_dos
    lse_base = LSE_ptr + (b * HEADS + h) * SQ
    delta_base = DELTA_ptr + (b * HEADS + h) * SQ
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
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
                    dk, dv = _dkdv_tile(dk, dv, k, v, tok_k, kpm_k, start_m, hi, window_mask, q_base, do_base, lse_base,
                                        delta_base, ROPE_ptr, stride_qs, stride_dos, g_off, TOKEN_STRIDE, D, qk_scale,
                                        GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                                        ROPE_DT2, ROPE_DTH2, BLOCK_M, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                                        DOT_PRECISION, False, OFFS_64, ALIGNED)
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
                    dk, dv = _dkdv_tile(dk, dv, k, v, tok_k, kpm_k, start_m, LQ, False, q_base, do_base, lse_base,
                                        delta_base, ROPE_ptr, stride_qs, stride_dos, g_off, TOKEN_STRIDE, D, qk_scale,
                                        GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2,
                                        ROPE_DTH2, BLOCK_M, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION,
                                        False, OFFS_64, ALIGNED)
    else:
        m_full = LQ - LQ % BLOCK_M
        for start_m in range(0, m_full, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, tok_k, kpm_k, start_m, LQ, False, q_base, do_base, lse_base,
                                delta_base, ROPE_ptr, stride_qs, stride_dos, g_off, TOKEN_STRIDE, D, qk_scale,
                                GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                                ROPE_DT2, ROPE_DTH2, BLOCK_M, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION,
                                True, OFFS_64, ALIGNED)
        if m_full < LQ:
            dk, dv = _dkdv_tile(dk, dv, k, v, tok_k, kpm_k, m_full, LQ, False, q_base, do_base, lse_base,
                                delta_base, ROPE_ptr, stride_qs, stride_dos, g_off, TOKEN_STRIDE, D, qk_scale,
                                GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                                ROPE_DT2, ROPE_DTH2, BLOCK_M, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION,
                                False, OFFS_64, ALIGNED)

    dk = dk * sm_scale
    if HAS_ROPE:
        dk = _rotate(dk, tok_k, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D, True)
    out_base = b * stride_dkb + h * stride_dkh + g_off64 * stride_dks  # dk and dv share the layout
    tl.store(_tile_ptrs(DK_ptr + out_base, offs_n, TOKEN_STRIDE, stride_dks, offs_d, OFFS_64, ALIGNED),
             dk.to(DK_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(_tile_ptrs(DV_ptr + out_base, offs_n, TOKEN_STRIDE, stride_dks, offs_d, OFFS_64, ALIGNED),
             dv.to(DV_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, tok_q, start_n, end_n, window_mask, k_base, v_base, kpm_base, ROPE_ptr,
             stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
             GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr,
             HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, TILED: tl.constexpr,
             DOT_PRECISION: tl.constexpr, EVEN: tl.constexpr,
              OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """One key tile of the dq backward. EVEN: the tile lies inside the sequence."""
    k, v, tok_k, valid_n = _load_tile_pair(start_n, end_n, k_base, v_base, ROPE_ptr, stride_ks, stride_vs, g_off,
                                           TOKEN_STRIDE, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W, ROPE_DT2,
                                           ROPE_DTH2, D, BLOCK_N, BLOCK_D, HAS_ROPE, TILED, EVEN, OFFS_64, ALIGNED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # unscaled
    key_ok = _keys_kept(kpm_base, tok_k, valid_n, HAS_MASK)
    p = tl.math.exp2(tl.fma(s, qk_scale, -lse[:, None]))  # one FMA per score, whatever Triton's fusion default
    p = _mask_scores(p, 0.0, tok_q[:, None], tok_k[None, :], valid_n[None, :], key_ok[None, :], window_mask,
                     GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, HAS_MASK, WINDOW, EVEN)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


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
    stride_mb,
    HEADS, GROUPS, SQ, LQ, LK, GROUP_STRIDE, TOKEN_STRIDE,
    GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, ROPE_DT2, ROPE_DTH2,
    D: tl.constexpr, sm_scale, LQ_BUCKET, LK_BUCKET,
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
    do_base = DO_ptr + b * stride_dob + h * stride_doh + g_off64 * stride_dos
    q, do, _, _ = _load_tile_pair(m_blk * BLOCK_M, LQ, q_base, do_base, ROPE_ptr, stride_qs, stride_dos, g_off,
                                  TOKEN_STRIDE, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W, ROPE_DT2,
                                  ROPE_DTH2, D, BLOCK_M, BLOCK_D, HAS_ROPE, TILED, False, OFFS_64, ALIGNED)
    lse = tl.load(LSE_ptr + (b * HEADS + h) * SQ + tok_q, mask=valid_m, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA_ptr + (b * HEADS + h) * SQ + tok_q, mask=valid_m, other=0.0)
    k_base = K_ptr + b * stride_kb + h * stride_kh + g_off64 * stride_ks
    v_base = V_ptr + b * stride_vb + h * stride_vh + g_off64 * stride_vs
    kpm_base = KPM_ptr + b * stride_mb
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
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
                    dq = _dq_tile(dq, q, do, lse, delta, tok_q, start_n, hi, window_mask, k_base, v_base, kpm_base,
                                  ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
                                  GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W,
                                  ROPE_DT2, ROPE_DTH2, BLOCK_N, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED,
                                  DOT_PRECISION, False, OFFS_64, ALIGNED)
    elif TILED:  # the forward's key tiles (see _attn_fwd_kernel)
        V, TILES_H, TILES_W, ka0, kb0, kc0 = _key_tiles(m_blk * BLOCK_M, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H,
                                                        WIN_W, TILE_T, TILE_H, TILE_W)
        for ka in range(ka0, ka0 + WIN_T):
            for kb in range(kb0, kb0 + WIN_H):
                lo = ((ka * TILES_H + kb) * TILES_W + kc0) * V
                for start_n in range(lo, lo + WIN_W * V, BLOCK_N):
                    dq = _dq_tile(dq, q, do, lse, delta, tok_q, start_n, LK, False, k_base, v_base, kpm_base,
                                  ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
                                  GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2,
                                  ROPE_DTH2, BLOCK_N, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION,
                                  False, OFFS_64, ALIGNED)
    else:
        n_full = LK - LK % BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, tok_q, start_n, LK, False, k_base, v_base, kpm_base,
                          ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
                          GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2,
                          BLOCK_N, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, True, OFFS_64, ALIGNED)
        if n_full < LK:
            dq = _dq_tile(dq, q, do, lse, delta, tok_q, n_full, LK, False, k_base, v_base, kpm_base,
                          ROPE_ptr, stride_ks, stride_vs, g_off, TOKEN_STRIDE, D, qk_scale,
                          GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W, TILE_T, TILE_H, TILE_W, ROPE_DT2, ROPE_DTH2,
                          BLOCK_N, BLOCK_D, HAS_ROPE, HAS_MASK, WINDOW, TILED, DOT_PRECISION, False, OFFS_64, ALIGNED)

    dq = dq * sm_scale
    if HAS_ROPE:
        dq = _rotate(dq, tok_q, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D, True)
    dq_base = DQ_ptr + b * stride_dqb + h * stride_dqh + g_off64 * stride_dqs
    tl.store(_tile_ptrs(dq_base, offs_m, TOKEN_STRIDE, stride_dqs, offs_d, OFFS_64, ALIGNED),
             dq.to(DQ_ptr.dtype.element_ty),
             mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Autotuning. The spaces are visible lists filtered by keep(); the tuning key is the head-dim block,
# the sequence-length buckets and the masking flags (the dtypes are added by Triton). The
# interpreter (CPU tests) runs one tiny configuration.
# ---------------------------------------------------------------------------------------------

# TILED adds the tile's shape: a configuration's blocks must divide its volume (see _prune)
TUNING_KEY = ["LQ_BUCKET", "LK_BUCKET", "BLOCK_D", "HAS_ROPE", "HAS_MASK", "WINDOW", "TILED", "TILE_T", "TILE_H",
              "TILE_W", "DOT_PRECISION"]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is the query tile, BLOCK_N the key tile, in
# all three kernels (the dk/dv kernel owns a key tile and streams query tiles). Kept short: every
# configuration is compiled and timed once per tuning key, and the rope / window variants take tens of
# seconds each to compile.
SPACE = [
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2),
    (128, 32, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (32, 128, 4, 2), (32, 128, 8, 2),
    (32, 32, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2),  # short groups (temporal: T frames)
]


def keep(config: triton.Config) -> bool:
    """Configurations worth timing at all: a 128 x 128 score tile needs 8 warps; tiny tiles 4."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if bm * bn >= 128 * 128 and config.num_warps < 8:
        return False
    if bm * bn <= 32 * 32 and config.num_warps > 4:
        return False
    return True


# DIT_FAST_ATTENTION_TUNE (read at import): "quick" times only QUICK_SPACE (two or three configurations
# per sequence-length class), "single" runs one untimed configuration per class (the GPU tests).
# (32, 128, 8, 2) is for the dk/dv kernel: the only one here whose dk, dv accumulators fit in registers at
# D = 128 (sm_90a report, benchmarks/kernel_resources.py: 234 registers, no spills; 128 x 64 spills).
# (128, 128, 8, 2) is for the forward: spill-free at D = 128 (255 registers, 160 KB of shared memory), and
# its wider key tile halves the accumulator rescale per score (the dk/dv and dq kernels spill there).
QUICK_SPACE = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (32, 128, 8, 2), (32, 32, 4, 2), (16, 16, 4, 2)]
SINGLE_SPACE = [(64, 64, 4, 2), (16, 16, 4, 2)]


def _configs():
    if _backend.triton_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    tune = os.environ.get("DIT_FAST_ATTENTION_TUNE", "").strip().lower()
    chosen = {"quick": QUICK_SPACE, "single": SINGLE_SPACE}.get(tune, SPACE)
    space = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in chosen]
    return [c for c in space if keep(c)]


def _prune(configs, named_args, **kwargs):
    """Short groups (temporal attention over T frames) use short tiles; long sequences large ones.
    TILED: only blocks that divide the 3D tile's volume V (a query block inside one tile, a key tile a
    whole number of key blocks); every space holds 16 x 16 and the launcher checks V % 16 == 0."""
    lq, lk = named_args["LQ_BUCKET"], named_args["LK_BUCKET"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    args = {**named_args, **kwargs}
    if args.get("TILED", False):
        volume = args["TILE_T"] * args["TILE_H"] * args["TILE_W"]
        configs = [c for c in configs if volume % c.kwargs["BLOCK_M"] == 0 and volume % c.kwargs["BLOCK_N"] == 0]

    def fits(block, length):
        return block <= max(16, length) and (length < 64 or block >= 32)

    # fp32 tiles (the reference dtype) take twice the registers and shared memory: at most 64 x 64
    wide = block_d > 128 or named_args["Q_ptr"].dtype == torch.float32
    kept = [c for c in configs if fits(c.kwargs["BLOCK_M"], lq) and fits(c.kwargs["BLOCK_N"], lk)
            and not (wide and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    return kept or configs[:1]


_PRUNE = {"early_config_prune": _prune}
_attn_fwd = triton.autotune(_configs(), key=TUNING_KEY, prune_configs_by=_PRUNE)(_attn_fwd_kernel)
_attn_bwd_dkdv = triton.autotune(_configs(), key=TUNING_KEY, prune_configs_by=_PRUNE)(_attn_bwd_dkdv_kernel)
_attn_bwd_dq = triton.autotune(_configs(), key=TUNING_KEY, prune_configs_by=_PRUNE)(_attn_bwd_dq_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers. Arguments are validated by dit_fast.ops.attention; grid, window, window_tile and rope_split
# are lists ([] when absent), as the custom ops pass them. They return plain tensors; autograd lives in
# dit_fast/ops/attention.py.
# ---------------------------------------------------------------------------------------------


def group_layout(mode: str, grid, seq_len: int):
    """(groups, tokens per group, group stride, token stride) for a masking mode."""
    if mode == "spatial":
        T, H, W = grid
        return T, H * W, H * W, 1
    if mode == "temporal":
        T, H, W = grid
        return H * W, T, 1, H * W
    return 1, seq_len, 0, 1


_rope_table_cache = {}


def rope_tables(max_pos: int, head_dim: int, theta: float, split, device) -> torch.Tensor:
    """(max_pos, 2, D / 2) fp32: cos and sin of pos * theta^(-2i / d_a) for every pair of the head dim.

    Row pos serves every axis: pair j's angle uses the token's t, h or w by j's part of the split.
    Computed exactly as dit_fast.ops.rope.rope_3d_angles (fp64 product, rounded to fp32, then cos and
    sin in fp32), so the kernels rotate with the reference's values. Cached per device and shape.
    """
    key = (max_pos, head_dim, float(theta), tuple(split), str(device))
    table = _rope_table_cache.get(key)
    if table is None:
        pos = torch.arange(max_pos, dtype=torch.float64)
        inv_freq = torch.cat([theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                              for d in _rope_split(head_dim, split)])  # (D / 2,)
        angles = (pos[:, None] * inv_freq[None, :]).to(torch.float32)  # (max_pos, D / 2)
        table = torch.stack([angles.cos(), angles.sin()], dim=1).to(device).contiguous()
        _rope_table_cache[key] = table
    return table


FORCE_INT64_OFFSETS = False  # tests set it to run the int64-offset variant at small sizes


def _group_extent(tensors, lq, lk, token_stride) -> int:
    """Largest element offset inside one group (plus a tile of slack) over the (B, S, heads, D) tensors
    read or written: int32 offsets hold below 2^31. Outputs are contiguous: token stride heads * D."""
    q = tensors[0]
    stride_s = max([t.stride(1) for t in tensors] + [q.shape[2] * q.shape[3]])
    return (max(lq, lk) + 128) * token_stride * stride_s + q.shape[3]


def _lastdim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def tile_order_length(grid, window_tile) -> int:
    """Positions of the 3D-tile order (TILED): tiles x tokens per tile, the holes of partial edge tiles
    included."""
    tiles = [triton.cdiv(n, t) for n, t in zip(grid, window_tile)]
    return tiles[0] * tiles[1] * tiles[2] * window_tile[0] * window_tile[1] * window_tile[2]


def _common_args(q, k, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split, tensors):
    B, Sq, heads, D = q.shape
    Sk = k.shape[1]
    groups, lq, group_stride, token_stride = group_layout(mode, grid, Sq)
    lk = Sk if mode == "full" else lq
    block_d = max(16, triton.next_power_of_2(D))
    has_rope = len(rope_split) == 3
    T, H, W = grid if len(grid) == 3 else (1, 1, 1)
    wt, wh, ww = window if len(window) == 3 else (1, 1, 1)
    tiled = len(window_tile) == 3
    tt, th, tw = window_tile if tiled else (1, 1, 1)
    if tiled:  # positions enumerate 3D tiles; the window is counted in tiles
        if (tt * th * tw) % 16:
            raise ValueError(f"window_tile {tuple(window_tile)} has {tt * th * tw} tokens: the kernels need a "
                             "multiple of 16")
        lq = lk = tile_order_length(grid, window_tile)
        wt, wh, ww = wt // tt, wh // th, ww // tw
    if has_rope:
        rope_table = rope_tables(max(T, H, W), D, rope_theta, rope_split, q.device)
        dt2, dth2 = rope_split[0] // 2, (rope_split[0] + rope_split[1]) // 2
    else:
        rope_table, dt2, dth2 = q.new_empty(0, dtype=torch.float32), 0, 0
    if key_padding_mask is not None:
        kpm = _lastdim_contiguous(key_padding_mask).view(torch.uint8)  # bool -> bytes, no copy
        stride_mb = kpm.stride(0)
    else:
        kpm, stride_mb = q.new_empty(0, dtype=torch.uint8), 0
    scalars = (heads, groups, Sq, lq, lk, group_stride, token_stride, T, H, W, wt, wh, ww, dt2, dth2, D)
    flags = dict(BLOCK_D=block_d, HAS_ROPE=has_rope, HAS_MASK=key_padding_mask is not None,
                 WINDOW=len(window) == 3 and not tiled, TILED=tiled, TILE_T=tt, TILE_H=th, TILE_W=tw,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                 OFFS_64=FORCE_INT64_OFFSETS or _group_extent(tensors, lq, lk, token_stride) >= 2**31,
                 ALIGNED=aligned_16(tensors, D))
    return kpm, rope_table, stride_mb, scalars, (B * heads * groups, lq, lk), flags


def attention_forward(q, k, v, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split, scale):
    """Returns (out (B, Sq, heads, D) contiguous, lse (B, heads, Sq) fp32, natural log)."""
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    B, Sq, heads, D = q.shape
    out = torch.empty((B, Sq, heads, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, heads, Sq), device=q.device, dtype=torch.float32)
    kpm, rope_table, stride_mb, scalars, (programs, lq, lk), flags = _common_args(
        q, k, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split, (q, k, v))
    _attn_fwd[lambda meta: (programs * triton.cdiv(lq, meta["BLOCK_M"]),)](
        q, k, v, out, lse, kpm, rope_table,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_mb, *scalars, float(scale), _bucket(lq), _bucket(lk), **flags)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, key_padding_mask, grid, mode, window, window_tile, rope_theta,
                       rope_split, scale):
    """Returns (dq, dk, dv), contiguous (B, S, heads, D) in the input dtype."""
    q, k, v, dout = (_lastdim_contiguous(t) for t in (q, k, v, dout))
    B, Sq, heads, D = q.shape
    # preprocess: delta = rowsum(dO * O) per query, (B, heads, Sq) fp32, one read of O and dO
    delta = torch.empty((B, heads, Sq), device=q.device, dtype=torch.float32)
    block_m = 16 if _backend.triton_interpreting() else 64
    _attn_bwd_preprocess_kernel[(B * heads * triton.cdiv(Sq, block_m),)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), heads, Sq, D, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=4)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    kpm, rope_table, stride_mb, scalars, (programs, lq, lk), flags = _common_args(
        q, k, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split, (q, k, v, dout))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    tail = (stride_mb, *scalars, float(scale), _bucket(lq), _bucket(lk))
    _attn_bwd_dkdv[lambda meta: (programs * triton.cdiv(lk, meta["BLOCK_N"]),)](
        q, k, v, dout, lse, delta, dk, dv, kpm, rope_table, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), *tail, **flags)
    _attn_bwd_dq[lambda meta: (programs * triton.cdiv(lq, meta["BLOCK_M"]),)](
        q, k, v, dout, lse, delta, dq, kpm, rope_table, *strides,
        dq.stride(0), dq.stride(1), dq.stride(2), *tail, **flags)
    return dq, dk, dv
