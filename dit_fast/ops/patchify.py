"""3D patchify / unpatchify: video (B, C, T, H, W) <-> patch tokens (B, S, K).

    patchify_3d(video, patch)                        -> tokens (B, S, K)
    unpatchify_3d(tokens, patch, grid)               -> video (B, C, T, H, W), the exact inverse
    unpatchify_3d(tokens, patch, grid, order="thwc") -> from DiT's final-layer layout

With patch = (pt, ph, pw), the token grid is (T', H', W') = (T / pt, H / ph, W / pw), S = T' H' W' in
(t, h, w) raster order (the order dit_fast.ops.rope assumes), and K = C pt ph pw. Token s holds the
patch video[:, :, t' pt : (t'+1) pt, h' ph : (h'+1) ph, w' pw : (w'+1) pw], its K features flattened
in one of two orders:
  "cthw": (C, pt, ph, pw), exactly as ``Conv3d(C, D, kernel_size=patch, stride=patch).weight.reshape(D, -1)``,
          so ``tokens @ weight.reshape(D, -1).T + bias`` is the Conv3d patch embedding (the default of both,
          so that ``unpatchify_3d(patchify_3d(v, p), p, grid) == v``);
  "thwc": (pt, ph, pw, C), the layout of DiT's final layer, whose ``unpatchify`` reshapes to
          (N, h, w, p, p, c) and permutes 'nhwpqc->nchpwq' (pass order="thwc", as DiTVideo does).
Both are pure permutations: with the same order, each function is the other's exact inverse, and the
backward of one is the other.

Call flow as in dit_fast/ops/adaln.py: "torch" runs the references below; kernels run under the custom
ops torch.ops.dit_fast.patchify_3d / unpatchify_3d -> dit_fast/triton_kernels/patchify.py or
dit_fast/cuda/patchify.py (csrc/patchify.cu).
"""

import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dit_fast import _backend

OP = "patchify_3d"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ORDERS = ("cthw", "thwc")
CUDA_MAX_TOKEN_BYTES = 32768  # csrc/patchify.h: one token (+16 bytes) must fit the CUDA kernel's slab


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch). The CPU path, the oracle of the tests, and backend="torch".
# ---------------------------------------------------------------------------------------------


def patchify_3d_reference(video: Tensor, patch: Sequence[int], order: str = "cthw") -> Tensor:
    """(B, C, T, H, W) -> (B, S, K) tokens, features in ``order``."""
    B, C, T, H, W = video.shape
    pt, ph, pw = patch
    x = video.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)  # (B, C, T', pt, H', ph, W', pw)
    if order == "cthw":
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, pt, ph, pw)
    else:
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', H', W', pt, ph, pw, C)
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify_3d_reference(tokens: Tensor, patch: Sequence[int], grid: Sequence[int], order: str = "cthw") -> Tensor:
    """(B, S, K) tokens of a (T', H', W') grid -> (B, C, T' pt, H' ph, W' pw), C = K / (pt ph pw)."""
    B, S, K = tokens.shape
    pt, ph, pw = patch
    Tg, Hg, Wg = grid
    C = K // (pt * ph * pw)
    if order == "cthw":
        x = tokens.reshape(B, Tg, Hg, Wg, C, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    else:
        x = tokens.reshape(B, Tg, Hg, Wg, pt, ph, pw, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, C, Tg * pt, Hg * ph, Wg * pw)  # (B, C, T, H, W)


# ---------------------------------------------------------------------------------------------
# Input checks: clear ValueError / TypeError naming the argument and the shapes.
# ---------------------------------------------------------------------------------------------


def _check_triple(name: str, value) -> Tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value, value)
    try:
        if any(isinstance(v, bool) for v in value):
            raise TypeError
        values = tuple(operator.index(v) for v in value)  # ints, numpy ints, 0-d integer tensors
    except TypeError:
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {value!r}") from None
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {value!r}")
    return values


def _check_order(order):
    if order not in ORDERS:
        raise ValueError(f"order must be 'cthw' (Conv3d weight layout) or 'thwc' (DiT final layer layout), got {order!r}")


