"""Triton flash attention over 3D-patchified video tokens: autotuning and launchers.

The kernels are one family with compile-time flags (masking modes, RoPE, window, tiles, head-dim
chunks), described in attention_common.py beside the tile helpers they share; attention_fwd.py holds
the forward kernel, attention_bwd.py the backward. The readable PyTorch references are
attention_reference and attention_backward_reference in dit_fast/ops/flash_attention.py.

Two opt-in paths, until a GPU run has passed their tests (benchmarks/NOTES.md): the Hopper forward
(tma=True or DIT_FAST_ATTENTION_FWD=tma: TMA descriptors and a warp-specialized loop on dense tiles)
and the one-pass backward (deterministic=False or DIT_FAST_ATTENTION_BWD=atomic: dq by fp32 atomics).
"""

import os

import torch
import triton

from dit_fast import _backend
from dit_fast.ops.rope import rope_split as _rope_split
from dit_fast.triton_kernels._layout import aligned_16
from dit_fast.triton_kernels.attention_bwd import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_convert_kernel,
                                                   _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel)
from dit_fast.triton_kernels.attention_fwd import _attn_fwd_kernel

MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Autotuning. The spaces are visible lists filtered by keep(); the tuning key is the head-dim block,
# the sequence-length buckets and the masking flags (the dtypes are added by Triton). The
# interpreter (CPU tests) runs one tiny configuration.
# ---------------------------------------------------------------------------------------------

# TILED adds the tile's shape: a configuration's blocks must divide its volume (see _prune)
TUNING_KEY = ["LQ_BUCKET", "LK_BUCKET", "BLOCK_D0", "BLOCK_D1", "HAS_ROPE", "HAS_MASK", "WINDOW", "TILED", "TILE_T",
              "TILE_H", "TILE_W", "DOT_PRECISION"]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is the query tile, BLOCK_N the key tile, in
# all three kernels (the dk/dv kernel owns a key tile and streams query tiles). Kept short: every
# configuration is compiled and timed once per tuning key, and the rope / window variants take tens of
# seconds each to compile.
SPACE = [
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2),
    (128, 32, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (32, 128, 4, 2), (32, 128, 8, 2),
    (32, 32, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2),  # short groups (temporal: T frames)
]


