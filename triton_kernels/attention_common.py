"""Triton flash attention over 3D-patchified video tokens: the tile helpers every kernel shares.

One kernel family, split by role: this file (token positions, RoPE, tile loads, masks, window ranges),
attention_fwd.py (forward), attention_bwd.py (backward), attention.py (autotuning and launchers).

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
  HAS_MASK  boolean key padding mask, (B, Sk) or per head (B, heads, Sk): one pointer with a head stride
            (0 for (B, Sk)), so both are the same compiled kernel; a query with no visible key returns
            zeros (lse = -inf).
  HAS_ROPE  3D rotary embedding of q and k inside the kernels (dit_fast/ops/rope.py's convention:
            interleaved pairs, pair j of axis a rotated by pos_a * theta^(-2i / d_a), cos and sin gathered
            from a small per-position table instead of computed per tile). Tiles are rotated
            after loading; the backward rotates dq and dk back with the inverse rotation.

HEAD DIM  any integer 1..256, a compile-time constant D, computed as a sum of two power-of-two chunks
            instead of one padded to a power of two: columns [0, BLOCK_D0) and [BLOCK_D0, BLOCK_D0 +
            BLOCK_D1), the columns past D masked on load and store (72 = 64 + 16 with the last 8 masked,
            80 = 64 + 16, 96 = 64 + 32, 40 = 32 + 16; 64 and 128 are one chunk, BLOCK_D1 = 0; 1..16 one
            16-column chunk, the matrix units' K step). Every product over the head dim is one tl.dot
            per chunk into one accumulator (_dot_head), and every product into it is one per chunk
            (_mma_chunks): at D = 72 the matrix units do 80/128 of the D = 128 work instead of all of it
            (head_chunks in attention.py picks the chunks). Rows of D elements are 16-byte aligned only
            when D * itemsize is a multiple of 16 (D = 8 in bf16, not 10 or 12): the launcher then gives
            the ALIGNED hint (16-byte vectors) and may take TMA; otherwise the loads are as wide as
            Triton can prove from D and the strides (D = 10 bf16: 4 bytes; D = 12: 8 bytes), the inputs
            never copied into padded tensors. RoPE in the kernels rotates pairs: D even.
MASKED    a masked key influences nothing, whatever its values: a score is masked by a select (a NaN
            score is dropped), and where a product still meets a masked key's row (p v, dO v^T, ds k)
            that row is zeroed first (_hidden_keys). A query that meets a non-finite key or value it may
            see returns a NaN row and a NaN lse (_finish_rows, after the key loop, whichever tile brought
            it: window edge tiles mark it through _mask_scores' poison, other tiles through the NaN or
            inf that reaches its accumulator), and its row passes no gradient back (_backward_rows:
            lse = +inf, delta = 0), so no 0 * NaN reaches the keys hidden from it. One exception, IEEE's:
            an infinite key element can make q.k = -inf, a probability of exactly 0, and then nothing
            non-finite reaches that query (SDPA gives the same; checking every key row of every tile
            for it would cost the loop a compare per element: the reference, which checks, returns NaN).
            The references: attention_reference (NaN rows) and attention_backward_reference (the same
            blocked rows). A limit of finite inputs: a row whose largest score reaches ~2^31 in log2 units
            (|q.k| * scale >~ 1.5e9) gets NaN, not the reference's finite row: exp2's argument, an exact FMA
            of the score and the max rounded to fp32, is off by up to |max| * 2^-24 and overflows (measured
            in the interpreter: finite up to 3.4e9, NaN rows from 1.1e10).
TMA       (forward, opt-in) q, k, v through device-side tensor descriptors and, without a padding
            mask, a warp-specialized key loop (_head_descriptors; attention_fwd.py).
The readable PyTorch reference is attention_reference in dit_fast/ops/flash_attention.py.
"""

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels: token -> (t, h, w), RoPE rotation, masks, window ranges.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grid_position(tok, GRID_H, GRID_W):
    """(t, h, w) of raster-order token indices."""
    return tok // (GRID_H * GRID_W), (tok // GRID_W) % GRID_H, tok % GRID_W