def _check_float(name: str, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_video(video, patch):
    _check_float("video", video)
    if video.dim() != 5:
        raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(video.shape)}")
    dims = tuple(video.shape[2:])
    if any(d % p for d, p in zip(dims, patch)):
        raise ValueError(f"video (T, H, W) = {dims} (shape {tuple(video.shape)}) is not divisible by patch {patch}")


def _check_tokens(tokens, patch, grid, video_shape):
    _check_float("tokens", tokens)
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, S, K), got shape {tuple(tokens.shape)}")
    B, S, K = tokens.shape
    volume = patch[0] * patch[1] * patch[2]
    if (grid is None) == (video_shape is None):
        raise ValueError("unpatchify_3d needs exactly one of grid=(T', H', W') (the token grid) and "
                         "video_shape=(T, H, W) or (B, C, T, H, W)")
    if video_shape is not None:
        shape = tuple(video_shape)
        if len(shape) not in (3, 5):
            raise ValueError(f"video_shape must be (T, H, W) or (B, C, T, H, W), got {shape!r}")
        dims = _check_triple("video_shape (T, H, W)", shape[-3:])
        if any(d % p for d, p in zip(dims, patch)):
            raise ValueError(f"video_shape (T, H, W) = {dims} is not divisible by patch {patch}")
        if len(shape) == 5 and (shape[0] != B or shape[1] * volume != K):
            raise ValueError(f"video_shape {shape} needs tokens (B, S, C * pt * ph * pw) = "
                             f"({shape[0]}, S, {shape[1] * volume}), got {tuple(tokens.shape)}")
        grid = tuple(d // p for d, p in zip(dims, patch))
        if grid[0] * grid[1] * grid[2] != S:
            raise ValueError(f"video_shape {shape} cut into patches {patch} has {grid[0] * grid[1] * grid[2]} tokens "
                             f"but tokens {tuple(tokens.shape)} has S = {S}")
    grid = _check_triple("grid", grid)
    if grid[0] * grid[1] * grid[2] != S:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1] * grid[2]} tokens but tokens {tuple(tokens.shape)} has S = {S}")
    if K % volume:
        raise ValueError(f"tokens have K = {K} features (shape {tuple(tokens.shape)}), not a multiple of "
                         f"the patch volume pt * ph * pw = {volume} for patch {patch}")
    return grid


# ---------------------------------------------------------------------------------------------
# Kernel dispatch and torch.library registration.
# ---------------------------------------------------------------------------------------------


def _launchers(backend: str):
    if backend == "triton":
        from dit_fast.triton_kernels import patchify
    elif backend == "cuda":
        from dit_fast.cuda import patchify
    else:
        raise ValueError(f"no patchify kernels for backend {backend!r}")
    return patchify


def _pick(backend: str, like: Tensor, direction: str, patch_volume: int, run) -> str:
    if backend != "auto":
        return backend
    names = _backend.runnable_kernel_backends(like.device)
    K = like.shape[1] * patch_volume if direction == "patchify" else like.shape[2]
    if "cuda" in names and len(names) > 1 and K * like.element_size() + 16 > CUDA_MAX_TOKEN_BYTES:
        names = tuple(n for n in names if n != "cuda")  # one token must fit the CUDA kernel's slab
    key = (direction, like.element_size(), _backend.shape_class(like.numel()))
    return _backend.pick_fastest(OP, key, {n: (lambda n=n: run(n)) for n in names})


@torch.library.custom_op("dit_fast::patchify_3d", mutates_args=())
def _patchify_3d(video: Tensor, patch: List[int], order: str, backend: str) -> Tensor:
    def run(name):
        return _launchers(name).patchify_3d(video, tuple(patch), order == "thwc")

    return run(_pick(backend, video, "patchify", patch[0] * patch[1] * patch[2], run))


@_patchify_3d.register_fake
def _patchify_3d_fake(video, patch, order, backend):
    B, C, T, H, W = video.shape
    pt, ph, pw = patch
    return video.new_empty((B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw))