def keep(config: triton.Config) -> bool:
    """Configurations worth timing at all: a 128 x 128 score tile needs 8 warps (4 only for the TMA
    path, whose warp specialization adds a producer warpgroup; _prune keeps it there only); tiny tiles 4."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    tma_tile = bm == bn == 128 and config.num_warps == 4
    if bm * bn >= 128 * 128 and config.num_warps < 8 and not tma_tile:
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
# (128, 128, 4, 2) is the TMA forward's: warp-specialized, a producer warpgroup beside two consumer ones.
QUICK_SPACE = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 4, 2), (64, 64, 4, 3), (32, 128, 8, 2), (32, 32, 4, 2),
               (16, 16, 4, 2)]
SINGLE_SPACE = [(64, 64, 4, 2), (128, 128, 4, 2), (16, 16, 4, 2)]


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
    args = {**named_args, **kwargs}
    # the TMA forward's warp specialization needs 4 warps and wants 128 x 128; no other launch takes that tile
    tma_tile = [c for c in configs if c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 128 and c.num_warps == 4]
    if args.get("TMA", False) and tma_tile:
        return tma_tile
    configs = [c for c in configs if c not in tma_tile] or configs
    block_d = args.get("BLOCK_D0", 64) + args.get("BLOCK_D1", 0)  # the head dim as the matrix units see it
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
_attn_fwd = triton.autotune(_configs(), key=TUNING_KEY + ["TMA", "WARP_SPECIALIZE"], prune_configs_by=_PRUNE)(
    _attn_fwd_kernel)
# DQ_ATOMIC adds into DQA_ptr: zeroed again before each configuration the tuner times
_attn_bwd_dkdv = triton.autotune(_configs(), key=TUNING_KEY + ["DQ_ATOMIC"], prune_configs_by=_PRUNE,
                                 reset_to_zero=["DQA_ptr"])(_attn_bwd_dkdv_kernel)
_attn_bwd_dq = triton.autotune(_configs(), key=TUNING_KEY, prune_configs_by=_PRUNE)(_attn_bwd_dq_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers. Arguments are validated by dit_fast.ops.attention; grid, window, window_tile and rope_split
# are lists ([] when absent), as the custom ops pass them. They return plain tensors; autograd lives in
# dit_fast/ops/flash_attention.py.
# ---------------------------------------------------------------------------------------------


def head_chunks(head_dim: int, halves: bool = False):
    """(BLOCK_D0, BLOCK_D1): the head dim as two power-of-two chunks for the matrix units, the second 0
    when one chunk is as small (attention_common.py: HEAD DIM). 72 -> (64, 16), 80 -> (64, 16),
    96 -> (64, 32), 40 -> (32, 16), 64 -> (64, 0), 112 -> (128, 0) (64 + 64 saves nothing).

    halves: a single chunk of 128 or more splits in two (128 -> (64, 64)), the same products in two
    halves: the one-pass backward's transient dq^T tile is then half as tall, which keeps its 32 x 128
    tiles spill-free at D = 128 (sm_90a: 251 registers, 0 spill instructions; 10 with one chunk)."""
    width = -(-head_dim // 16) * 16  # the matrix units' K and N step
    whole = triton.next_power_of_2(width)
    if width == whole:
        return (whole // 2, whole // 2) if halves and whole >= 128 else (whole, 0)
    first = whole // 2
    second = triton.next_power_of_2(width - first)
    return (whole, 0) if first + second >= whole else (first, second)


BWD_ENV = "DIT_FAST_ATTENTION_BWD"  # "atomic": the one-pass backward (dq by atomic adds) by default


def deterministic_backward(deterministic=None) -> bool:
    """The backward to run: True (default) the two-kernel one, bitwise reproducible; False the one-pass
    FA3-style one (dq accumulated by fp32 atomic adds, 5 matrix products per tile pair instead of 7).
    None reads $DIT_FAST_ATTENTION_BWD ("atomic" or "deterministic"). Opt-in until a GPU run has
    passed its tests (benchmarks/NOTES.md)."""
    if deterministic is not None:
        return bool(deterministic)
    choice = os.environ.get(BWD_ENV, "deterministic").strip().lower()
    if choice not in ("atomic", "deterministic", ""):
        raise ValueError(f"{BWD_ENV} must be 'atomic' or 'deterministic', got {choice!r}")
    return choice != "atomic"


FWD_ENV = "DIT_FAST_ATTENTION_FWD"  # "tma": the Hopper forward by default


def tma_forward(tma=None) -> bool:
    """Whether the forward should take the TMA path where it can: True, False, or None for
    $DIT_FAST_ATTENTION_FWD ("tma" or "pointer"; default "pointer"). Opt-in until a GPU run has passed
    its tests (benchmarks/NOTES.md)."""
    if tma is not None:
        return bool(tma)
    choice = os.environ.get(FWD_ENV, "pointer").strip().lower()
    if choice not in ("tma", "pointer", ""):
        raise ValueError(f"{FWD_ENV} must be 'tma' or 'pointer', got {choice!r}")
    return choice == "tma"


def _tma_device(device) -> bool:
    """TMA and device-side descriptors: Hopper and later, or the interpreter (which emulates them)."""
    if _backend.triton_interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


_allocator_set = False


def _set_descriptor_allocator():
    """Device-side tensor descriptors live in global scratch memory that Triton asks its allocator for."""
    global _allocator_set
    if not _allocator_set and not _backend.triton_interpreting():
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True


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
        with torch.inference_mode(False):  # a cache: ordinary tensors even if first built under inference_mode
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
    tiles = [triton.cdiv(n, t) for n, t in zip(grid, window_tile, strict=True)]
    return tiles[0] * tiles[1] * tiles[2] * window_tile[0] * window_tile[1] * window_tile[2]


def _divisible_tile(low, high, multiple=16):
    """The smallest-volume tile (tt, th, tw) with low <= tile <= high on every axis and a volume that is a
    multiple of `multiple` (high has one). Along an axis only the smallest value >= low divisible by
    each power of two up to `multiple` is worth trying."""
    def candidates(lo, hi):
        values = {hi}
        for power in (1, 2, 4, 8, 16):
            x = -(-lo // power) * power
            if x <= hi:
                values.add(x)
        return sorted(values)

    best = tuple(high)
    for t in candidates(low[0], high[0]):
        for h in candidates(low[1], high[1]):
            for w in candidates(low[2], high[2]):
                if (t * h * w) % multiple == 0 and t * h * w < best[0] * best[1] * best[2]:
                    best = (t, h, w)
    return best


def effective_window(grid, window, window_tile):
    """(window, window_tile) as the kernels run them: the same mask as given (spacetime_mask), never more
    work than dense attention, and with a tile never much more than the tokens it holds.

    A tile longer than the grid along an axis is one tile there: the window sees the whole axis, and the
    kernels would visit the tile's holes. Where along every axis the tile rule is a token rule (a tile of
    one token, one tile over the axis, or a window of every tile), it runs as a token window ([], [] when
    that window is the whole grid: dense attention). Otherwise a tile longer than an axis shrinks towards
    it (the window keeps its count of tiles, every token its tile coordinate), to the smallest volume that
    is still a multiple of 16 tokens."""
    if len(window) != 3:
        return [], []
    if len(window_tile) != 3:
        return ([], []) if list(window) == list(grid) else (list(window), [])
    tiles = [-(-n // t) for n, t in zip(grid, window_tile, strict=True)]
    in_tiles = [w // t for w, t in zip(window, window_tile, strict=True)]
    # per axis: the token window the tile rule amounts to, or None where it is no token rule
    as_tokens = [w if t == 1 else n if (k == 1 or kept == k) else None
                 for n, t, w, k, kept in zip(grid, window_tile, window, tiles, in_tiles, strict=True)]
    if None not in as_tokens:
        return effective_window(grid, as_tokens, [])
    # an axis shorter than its tile may take any tile length from the axis' to the tile's: one tile either way
    tile = _divisible_tile([min(n, t) for n, t in zip(grid, window_tile, strict=True)], window_tile)
    return [w * t for w, t in zip(in_tiles, tile, strict=True)], list(tile)


def _common_args(q, k, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split, tensors):
    B, Sq, heads, D = q.shape
    window, window_tile = effective_window(grid, window, window_tile)
    Sk = k.shape[1]
    groups, lq, group_stride, token_stride = group_layout(mode, grid, Sq)
    lk = Sk if mode == "full" else lq
    block_d0, block_d1 = head_chunks(D)
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
    if key_padding_mask is not None:  # (B, Sk), or per head (B, heads, Sk): head stride 0 for the first
        kpm = _lastdim_contiguous(key_padding_mask).view(torch.uint8)  # bool -> bytes, no copy
        mask_strides = (kpm.stride(0), kpm.stride(1) if kpm.dim() == 3 else 0)
    else:
        kpm, mask_strides = q.new_empty(0, dtype=torch.uint8), (0, 0)
    scalars = (heads, groups, Sq, lq, lk, group_stride, token_stride, T, H, W, wt, wh, ww, dt2, dth2, D)
    flags = dict(BLOCK_D0=block_d0, BLOCK_D1=block_d1, HAS_ROPE=has_rope, HAS_MASK=key_padding_mask is not None,
                 WINDOW=len(window) == 3 and not tiled, TILED=tiled, TILE_T=tt, TILE_H=th, TILE_W=tw,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                 OFFS_64=FORCE_INT64_OFFSETS or _group_extent(tensors, lq, lk, token_stride) >= 2**31,
                 ALIGNED=aligned_16(tensors, D))
    return kpm, rope_table, mask_strides, scalars, (B * heads * groups, lq, lk), flags


def attention_forward(q, k, v, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split, scale,
                      tma=None):
    """Returns (out (B, Sq, heads, D) contiguous, lse (B, heads, Sq) fp32, natural log)."""
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    B, Sq, heads, D = q.shape
    out = torch.empty((B, Sq, heads, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, heads, Sq), device=q.device, dtype=torch.float32)
    kpm, rope_table, mask_strides, scalars, (programs, lq, lk), flags = _common_args(
        q, k, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split, (q, k, v))
    # TMA where it applies: dense tiles (full, spatial, temporal; not windows, RoPE in the kernel), 16-bit
    # data with 16-byte aligned rows, a Hopper GPU; the warp-specialized loop also needs no padding mask
    use_tma = (tma_forward(tma) and _tma_device(q.device) and q.dtype in (torch.float16, torch.bfloat16)
               and flags["ALIGNED"] and not (flags["TILED"] or flags["WINDOW"] or flags["HAS_ROPE"]))
    if use_tma:
        _set_descriptor_allocator()
    _attn_fwd[lambda meta: (programs * triton.cdiv(lq, meta["BLOCK_M"]),)](
        q, k, v, out, lse, kpm, rope_table,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *mask_strides, *scalars, float(scale), _bucket(lq), _bucket(lk), TMA=use_tma,
        WARP_SPECIALIZE=use_tma and not flags["HAS_MASK"], **flags)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, key_padding_mask, grid, mode, window, window_tile, rope_theta,
                       rope_split, scale, deterministic=None):
    """Returns (dq, dk, dv), contiguous (B, S, heads, D) in the input dtype. deterministic: see
    deterministic_backward."""
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
    atomic = not deterministic_backward(deterministic)
    # the one-pass backward's fp32 dq sums, (B, Sq, heads, D) like q (its group and tile layout)
    dqa = torch.zeros((B, Sq, heads, D) if atomic else (0, 0, 0, 0), device=q.device, dtype=torch.float32)
    # ALIGNED promises 16-byte rows of every tensor the kernels address with it (the fp32 dq sums included)
    kpm, rope_table, mask_strides, scalars, (programs, lq, lk), flags = _common_args(
        q, k, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split,
        (q, k, v, dout, dqa) if atomic else (q, k, v, dout))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    tail = (*mask_strides, *scalars, float(scale), _bucket(lq), _bucket(lk))
    dkdv_flags = dict(flags)
    if atomic:
        dkdv_flags["BLOCK_D0"], dkdv_flags["BLOCK_D1"] = head_chunks(D, halves=True)
    _attn_bwd_dkdv[lambda meta: (programs * triton.cdiv(lk, meta["BLOCK_N"]),)](
        q, k, v, dout, lse, delta, dk, dv, dqa, kpm, rope_table, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dqa.stride(0), dqa.stride(1), dqa.stride(2), *tail,
        DQ_ATOMIC=atomic, **dkdv_flags)
    if not atomic:
        _attn_bwd_dq[lambda meta: (programs * triton.cdiv(lq, meta["BLOCK_M"]),)](
            q, k, v, dout, lse, delta, dq, kpm, rope_table, *strides,
            dq.stride(0), dq.stride(1), dq.stride(2), *tail, **flags)
        return dq, dk, dv
    T, H, W = grid if len(grid) == 3 else (1, 1, 1)
    dt2, dth2 = scalars[-3], scalars[-2]
    block_m = 16 if _backend.triton_interpreting() else 64
    _attn_bwd_dq_convert_kernel[(B * heads * triton.cdiv(Sq, block_m),)](
        dqa, dq, rope_table, heads, Sq, T, H, W, dt2, dth2, float(scale), D, BLOCK_M=block_m,
        BLOCK_D0=flags["BLOCK_D0"], BLOCK_D1=flags["BLOCK_D1"], HAS_ROPE=flags["HAS_ROPE"],
        OFFS_64=Sq * heads * D >= 2**31, ALIGNED=aligned_16((dq, dqa), D), num_warps=4)
    return dq, dk, dv