@triton.jit
def _rotate(x, tok, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, COL0: tl.constexpr,
            BLOCK_C: tl.constexpr, INVERSE: tl.constexpr):
    """Rotates the interleaved pairs (x[2j], x[2j+1]) of each row of x (R, BLOCK_C), head-dim columns
    COL0.. (a chunk: COL0 is even, so no pair straddles two), by the 3D RoPE angle of its token; fp32
    result. Pairs j < ROPE_DT2 use t, j < ROPE_DTH2 use h, the rest w.

    ROPE_ptr is the (max(T, H, W), 2, D / 2) fp32 table of cos and sin of pos * theta^(-2i / d_a) (see
    rope_tables): gathering from it, hot in L1/L2, replaces a sin and a cos per pair and tile."""
    t, h, w = _grid_position(tok, GRID_H, GRID_W)
    t = tl.minimum(t, GRID_T - 1)  # rows past the sequence end (x = 0 there) must not read past the table
    pair = COL0 // 2 + tl.arange(0, BLOCK_C // 2)[None, :]
    pos = tl.where(pair < ROPE_DT2, t[:, None], tl.where(pair < ROPE_DTH2, h[:, None], w[:, None]))
    in_table = pair < D // 2  # padding pairs (past D): cos 1, sin 0, the identity
    cos = tl.load(ROPE_ptr + pos * D + pair, mask=in_table, other=1.0)  # (R, BLOCK_C / 2)
    sin = tl.load(ROPE_ptr + pos * D + D // 2 + pair, mask=in_table, other=0.0)
    if INVERSE:  # R(angle)^T = R(-angle): the backward maps gradients of rotated q/k back to q/k
        sin = -sin
    even, odd = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], BLOCK_C // 2, 2)))
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (x.shape[0], BLOCK_C))


@triton.jit
def _rotate_chunks(x0, x1, tok, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D,
                   BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, INVERSE: tl.constexpr):
    """_rotate on both head-dim chunks of a tile (fp32 results)."""
    x0 = _rotate(x0, tok, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, 0, BLOCK_D0, INVERSE)
    if BLOCK_D1 > 0:
        x1 = _rotate(x1, tok, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D, BLOCK_D0, BLOCK_D1, INVERSE)
    return x0, x1