@torch.library.custom_op("dit_fast::unpatchify_3d", mutates_args=())
def _unpatchify_3d(tokens: Tensor, patch: List[int], grid: List[int], order: str, backend: str) -> Tensor:
    def run(name):
        return _launchers(name).unpatchify_3d(tokens, tuple(patch), tuple(grid), order == "thwc")

    return run(_pick(backend, tokens, "unpatchify", patch[0] * patch[1] * patch[2], run))


@_unpatchify_3d.register_fake
def _unpatchify_3d_fake(tokens, patch, grid, order, backend):
    B, S, K = tokens.shape
    pt, ph, pw = patch
    return tokens.new_empty((B, K // (pt * ph * pw), grid[0] * pt, grid[1] * ph, grid[2] * pw))


# A permutation's gradient is the inverse permutation: the backward of a gather is its scatter.


def _patchify_setup_context(ctx, inputs, output):
    video, ctx.patch, ctx.order, ctx.backend = inputs
    ctx.grid = [d // p for d, p in zip(video.shape[2:], ctx.patch)]


def _patchify_backward(ctx, grad):
    return torch.ops.dit_fast.unpatchify_3d(grad, ctx.patch, ctx.grid, ctx.order, ctx.backend), None, None, None


def _unpatchify_setup_context(ctx, inputs, output):
    _, ctx.patch, _, ctx.order, ctx.backend = inputs


def _unpatchify_backward(ctx, grad):
    return torch.ops.dit_fast.patchify_3d(grad, ctx.patch, ctx.order, ctx.backend), None, None, None, None


_patchify_3d.register_autograd(_patchify_backward, setup_context=_patchify_setup_context)
_unpatchify_3d.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions (re-exported by dit_fast.ops).
# ---------------------------------------------------------------------------------------------


def patchify_3d(video: Tensor, patch: Sequence[int], *, order: str = "cthw", backend: str = "auto") -> Tensor:
    """video (B, C, T, H, W) -> patch tokens (B, S, C * pt * ph * pw), S = (T/pt)(H/ph)(W/pw).

    ``order="cthw"`` (default) flattens each patch like a Conv3d weight, so ``tokens @ W.reshape(D, -1).T``
    equals ``Conv3d(kernel_size=patch, stride=patch)`` flattened to tokens; ``order="thwc"`` puts
    channels last. ``patch`` is (pt, ph, pw) or one int. Any input strides; contiguous result.
    """
    patch = _check_triple("patch", patch)
    _check_order(order)
    _check_video(video, patch)
    name = _backend.resolve_backend(backend, video.device, OP, implemented=("triton", "cuda"))
    if name == "torch":
        return patchify_3d_reference(video, patch, order)
    return torch.ops.dit_fast.patchify_3d(video, list(patch), order, name)


def unpatchify_3d(tokens: Tensor, patch: Sequence[int], grid: Optional[Sequence[int]] = None, *,
                  video_shape: Optional[Sequence[int]] = None, order: str = "cthw",
                  backend: str = "auto") -> Tensor:
    """patch tokens (B, S, K) -> video (B, C, T, H, W), the exact inverse of ``patchify_3d`` (same order).

    Give the token ``grid`` (T', H', W') = (T/pt, H/ph, W/pw), or ``video_shape`` (T, H, W) or
    (B, C, T, H, W). ``order="cthw"`` (default, as ``patchify_3d``) reads features as (C, pt, ph, pw);
    ``order="thwc"`` as (pt, ph, pw, C), DiT's final-layer layout. C = K / (pt ph pw).
    """
    patch = _check_triple("patch", patch)
    _check_order(order)
    grid = _check_tokens(tokens, patch, grid, video_shape)
    name = _backend.resolve_backend(backend, tokens.device, OP, implemented=("triton", "cuda"))
    if name == "torch":
        return unpatchify_3d_reference(tokens, patch, grid, order)
    return torch.ops.dit_fast.unpatchify_3d(tokens, list(patch), list(grid), order, name)
