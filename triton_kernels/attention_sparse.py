"""Block-sparse attention kernels and launchers: the dense family's tiles, driven by index lists.

One kernel family with the dense attention (attention_common.py describes its flags and tile helpers):
the per-tile work is the dense kernels' own @triton.jit functions (attention_fwd._fwd_tile,
attention_bwd._dkdv_tile / _dq_tile, _load_chunks, _store_chunks), imported, not copied; only the loop
drivers differ. They visit exactly the kept tile pairs of a ``SparseBlocks`` (dit_fast/ops/sparse_layout.py),
as FlexAttention's block-sparse kernels and Video Sparse Attention's do:

    forward   a program per (batch * head, query tile, BLOCK_M rows of it); one flat loop over the
              blocks of BLOCK_N rows of its kept key tiles, kv_index[b, h, tile, :kv_count[b, h, tile]]
              (tile j's rows are [starts[j], starts[j + 1])), online softmax as the dense forward.
    dK, dV    a program per (batch * head, key tile, BLOCK_N rows of it), walking the transposed lists
              (the query tiles that keep it; SparseBlocks.transposed, cached per blocks object by the op).
    dQ        a program per (batch * head, query tile, BLOCK_M rows of it), walking kv_index again.
    delta     rowsum(dO * O), the dense backward's preprocess kernel.

q, k, v, out, the key padding mask and lse are in tile order (every tile one contiguous run of rows:
tile i at [starts[i], starts[i + 1]), TileLayout.tile_starts), so a tile's rows are plain strided loads
(16-byte vectors, ALIGNED), never gathers. Tiles hold V = tt * th * tw tokens, fewer at the grid's edges
and in the last text tile: a program's rows past its tile's end are masked on load and store, and the
programs of a partial tile past its end return at once.

The walk. Each list entry is cdiv(V, BLOCK) blocks, and the loop runs count x that many steps (one flat
loop, not a loop per tile: Triton pipelines the loads of step i + 1 under the products of step i, which
a loop of one block per tile, V = BLOCK, never would). EVEN (every tile whole, WHOLE_TILES, and V a
multiple of the block): no bounds masks at all, as the dense kernel's whole tiles. Otherwise every block
masks the rows past its tile's end (rows of the next tile, which may not be kept), and a partial tile's
blocks past its end are empty (masked whole; a V = BLOCK configuration, which _prune prefers, has none).

Masked keys: a key outside every kept tile of a query is never loaded with it; a padded key (HAS_MASK)
is masked by a select and its value rows zeroed before the products (attention_common.py: MASKED). A
query tile that keeps nothing returns zeros and lse = -inf; a query that meets a non-finite key or value
in its kept tiles returns a NaN row and lse (_finish_rows) and passes no gradient back (_backward_rows),
the dense kernels' rules.

RECORD (tests only; compiled out otherwise): every visited (query tile, key tile) block pair adds 1 to
VISITS[b, h, query tile, key tile], in each of the three kernels, so a test can count what the loops
really visited against the index lists.

The readable PyTorch reference is block_sparse_attention_reference in dit_fast/ops/block_sparse.py.
"""

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from dit_fast import _backend
from dit_fast.ops.sparse_layout import SparseBlocks, TileLayout
from dit_fast.triton_kernels._layout import aligned_16
from dit_fast.triton_kernels.attention import head_chunks
from dit_fast.triton_kernels.attention_bwd import _attn_bwd_preprocess_kernel, _backward_rows, _dkdv_tile, _dq_tile
from dit_fast.triton_kernels.attention_common import _load_chunks, _store_chunks, _zero_rows
from dit_fast.triton_kernels.attention_fwd import _finish_rows, _fwd_tile