@triton.jit
def _cast_chunks(x0, x1, like, BLOCK_D1: tl.constexpr):
    """Both chunks in like's dtype."""
    x0 = x0.to(like.dtype)
    if BLOCK_D1 > 0:
        x1 = x1.to(like.dtype)
    return x0, x1


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
def _load_rows(base, offs, valid, TOKEN_STRIDE, stride_s, D: tl.constexpr, COL0: tl.constexpr,
               BLOCK_C: tl.constexpr, EVEN: tl.constexpr, OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """The (len(offs), BLOCK_C) tile of head-dim columns COL0.. of the tokens at positions offs of a
    group; zero where not valid and past D. EVEN: every row is inside the sequence (no row mask)."""
    offs_d = COL0 + tl.arange(0, BLOCK_C)
    if EVEN:
        mask = offs_d[None, :] < D
    else:
        mask = valid[:, None] & (offs_d[None, :] < D)
    return tl.load(_tile_ptrs(base, offs, TOKEN_STRIDE, stride_s, offs_d, OFFS_64, ALIGNED), mask=mask, other=0.0)


@triton.jit
def _load_chunks(base, offs, valid, TOKEN_STRIDE, stride_s, D: tl.constexpr, BLOCK_D0: tl.constexpr,
                 BLOCK_D1: tl.constexpr, EVEN: tl.constexpr, OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """The rows at positions offs as the head dim's two chunks, columns [0, BLOCK_D0) and
    [BLOCK_D0, BLOCK_D0 + BLOCK_D1) (see HEAD DIM in the module docstring); the second is a 0.0
    placeholder, never used, when BLOCK_D1 = 0."""
    x0 = _load_rows(base, offs, valid, TOKEN_STRIDE, stride_s, D, 0, BLOCK_D0, EVEN, OFFS_64, ALIGNED)
    x1 = 0.0
    if BLOCK_D1 > 0:
        x1 = _load_rows(base, offs, valid, TOKEN_STRIDE, stride_s, D, BLOCK_D0, BLOCK_D1, EVEN, OFFS_64, ALIGNED)
    return x0, x1


@triton.jit
def _store_chunks(base, offs, valid, TOKEN_STRIDE, stride_s, x0, x1, D: tl.constexpr, BLOCK_D0: tl.constexpr,
                  BLOCK_D1: tl.constexpr, OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """Stores both chunks of the rows at positions offs (cast to base's element type) where valid."""
    offs_d = tl.arange(0, BLOCK_D0)
    tl.store(_tile_ptrs(base, offs, TOKEN_STRIDE, stride_s, offs_d, OFFS_64, ALIGNED),
             x0.to(base.dtype.element_ty), mask=valid[:, None] & (offs_d[None, :] < D))
    if BLOCK_D1 > 0:
        offs_d = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        tl.store(_tile_ptrs(base, offs, TOKEN_STRIDE, stride_s, offs_d, OFFS_64, ALIGNED),
                 x1.to(base.dtype.element_ty), mask=valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dot_head(a0, a1, b0, b1, BLOCK_D1: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a b^T summed over the head dim: one product per chunk into one fp32 tile, (R, chunk) x (C, chunk)."""
    x = tl.dot(a0, tl.trans(b0), input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        x = tl.dot(a1, tl.trans(b1), x, input_precision=DOT_PRECISION)
    return x


@triton.jit
def _mma_chunks(acc0, acc1, a, b0, b1, BLOCK_D1: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += a b, chunk by chunk of the head dim: (R, K) x (K, chunk) into the fp32 (R, chunk) tiles."""
    acc0 = tl.dot(a, b0, acc0, input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        acc1 = tl.dot(a, b1, acc1, input_precision=DOT_PRECISION)
    return acc0, acc1


@triton.jit
def _zero_rows(x0, x1, hide, BLOCK_D1: tl.constexpr):
    """Both chunks with the rows where hide is True set to zero (a select: NaN rows become 0 too)."""
    x0 = tl.where(hide[:, None], tl.zeros_like(x0), x0)
    if BLOCK_D1 > 0:
        x1 = tl.where(hide[:, None], tl.zeros_like(x1), x1)
    return x0, x1


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
                    BLOCK: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, HAS_ROPE: tl.constexpr,
                    TILED: tl.constexpr, EVEN: tl.constexpr, OFFS_64: tl.constexpr, ALIGNED: tl.constexpr):
    """Two operands' rows for the tile [start, start + BLOCK) of a group, each as its two head-dim
    chunks, the first operand rotated with RoPE (k and v, or q and dO), their tokens, and which are
    inside the sequence: (rot0, rot1, other0, other1, tok, valid). Serves the tiles a kernel streams and
    the one it owns (dk/dv: k, v; dq: q, dO). TILED: start is a position in 3D-tile order and the rows
    are gathered through their tokens (full mode: group offset 0, token stride 1)."""
    offs = start + tl.arange(0, BLOCK)
    valid = offs < end
    tok = g_off + offs * TOKEN_STRIDE
    if TILED:
        tok, valid = _tile_order_tokens(start, BLOCK, GRID_T, GRID_H, GRID_W, TILE_T, TILE_H, TILE_W)
        offs = tok
    rot0, rot1 = _load_chunks(rot_base, offs, valid, TOKEN_STRIDE, stride_rot, D, BLOCK_D0, BLOCK_D1, EVEN, OFFS_64,
                              ALIGNED)
    other0, other1 = _load_chunks(other_base, offs, valid, TOKEN_STRIDE, stride_other, D, BLOCK_D0, BLOCK_D1, EVEN,
                                  OFFS_64, ALIGNED)
    if HAS_ROPE:
        rot0, rot1 = _rotate_chunks(rot0, rot1, tok, ROPE_ptr, GRID_T, GRID_H, GRID_W, ROPE_DT2, ROPE_DTH2, D,
                                    BLOCK_D0, BLOCK_D1, False)
        rot0, rot1 = _cast_chunks(rot0, rot1, other0, BLOCK_D1)
    return rot0, rot1, other0, other1, tok, valid


@triton.jit
def _head_descriptors(base, rows, row_stride, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D0: tl.constexpr,
                      BLOCK_D1: tl.constexpr):
    """TMA: device-side tensor descriptors of a group's (rows, D) operand, one per head-dim chunk, each
    loading (BLOCK_R, chunk) tiles (rows past `rows` and columns past D arrive as zeros). The launcher
    checked the 16-byte alignment TMA needs (ALIGNED) and set Triton's allocator for the descriptors."""
    desc0 = tl.make_tensor_descriptor(base, shape=[rows, D], strides=[row_stride, 1], block_shape=[BLOCK_R, BLOCK_D0])
    desc1 = 0
    if BLOCK_D1 > 0:
        desc1 = tl.make_tensor_descriptor(base, shape=[rows, D], strides=[row_stride, 1],
                                          block_shape=[BLOCK_R, BLOCK_D1])
    return desc0, desc1


@triton.jit
def _load_chunks_tma(desc0, desc1, start, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    """The tile of rows start.. through the descriptors of _head_descriptors, as its two chunks."""
    x0 = desc0.load([start, 0])
    x1 = 0.0
    if BLOCK_D1 > 0:
        x1 = desc1.load([start, BLOCK_D0])
    return x0, x1


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
def _nonfinite_rows(x0, x1, BLOCK_D1: tl.constexpr):
    """(R,) True where a row of the chunked (R, D) tile x holds a NaN or an infinity."""
    x0 = x0.to(tl.float32)
    bad = tl.max(((x0 != x0) | (tl.abs(x0) == float("inf"))).to(tl.int32), axis=1)
    if BLOCK_D1 > 0:
        x1 = x1.to(tl.float32)
        bad = tl.maximum(bad, tl.max(((x1 != x1) | (tl.abs(x1) == float("inf"))).to(tl.int32), axis=1))
    return bad > 0


@triton.jit
def _hidden_keys(k0, k1, v0, v1, key_ok, window_mask, HAS_MASK: tl.constexpr, WINDOW: tl.constexpr,
                 BLOCK_D1: tl.constexpr):
    """(BLOCK_N,) the key rows to zero in a tile's k and v (tl.where, a select) before a product that a
    masked (query, key) pair takes part in: a probability of exactly 0 times a NaN or inf key or value
    is NaN, and a masked key must not influence anything. HAS_MASK: the padded keys (hidden from
    every query). WINDOW, edge tiles (window_mask): a key hidden from some queries of the tile but seen
    by others, so only its non-finite rows are zeroed, and the forward returns NaN for the queries
    that see it (_mask_scores' poison) instead of silently skipping it. Masked-off rows past the
    sequence end are loaded as zeros already."""
    hide = key_ok == 0
    if WINDOW:
        if window_mask:
            hide = hide | _nonfinite_rows(k0, k1, BLOCK_D1) | _nonfinite_rows(v0, v1, BLOCK_D1)
    return hide


@triton.jit
def _mask_scores(x, fill, tok_q, tok_k, valid, key_ok, window_mask, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W,
                 HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, EVEN: tl.constexpr, poison=None):
    """x (scores, or probabilities) with ``fill`` where a query may not see a key: a select, so a NaN
    score of a masked pair is dropped. The other tensors come broadcast to x's orientation: (queries,
    keys), or (keys, queries) in the dk/dv kernel.
    valid: the streamed tile's tokens inside the sequence (only the streamed side needs it: rows of the
    owned side past the end are never stored); key_ok: the key padding mask (HAS_MASK);
    window_mask (runtime, WINDOW only): False for a full tile inside every query's window
    (_tile_inside_windows), which then costs what a dense tile does. poison (forward, WINDOW): keys whose
    non-finite values _hidden_keys zeroed; a query allowed to see one gets a NaN score instead."""
    if ((not EVEN) and (not WINDOW)) or HAS_MASK:
        allowed = valid
        if HAS_MASK:
            allowed = allowed & key_ok
        x = tl.where(allowed, x, fill)
    if WINDOW:
        if window_mask:
            allowed = valid & _window_allowed(tok_q, tok_k, GRID_T, GRID_H, GRID_W, WIN_T, WIN_H, WIN_W)
            x = tl.where(allowed, x, fill)
            if poison is not None:
                x = tl.where(allowed & poison, float("nan"), x)
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
