"""The argument checks of the attention op family, and its backend resolution.

Shared by the public functions (dit_fast/ops/flash_attention.py), the "auto" planner
(dit_fast/ops/attention_planner.py) and the ring-attention blocks (dit_fast/parallel/attention_parts.py),
so that each of them imports this module and none imports another for its checks: flash_attention
imports the planner, never the reverse. Each check raises a ValueError / TypeError naming the argument
and the shapes. Private to the family (leading underscores): the names are not API.
"""

import math

import torch
from torch import Tensor

from dit_fast import _backend

OP = "attention"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)  # float64: backend="torch" only (test oracles)
MODES = ("full", "spatial", "temporal")
MAX_HEAD_DIM = 256  # any head dim 1..256: the kernels take it in power-of-two chunks of at least 16 columns


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, S, heads, D), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    B, Sq, heads, D = q.shape
    if k.shape[0] != B or k.shape[2] != heads or k.shape[3] != D:
        raise ValueError(f"k must be (B, Sk, heads, D) = ({B}, Sk, {heads}, {D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} (mismatched batch, heads or head dim)")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D = {D} (q {tuple(q.shape)}) is not supported: D must be in [1, {MAX_HEAD_DIM}] "
                         f"(any integer: 8, 10, 72, 128, ...)")
    if Sq == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k need at least one token, got q {tuple(q.shape)} and k {tuple(k.shape)}")


def _check_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    # scores are scaled in fp32: below float32's tiny the scale is 0; above 1e4, scale * log2(e) * q.k overflows
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.1754944e-38 <= scale <= 1e4:
        raise ValueError(f"scale must be a positive finite number in [1.18e-38, 1e4] or None, got {scale!r}")
    return float(scale)


def _check_key_padding_mask(mask, q, k):
    """The key padding mask as given: None, bool (B, Sk), or bool per head (B, heads, Sk)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = attend), got {mask.dtype}")
    B, Sk, heads = k.shape[0], k.shape[1], k.shape[2]
    if mask.shape != (B, Sk) and mask.shape != (B, heads, Sk):
        raise ValueError(f"key_padding_mask must be (B, Sk) = ({B}, {Sk}) or per head (B, heads, Sk) = "
                         f"({B}, {heads}, {Sk}) for k {tuple(k.shape)}, got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {q.device}")
    return mask


def _check_grid(grid, q, k):
    if not isinstance(grid, (tuple, list)) or len(grid) != 3 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
        raise ValueError(f"grid must be three positive ints (T, H, W), got {grid!r}")
    S = q.shape[1]
    if grid[0] * grid[1] * grid[2] != S:
        raise ValueError(f"grid {tuple(grid)} has {grid[0] * grid[1] * grid[2]} tokens but q {tuple(q.shape)} has "
                         f"S = {S}")
    if k.shape[1] != S:
        raise ValueError(f"spacetime_attention is self-attention over the grid: k {tuple(k.shape)} must have the "
                         f"S = {S} tokens of q {tuple(q.shape)} (use attention() for cross-attention)")
    return [int(n) for n in grid]


def _check_mode_window(mode, window, grid, window_tile=None):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if window_tile is not None and mode != "full":
        raise ValueError(f"window_tile needs mode='full', got mode={mode!r}")
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 3 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in window):
        raise ValueError(f"window must be three positive ints (wt, wh, ww), got {window!r}")
    if mode != "full":
        raise ValueError(f"window needs mode='full' (got mode={mode!r}); a spatial window is window=(1, wh, ww), "
                         f"a temporal one window=(wt, 1, 1)")
    if window_tile is None and any(w > n for w, n in zip(window, grid, strict=True)):
        raise ValueError(f"window {tuple(window)} is larger than the grid {tuple(grid)} along some axis")
    return [int(w) for w in window]


def _check_window_tile(window_tile, window, grid):
    """window_tile=(tt, th, tw): the window counted in 3D tiles (run after _check_mode_window)."""
    if window_tile is None:
        return None
    if not isinstance(window_tile, (tuple, list)) or len(window_tile) != 3 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in window_tile):
        raise ValueError(f"window_tile must be three positive ints (tt, th, tw), got {window_tile!r}")
    if window is None:
        raise ValueError(f"window_tile {tuple(window_tile)} needs a window (wt, wh, ww) in tokens, a multiple of "
                         "the tile along each axis")
    if any(w % t for w, t in zip(window, window_tile, strict=True)):
        raise ValueError(f"window {tuple(window)} must be a multiple of window_tile {tuple(window_tile)} along "
                         "each axis")
    tiles = tuple(-(-n // t) for n, t in zip(grid, window_tile, strict=True))
    in_tiles = tuple(w // t for w, t in zip(window, window_tile, strict=True))
    if any(w > n for w, n in zip(in_tiles, tiles, strict=True)):
        raise ValueError(f"window {tuple(window)} is {in_tiles} tiles of {tuple(window_tile)}, larger than the grid "
                         f"{tuple(grid)} in tiles {tiles} along some axis")
    volume = window_tile[0] * window_tile[1] * window_tile[2]
    if volume % 16:
        raise ValueError(f"window_tile {tuple(window_tile)} has {volume} tokens: the kernels need a multiple of 16 "
                         "(e.g. (1, 4, 4), (2, 4, 8), (4, 8, 8))")
    return [int(t) for t in window_tile]


def _check_kernel_options(deterministic, tma):
    for name, value in (("deterministic", deterministic), ("tma", tma)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True, False or None (the environment's choice), got {value!r}")


def _resolve(backend, q) -> str:
    """The backend an attention call runs: "torch" (the reference), "triton" (our kernel) or "auto" (on a
    GPU: our kernel or torch's own best, chosen by dit_fast/ops/attention_planner.py). "auto" reaches
    the planner whenever a GPU can run our kernel (_backend.resolve_backend with planned=True)."""
    name = _backend.resolve_backend(backend, q.device, OP, implemented=("triton",), planned=True)
    if name == "auto" and q.dtype not in FLOAT_DTYPES:
        return "torch"  # float64 on a GPU: only the reference takes it
    if name != "torch" and q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16 for the {name} kernels, got {q.dtype} "
                        "(float64 runs with backend='torch')")
    return name


def _resolve_kernel(backend, q) -> str:
    """"torch" or "triton", never "auto": for callers that need our kernel's own outputs (the log-sum-exp
    blocks of ring attention, dit_fast/parallel/attention_parts.py), where torch has no candidate."""
    name = _resolve(backend, q)
    return "triton" if name == "auto" else name