# ---------------------------------------------------------------------------------------------
# Program coordinates and the walk over an index list
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_program(STARTS_ptr, HEADS, TILE_V: tl.constexpr, BLOCK: tl.constexpr):
    """(tile, b, h, first row, end of the tile's rows) of this program: axis 0 walks (tile, BLOCK rows of
    it), cdiv(TILE_V, BLOCK) programs per tile; axis 1 is batch * heads. b and h are int64 (their
    offsets pass 2^31 elements)."""
    per_tile: tl.constexpr = (TILE_V + BLOCK - 1) // BLOCK
    tile = tl.program_id(0) // per_tile
    bh = tl.program_id(1)
    h = (bh % HEADS).to(tl.int64)
    b = (bh // HEADS).to(tl.int64)
    start = tl.load(STARTS_ptr + tile)
    return tile, b, h, start + (tl.program_id(0) % per_tile) * BLOCK, tl.load(STARTS_ptr + tile + 1)


@triton.jit
def _listed_block(index_base, it, STARTS_ptr, TILE_V: tl.constexpr, BLOCK: tl.constexpr):
    """Step `it` of the walk over an index list's tiles, cdiv(TILE_V, BLOCK) blocks of rows per tile:
    (the tile, the block's first row, the end of the tile's rows). A partial tile's blocks past its end
    start at or after that end: empty, masked whole (the walk is one flat loop, which Triton pipelines,
    not a loop per tile)."""
    per_tile: tl.constexpr = (TILE_V + BLOCK - 1) // BLOCK
    tile = tl.load(index_base + it // per_tile)
    return tile, tl.load(STARTS_ptr + tile) + (it % per_tile) * BLOCK, tl.load(STARTS_ptr + tile + 1)


@triton.jit
def _record(VISITS_ptr, b, h, HEADS, N_TILES, q_tile, k_tile, start, end, RECORD: tl.constexpr):
    """RECORD (tests): one more visit of the block pair (query tile, key tile), if the streamed block
    [start, ...) holds rows of its tile (start < end)."""
    if RECORD:
        tl.atomic_add(VISITS_ptr + ((b * HEADS + h) * N_TILES + q_tile) * N_TILES + k_tile, 1, mask=start < end)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sparse_fwd_kernel(
    Q_ptr,  # queries, (B, S, heads, D) tile order, last dim contiguous
    K_ptr,  # keys, (B, S, heads, D) tile order
    V_ptr,  # values, (B, S, heads, D) tile order
    O_ptr,  # out: (B, S, heads, D), contiguous
    LSE_ptr,  # out: natural-log logsumexp of the scaled kept scores, (B, heads, S) fp32
    KPM_ptr,  # key padding mask, (B, S) or per head (B, heads, S) uint8 in tile order, nonzero = attend  [HAS_MASK]
    STARTS_ptr,  # (n_tiles + 1,) int32: tile i holds rows [starts[i], starts[i + 1])
    COUNT_ptr,  # (B | 1, heads | 1, n_tiles) int32: kept key tiles per query tile
    INDEX_ptr,  # (B | 1, heads | 1, n_tiles, width) int32: their indices, ascending, entries contiguous
    VISITS_ptr,  # out [RECORD]: (B, heads, n_tiles, n_tiles) int32 visit counts
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_mb, stride_mh,  # key padding mask batch and head strides (0: one mask for every head)
    count_sb, count_sh,  # COUNT's batch and head strides (0: shared)
    index_sb, index_sh, index_st,  # INDEX's batch, head and tile strides (0: shared)
    HEADS, S, N_TILES,
    D: tl.constexpr,  # head dim
    sm_scale,
    S_BUCKET,  # autotune key: next power of two of S
    TILE_V: tl.constexpr,  # tokens in a whole tile
    WHOLE_TILES: tl.constexpr,  # every tile holds TILE_V tokens (no partial edge or text tile)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,  # the head dim's chunks (attention_common.py: HEAD DIM)
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    OFFS_64: tl.constexpr,  # int64 element offsets inside a (batch, head) (see _tile_ptrs)
    ALIGNED: tl.constexpr,  # every pointer and stride a multiple of 16 bytes (see _tile_ptrs)
    RECORD: tl.constexpr,  # tests: count the visited block pairs into VISITS_ptr
):
    q_tile, b, h, start_m, q_end = _tile_program(STARTS_ptr, HEADS, TILE_V, BLOCK_M)
    if start_m >= q_end:  # a partial tile has fewer row blocks than a whole one
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    valid_m = offs_m < q_end
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    kpm_base = KPM_ptr + b * stride_mb + h * stride_mh
    q0, q1 = _load_chunks(q_base, offs_m, valid_m, 1, stride_qs, D, BLOCK_D0, BLOCK_D1, False, OFFS_64, ALIGNED)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 is the native instruction

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, BLOCK_D0), dtype=tl.float32)
    acc1 = 0.0  # the second chunk's accumulator (a placeholder without one)
    if BLOCK_D1 > 0:
        acc1 = tl.zeros((BLOCK_M, BLOCK_D1), dtype=tl.float32)
    count = tl.load(COUNT_ptr + b * count_sb + h * count_sh + q_tile)
    index_base = INDEX_ptr + b * index_sb + h * index_sh + q_tile * index_st
    # every block of every kept key tile; EVEN (whole tiles of whole blocks): no bounds masks
    EVEN: tl.constexpr = WHOLE_TILES and TILE_V % BLOCK_N == 0
    for it in range(0, count * ((TILE_V + BLOCK_N - 1) // BLOCK_N)):
        k_tile, start_n, k_end = _listed_block(index_base, it, STARTS_ptr, TILE_V, BLOCK_N)
        acc0, acc1, m_i, l_i = _fwd_tile(
            acc0, acc1, m_i, l_i, q0, q1, offs_m, start_n, k_end, False, k_base, v_base, kpm_base, K_ptr, stride_ks,
            stride_vs, 0, 1, qk_scale, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, D, BLOCK_N, BLOCK_D0, BLOCK_D1, False,
            HAS_MASK, False, False, DOT_PRECISION, EVEN, OFFS_64, ALIGNED)
        _record(VISITS_ptr, b, h, HEADS, N_TILES, q_tile, k_tile, start_n, k_end, RECORD)

    # a query tile that keeps nothing (or a fully padded row): zeros, lse = -inf; a row that met a non-finite
    # key or value it may see: NaN, lse = NaN (the dense forward's epilogue)
    out0, out1, lse = _finish_rows(acc0, acc1, m_i, l_i, BLOCK_D1)
    o_base = O_ptr + b * stride_ob + h * stride_oh
    _store_chunks(o_base, offs_m, valid_m, 1, stride_os, out0, out1, D, BLOCK_D0, BLOCK_D1, OFFS_64, ALIGNED)
    tl.store(LSE_ptr + (b * HEADS + h) * S + offs_m, lse, mask=valid_m)


# ---------------------------------------------------------------------------------------------
# Backward (the derivation: attention_bwd.py). Two kernels, no atomics: dK / dV per key tile over
# the query tiles that keep it, dQ per query tile over its kept key tiles; the same tile pairs as the
# forward, so the work is 2.5x the forward's per kept pair.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sparse_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr,  # (B, S, heads, D) tile order, inputs of the forward
    DO_ptr,  # grad of the output, (B, S, heads, D) tile order
    LSE_ptr,  # (B, heads, S) fp32, from the forward
    DELTA_ptr,  # rowsum(dO * O), (B, heads, S) fp32
    DK_ptr, DV_ptr,  # out: (B, S, heads, D), contiguous
    KPM_ptr, STARTS_ptr,
    COUNT_ptr,  # (B | 1, heads | 1, n_tiles) int32: query tiles that keep each key tile
    INDEX_ptr,  # (B | 1, heads | 1, n_tiles, width) int32: those query tiles, ascending
    VISITS_ptr,  # out [RECORD]: (B, heads, n_tiles, n_tiles) int32, [query tile, key tile]
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_mb, stride_mh,
    count_sb, count_sh,
    index_sb, index_sh, index_st,
    HEADS, S, N_TILES,
    D: tl.constexpr, sm_scale, S_BUCKET,
    TILE_V: tl.constexpr, WHOLE_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query block (inner loop)
    BLOCK_N: tl.constexpr,  # key block (owned by the program)
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    OFFS_64: tl.constexpr,
    ALIGNED: tl.constexpr,
    RECORD: tl.constexpr,
):
    k_tile, b, h, start_n, k_end = _tile_program(STARTS_ptr, HEADS, TILE_V, BLOCK_N)
    if start_n >= k_end:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    valid_k = offs_n < k_end
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    k0, k1 = _load_chunks(k_base, offs_n, valid_k, 1, stride_ks, D, BLOCK_D0, BLOCK_D1, False, OFFS_64, ALIGNED)
    v0, v1 = _load_chunks(v_base, offs_n, valid_k, 1, stride_vs, D, BLOCK_D0, BLOCK_D1, False, OFFS_64, ALIGNED)
    kpm_k = valid_k
    if HAS_MASK:
        kpm_k = tl.load(KPM_ptr + b * stride_mb + h * stride_mh + offs_n, mask=valid_k, other=0) != 0
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    do_base = DO_ptr + b * stride_dob + h * stride_doh
    lse_base = LSE_ptr + (b * HEADS + h) * S
    delta_base = DELTA_ptr + (b * HEADS + h) * S
    qk_scale = sm_scale * 1.4426950408889634

    dk0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
    dk1 = 0.0  # the second chunk's accumulators (placeholders without one)
    dv1 = 0.0
    if BLOCK_D1 > 0:
        dk1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
    count = tl.load(COUNT_ptr + b * count_sb + h * count_sh + k_tile)
    index_base = INDEX_ptr + b * index_sb + h * index_sh + k_tile * index_st
    # every block of every query tile that keeps this key tile
    EVEN: tl.constexpr = WHOLE_TILES and TILE_V % BLOCK_M == 0
    for it in range(0, count * ((TILE_V + BLOCK_M - 1) // BLOCK_M)):
        q_tile, start_m, q_end = _listed_block(index_base, it, STARTS_ptr, TILE_V, BLOCK_M)
        dk0, dk1, dv0, dv1 = _dkdv_tile(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, offs_n, kpm_k, start_m, q_end, False, q_base, do_base, lse_base,
            delta_base, Q_ptr, K_ptr, stride_qs, stride_dos, 0, 0, 1, qk_scale, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, D,
            BLOCK_M, BLOCK_D0, BLOCK_D1, False, HAS_MASK, False, False, False, DOT_PRECISION, EVEN, OFFS_64, ALIGNED)
        _record(VISITS_ptr, b, h, HEADS, N_TILES, q_tile, k_tile, start_m, q_end, RECORD)

    dk0 = dk0 * sm_scale
    if BLOCK_D1 > 0:
        dk1 = dk1 * sm_scale
    if HAS_MASK:  # a padded key's gradients are zero, whatever 0 * NaN its own row made of them
        dk0, dk1 = _zero_rows(dk0, dk1, kpm_k == 0, BLOCK_D1)
        dv0, dv1 = _zero_rows(dv0, dv1, kpm_k == 0, BLOCK_D1)
    out_base = b * stride_dkb + h * stride_dkh  # dk and dv share the layout
    _store_chunks(DK_ptr + out_base, offs_n, valid_k, 1, stride_dks, dk0, dk1, D, BLOCK_D0, BLOCK_D1, OFFS_64, ALIGNED)
    _store_chunks(DV_ptr + out_base, offs_n, valid_k, 1, stride_dks, dv0, dv1, D, BLOCK_D0, BLOCK_D1, OFFS_64, ALIGNED)


@triton.jit
def _sparse_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, DELTA_ptr,
    DQ_ptr,  # out: (B, S, heads, D), contiguous
    KPM_ptr, STARTS_ptr, COUNT_ptr, INDEX_ptr,  # the forward's lists
    VISITS_ptr,  # out [RECORD]: (B, heads, n_tiles, n_tiles) int32, [query tile, key tile]
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_mb, stride_mh,
    count_sb, count_sh,
    index_sb, index_sh, index_st,
    HEADS, S, N_TILES,
    D: tl.constexpr, sm_scale, S_BUCKET,
    TILE_V: tl.constexpr, WHOLE_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    OFFS_64: tl.constexpr,
    ALIGNED: tl.constexpr,
    RECORD: tl.constexpr,
):
    q_tile, b, h, start_m, q_end = _tile_program(STARTS_ptr, HEADS, TILE_V, BLOCK_M)
    if start_m >= q_end:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    valid_m = offs_m < q_end
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    do_base = DO_ptr + b * stride_dob + h * stride_doh
    q0, q1 = _load_chunks(q_base, offs_m, valid_m, 1, stride_qs, D, BLOCK_D0, BLOCK_D1, False, OFFS_64, ALIGNED)
    do0, do1 = _load_chunks(do_base, offs_m, valid_m, 1, stride_dos, D, BLOCK_D0, BLOCK_D1, False, OFFS_64, ALIGNED)
    # rows with no visible key, or that met garbage (lse -inf or NaN), pass no gradient (the dense backward's)
    lse, delta = _backward_rows(tl.load(LSE_ptr + (b * HEADS + h) * S + offs_m, mask=valid_m, other=0.0),
                                tl.load(DELTA_ptr + (b * HEADS + h) * S + offs_m, mask=valid_m, other=0.0))
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    kpm_base = KPM_ptr + b * stride_mb + h * stride_mh
    qk_scale = sm_scale * 1.4426950408889634

    dq0 = tl.zeros((BLOCK_M, BLOCK_D0), dtype=tl.float32)
    dq1 = 0.0
    if BLOCK_D1 > 0:
        dq1 = tl.zeros((BLOCK_M, BLOCK_D1), dtype=tl.float32)
    count = tl.load(COUNT_ptr + b * count_sb + h * count_sh + q_tile)
    index_base = INDEX_ptr + b * index_sb + h * index_sh + q_tile * index_st
    # every block of every kept key tile (the forward's walk)
    EVEN: tl.constexpr = WHOLE_TILES and TILE_V % BLOCK_N == 0
    for it in range(0, count * ((TILE_V + BLOCK_N - 1) // BLOCK_N)):
        k_tile, start_n, k_end = _listed_block(index_base, it, STARTS_ptr, TILE_V, BLOCK_N)
        dq0, dq1 = _dq_tile(
            dq0, dq1, q0, q1, do0, do1, lse, delta, offs_m, start_n, k_end, False, k_base, v_base, kpm_base, K_ptr,
            stride_ks, stride_vs, 0, 1, qk_scale, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, D, BLOCK_N, BLOCK_D0, BLOCK_D1,
            False, HAS_MASK, False, False, DOT_PRECISION, EVEN, OFFS_64, ALIGNED)
        _record(VISITS_ptr, b, h, HEADS, N_TILES, q_tile, k_tile, start_n, k_end, RECORD)

    dq0 = dq0 * sm_scale
    if BLOCK_D1 > 0:
        dq1 = dq1 * sm_scale
    dq_base = DQ_ptr + b * stride_dqb + h * stride_dqh
    _store_chunks(dq_base, offs_m, valid_m, 1, stride_dqs, dq0, dq1, D, BLOCK_D0, BLOCK_D1, OFFS_64, ALIGNED)


# ---------------------------------------------------------------------------------------------
# Tile configurations: visible lists per kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages, spills).
# From the sm_90a compile reports (benchmarks/kernel_resources.py --kernels sparse_fwd sparse_dkdv
# sparse_dq): 128 x 128 / 8 warps for the forward, 32 x 128 / 8 for dK / dV (its two fp32 accumulators
# fit at D = 128), 128 x 64 / 8 for dQ, as the dense kernels, then the best for 64-token tiles (Video
# Sparse Attention's 4 x 4 x 4); `spills` names where a configuration spills at a head dim over 64
# ("mask": with a padding mask; "always"), and _prune drops it there.
# _prune also keeps blocks no longer than a tile and, where it can, blocks that divide the tile's volume
# (whole blocks need no bounds masks). The interpreter (CPU tests) runs one tiny configuration.
# ---------------------------------------------------------------------------------------------

FWD_SPACE = [(128, 128, 8, 2, "mask"), (64, 64, 4, 3, None), (128, 64, 8, 3, None), (64, 32, 4, 3, None),
             (32, 32, 4, 2, None), (16, 16, 4, 2, None)]
DKDV_SPACE = [(32, 128, 8, 2, None), (32, 64, 4, 3, None), (64, 64, 4, 3, "always"), (32, 32, 4, 2, None),
              (16, 16, 4, 2, None)]
DQ_SPACE = [(128, 64, 8, 3, "mask"), (64, 64, 4, 3, "mask"), (64, 32, 4, 3, None), (128, 32, 8, 2, None),
            (32, 32, 4, 2, None), (16, 16, 4, 2, None)]
TUNING_KEY = ["S_BUCKET", "TILE_V", "WHOLE_TILES", "BLOCK_D0", "BLOCK_D1", "HAS_MASK", "DOT_PRECISION"]


def _configs(space):
    """The space as triton.Configs. $DIT_FAST_ATTENTION_TUNE (read at import, as the dense kernels do):
    "quick" times the first three (each space starts with its best tile for tiles of 128 tokens or
    more, then for 64-token tiles) and the smallest, "single" runs the first and the smallest untimed
    (the GPU tests); the smallest serves tiles shorter than the others' blocks."""
    if _backend.triton_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    tune = os.environ.get("DIT_FAST_ATTENTION_TUNE", "").strip().lower()
    space = {"quick": space[:3] + space[-1:], "single": space[:1] + space[-1:]}.get(tune, space)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st, _ in space]


def _pruner(space):
    spills = {(bm, bn, w, st): where for bm, bn, w, st, where in space}

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        volume, width = args["TILE_V"], args["BLOCK_D0"] + args["BLOCK_D1"]
        wide = width > 128 or named_args["Q_ptr"].dtype == torch.float32  # fp32 tiles: twice the registers

        def kept(c):
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            where = spills.get((bm, bn, c.num_warps, c.num_stages))
            spilled = width > 64 and (where == "always" or (where == "mask" and args["HAS_MASK"]))
            return bm <= max(16, volume) and bn <= max(16, volume) and not spilled and not (wide and bm * bn > 64 * 64)

        fit = [c for c in configs if kept(c)]
        whole = [c for c in fit if volume % c.kwargs["BLOCK_M"] == 0 and volume % c.kwargs["BLOCK_N"] == 0]
        return whole or fit or configs[-1:]

    return {"early_config_prune": prune}


def _autotuned(kernel, space):
    return triton.autotune(_configs(space), key=TUNING_KEY, prune_configs_by=_pruner(space),
                           reset_to_zero=["VISITS_ptr"])(kernel)


_sparse_fwd = _autotuned(_sparse_fwd_kernel, FWD_SPACE)
_sparse_bwd_dkdv = _autotuned(_sparse_bwd_dkdv_kernel, DKDV_SPACE)
_sparse_bwd_dq = _autotuned(_sparse_bwd_dq_kernel, DQ_SPACE)


# ---------------------------------------------------------------------------------------------
# Launchers. Arguments are validated by dit_fast.ops.block_sparse_attention; every tensor is in tile
# order. They return plain tensors; autograd lives in dit_fast/ops/block_sparse.py.
# ---------------------------------------------------------------------------------------------

_starts_cache = {}


def tile_starts(layout: TileLayout, device) -> torch.Tensor:
    """(n_tiles + 1,) int32 on device: tile i's rows are [starts[i], starts[i + 1]) in tile order. Cached."""
    key = (layout, str(device))
    if key not in _starts_cache:
        with torch.inference_mode(False):  # a cache: ordinary tensors even if first built under inference_mode
            _starts_cache[key] = layout.tile_starts().to(device=device, dtype=torch.int32)
    return _starts_cache[key]


@functools.lru_cache(maxsize=None)
def whole_tiles(layout: TileLayout) -> bool:
    """Every tile holds layout.volume tokens: no partial edge tile, no partial text tile."""
    return bool((layout.tile_sizes() == layout.volume).all())


def _lastdim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _lists(count, index, batch, heads):
    """Counts and index lists with their broadcast (size-1) batch and head dims as 0 strides (the kernels
    read counts and list entries with unit stride)."""
    count = _lastdim_contiguous(count).expand(batch, heads, -1)
    index = _lastdim_contiguous(index).expand(batch, heads, -1, -1)
    return count, index, (count.stride(0), count.stride(1), index.stride(0), index.stride(1), index.stride(2))


def _common(q, tensors, key_padding_mask, layout: TileLayout, visits):
    B, S, heads, D = q.shape
    block_d0, block_d1 = head_chunks(D)
    if key_padding_mask is not None:  # (B, S), or per head (B, heads, S): head stride 0 for the first
        kpm = _lastdim_contiguous(key_padding_mask).view(torch.uint8)  # bool -> bytes, no copy
        mask_strides = (kpm.stride(0), kpm.stride(1) if kpm.dim() == 3 else 0)
    else:
        kpm, mask_strides = q.new_empty(0, dtype=torch.uint8), (0, 0)
    if visits is None:
        visits = q.new_empty(0, dtype=torch.int32)
    stride_s = max([t.stride(1) for t in tensors] + [heads * D])
    flags = dict(TILE_V=layout.volume, WHOLE_TILES=whole_tiles(layout), BLOCK_D0=block_d0, BLOCK_D1=block_d1,
                 HAS_MASK=key_padding_mask is not None, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                 OFFS_64=(S + 128) * stride_s + D >= 2**31, ALIGNED=aligned_16(tensors, D), RECORD=visits.numel() > 0)
    tail = (heads, S, layout.n_tiles, D, triton.next_power_of_2(S))
    return kpm, mask_strides, visits, flags, tail


MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second axis (batch * heads here)


def _grid(layout: TileLayout, batch_heads: int, block: str):
    if batch_heads > MAX_GRID_Y:
        raise ValueError(f"block-sparse attention kernels: batch * heads = {batch_heads} is past the {MAX_GRID_Y} "
                         "programs a launch grid's second axis holds; split the batch")
    return lambda meta: (layout.n_tiles * triton.cdiv(layout.volume, meta[block]), batch_heads)


def block_sparse_forward(q, k, v, kv_count, kv_index, key_padding_mask, layout: TileLayout, scale: float,
                         visits: Optional[torch.Tensor] = None):
    """Returns (out (B, S, heads, D) contiguous, lse (B, heads, S) fp32, natural log), tile order.
    visits: tests only, a zeroed (B, heads, n_tiles, n_tiles) int32 tensor the kernel counts its visited
    block pairs into (RECORD)."""
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    B, S, heads, D = q.shape
    out = torch.empty((B, S, heads, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, heads, S), device=q.device, dtype=torch.float32)
    count, index, list_strides = _lists(kv_count, kv_index, B, heads)
    kpm, mask_strides, visits, flags, (heads_, S_, n_tiles, D_, bucket) = _common(q, (q, k, v), key_padding_mask,
                                                                                   layout, visits)
    _sparse_fwd[_grid(layout, B * heads, "BLOCK_M")](
        q, k, v, out, lse, kpm, tile_starts(layout, q.device), count, index, visits,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *mask_strides, *list_strides, heads_, S_, n_tiles, D_, float(scale), bucket, **flags)
    return out, lse


def block_sparse_backward(dout, q, k, v, out, lse, kv_count, kv_index, q_count, q_index, key_padding_mask,
                          layout: TileLayout, scale: float, visits=None):
    """Returns (dq, dk, dv), contiguous (B, S, heads, D) in the input dtype, tile order. q_count / q_index:
    the transposed lists (SparseBlocks.transposed), computed here when empty. visits: tests only, a pair of
    zeroed (B, heads, n_tiles, n_tiles) int32 tensors for the dK / dV and the dQ kernel (RECORD)."""
    q, k, v, dout, out = (_lastdim_contiguous(t) for t in (q, k, v, dout, out))
    B, S, heads, D = q.shape
    if q_count.numel() == 0:
        q_count, q_index = SparseBlocks(layout, kv_count, kv_index).transposed()
    # preprocess: delta = rowsum(dO * O) per query, (B, heads, S) fp32, one read of O and dO
    delta = torch.empty((B, heads, S), device=q.device, dtype=torch.float32)
    block_m = 16 if _backend.triton_interpreting() else 64
    _attn_bwd_preprocess_kernel[(B * heads * triton.cdiv(S, block_m),)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), heads, S, D, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=4)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    visits_dkdv, visits_dq = visits if visits is not None else (None, None)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    starts = tile_starts(layout, q.device)

    count, index, list_strides = _lists(q_count, q_index, B, heads)
    kpm, mask_strides, visits_dkdv, flags, tail = _common(q, (q, k, v, dout), key_padding_mask, layout, visits_dkdv)
    _sparse_bwd_dkdv[_grid(layout, B * heads, "BLOCK_N")](
        q, k, v, dout, lse, delta, dk, dv, kpm, starts, count, index, visits_dkdv, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), *mask_strides, *list_strides, *tail[:4], float(scale), tail[4],
        **flags)

    count, index, list_strides = _lists(kv_count, kv_index, B, heads)
    kpm, mask_strides, visits_dq, flags, tail = _common(q, (q, k, v, dout), key_padding_mask, layout, visits_dq)
    _sparse_bwd_dq[_grid(layout, B * heads, "BLOCK_M")](
        q, k, v, dout, lse, delta, dq, kpm, starts, count, index, visits_dq, *strides,
        dq.stride(0), dq.stride(1), dq.stride(2), *mask_strides, *list_strides, *tail[:4], float(scale), tail[4],
        **flags)
    return dq, dk, dv
