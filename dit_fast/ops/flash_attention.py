"""Attention over video tokens: reference, input checks, torch.library registration, public functions.

    attention(q, k, v, key_padding_mask=...)            dense self / cross attention (Sq != Sk); the mask
                                                        (B, Sk), or per head (B, heads, Sk)
    spacetime_attention(q, k, v, grid, mode=..., window=..., window_tile=..., rope=...)
        mode="full"      every token attends to every token of the video
        mode="spatial"   each token attends within its own frame
        mode="temporal"  each token attends to the tokens at its (h, w) in every frame
        window=(wt, wh, ww)  3D local attention (mode="full"): along each axis a token at p sees the w
                         positions starting at clamp(p - (w - 1) // 2, 0, n - w), a centred window shifted
                         inside the grid at the borders (so w = n means the whole axis)
        window_tile=(tt, th, tw)  with window: the window counted in 3D tiles (Sliding Tile Attention).
                         The grid is cut into tiles of tt x th x tw tokens (partial at the edges); the
                         tile at tile coordinate a sees the key tiles starting at clamp(a - (W - 1) // 2,
                         0, n_tiles - W), W = w // t tiles, along each axis, and every token of them.
                         w must be a multiple of t, W <= ceil(n / t), tt * th * tw a multiple of 16
        rope="3d" | RoPE3D(theta, split)  3D rotary embedding of q and k (dit_fast/ops/rope.py's
                         convention), fused into the kernels

q, k, v are (B, S, heads, D) as in flash-attn; video tokens in (t, h, w) raster order, S = T * H * W.
The kernels read spatial and temporal groups in place through strides (no permute, no copy).

Call flow: public function (validation, backend choice) -> "torch": the reference below, differentiated
by PyTorch; "triton": torch.ops.dit_fast.attention_fwd / attention_bwd (custom ops with fake kernels and
registered autograd, opaque to torch.compile) -> the launchers in dit_fast/triton_kernels/attention.py.
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from dit_fast.ops._attention_checks import (  # noqa: F401  (MODES, MAX_HEAD_DIM: dit_fast.nn, the diffusers backend)
    FLOAT_DTYPES, MAX_HEAD_DIM, MODES, REFERENCE_DTYPES, _check_grid, _check_kernel_options, _check_key_padding_mask,
    _check_mode_window, _check_qkv, _check_scale, _check_window_tile, _resolve)
from dit_fast.ops.attention_planner import Call as _PlanCall, auto as _auto_plan
from dit_fast.ops.rope import RoPE3D, apply_rope_3d, apply_rope_3d_reference, as_rope, grid_positions, rope_split


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch). The CPU path, the oracle of the tests, and backend="torch".
# ---------------------------------------------------------------------------------------------


def window_span(pos: Tensor, size: int, length: int) -> Tensor:
    """First position of the length-``size`` window around ``pos`` on an axis of ``length``."""
    return (pos - (size - 1) // 2).clamp(0, length - size)


def spacetime_mask(grid: Sequence[int], mode: str = "full", window: Optional[Sequence[int]] = None,
                   device=None, window_tile: Optional[Sequence[int]] = None) -> Tensor:
    """(S, S) bool: True where query token i may attend to key token j.

    window_tile=(tt, th, tw): the window is counted in 3D tiles (Sliding Tile Attention): a key is
    visible when its tile lies in the window of (wt // tt, wh // th, ww // tw) tiles around the query's
    tile, by the same centred-and-shifted rule on the tile grid (ceil(T / tt), ceil(H / th), ceil(W / tw))."""
    pos = grid_positions(grid, device)  # (S, 3) = (t, h, w) per token
    q, k = pos[:, None, :], pos[None, :, :]  # (S, 1, 3), (1, S, 3)
    if mode == "spatial":
        mask = q[..., 0] == k[..., 0]  # same frame
    elif mode == "temporal":
        mask = (q[..., 1] == k[..., 1]) & (q[..., 2] == k[..., 2])  # same (h, w)
    else:
        mask = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=device)
    if window is not None:
        lengths = list(grid)
        if window_tile is not None:  # the same window rule, on tile coordinates and in tiles
            tile = torch.tensor(window_tile, device=pos.device)
            q, k = q // tile, k // tile
            window = [w // t for w, t in zip(window, window_tile, strict=True)]
            lengths = [-(-n // t) for n, t in zip(grid, window_tile, strict=True)]  # tiles per axis, edge tiles partial
        for axis, (size, length) in enumerate(zip(window, lengths, strict=True)):
            start = window_span(q[..., axis], size, length)  # (S, 1)
            mask = mask & (k[..., axis] >= start) & (k[..., axis] < start + size)
    return mask


def _hide_masked(k: Tensor, v: Tensor, mask: Tensor):
    """Masked keys must not influence anything, not even through 0 * NaN.

    A matrix product cannot skip a masked (query, key) pair: a probability of exactly 0 times a
    non-finite key or value is NaN. So every key row holding a non-finite k or v value is zeroed
    (torch.where, a select) before the products, and the queries that can see such a key are
    reported, to return NaN themselves: garbage a query may see still shows, garbage hidden from it
    never does. k, v: (B, Sk, heads, D); mask broadcastable to (B, heads, Sq, Sk).
    Returns (k, v, sees_bad (B, heads, Sq, 1) bool)."""
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Sk, heads)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    k, v = torch.where(bad[..., None], zero, k), torch.where(bad[..., None], zero, v)
    bad_keys = bad.transpose(1, 2)[..., None].to(torch.float32)  # (B, heads, Sk, 1)
    sees_bad = (mask.to(torch.float32) @ bad_keys) > 0  # (B, heads, Sq, 1): a visible bad key
    return k, v, sees_bad


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                        mask: Optional[Tensor] = None, return_lse: bool = False):
    """softmax(scale * q k^T, masked) v with SDPA. q: (B, Sq, heads, D), k and v: (B, Sk, heads, D).

    mask: bool, broadcastable to (B, heads, Sq, Sk), True = attend. A query with no visible key gets
    zeros (and lse = -inf). A masked key has no influence at all, forward or backward, whatever its
    values (NaN, inf: see _hide_masked); a query that sees a non-finite key or value returns NaN
    (its whole row, and its lse). Returns out (B, Sq, heads, D), or (out, lse (B, heads, Sq) fp32).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sees_bad = None
    if mask is not None:
        k, v, sees_bad = _hide_masked(k, v, mask)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, D)
    if mask is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        has_key = mask.any(dim=-1, keepdim=True)  # (..., Sq, 1)
        # rows with no key attend to everything, then are zeroed: no NaN forward or backward
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask | ~has_key, scale=scale)
        out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
        out = torch.where(sees_bad, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
    out = out.transpose(1, 2)
    if not return_lse:
        return out
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (qh.to(compute) @ kh.to(compute).transpose(-1, -2)) * scale  # (B, heads, Sq, Sk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1).float().detach()
    if mask is not None:
        lse = torch.where(sees_bad[..., 0], float("nan"), lse)
    return out, lse


def attention_backward_reference(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, *,
                                 scale: Optional[float] = None, mask: Optional[Tensor] = None):
    """The attention backward spelled out, from the forward's out and lse (flash attention's recompute).

    q: (B, Sq, heads, D); k, v: (B, Sk, heads, D); out, dout: (B, Sq, heads, D); lse: (B, heads, Sq),
    natural log, -inf for a query without a visible key; mask as in attention_reference (None: every
    key visible). out and lse may come from a merge over several key shards (ring attention): then
    this returns the gradients through the keys given here, and dq summed over the shards is the full
    dq. With s = scale * q k^T:

        P = exp(s - lse), 0 where masked       dV = P^T dO          dP = dO V^T
        dS = P * (dP - rowsum(dO * O))         dQ = scale dS K      dK = scale dS^T Q

    Computed in float32 (float64 inputs: float64); returns (dq, dk, dv) in the dtypes and layout of
    q, k, v. Masked keys get zero gradients and pass nothing on, whatever their values (_hide_masked).
    Rows that pass no gradient at all, as in attention_reference's autograd and the kernels: a query
    without a visible key (lse = -inf) and one that saw a non-finite key or value (lse NaN, or a
    non-finite out row): P = 0 and rowsum(dO * O) = 0 there, so that 0 * (dP - NaN) never carries the
    row's NaN to the keys hidden from it.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mask is not None:
        k, v, _ = _hide_masked(k, v, mask)
    compute = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh, oh, doh = (t.transpose(1, 2).to(compute) for t in (q, k, v, out, dout))  # (B, heads, S, D)
    lse = lse.to(compute)[..., None]  # (B, heads, Sq, 1)
    blocked = ~lse.isfinite() | ~oh.isfinite().all(-1, keepdim=True)  # (B, heads, Sq, 1)
    zero = torch.zeros((), dtype=compute, device=q.device)
    p = torch.exp(scale * (qh @ kh.transpose(-1, -2)) - torch.where(blocked, zero, lse))  # (B, heads, Sq, Sk)
    p = torch.where(blocked, zero, p)
    if mask is not None:
        p = torch.where(mask, p, zero)
    dv = p.transpose(-1, -2) @ doh  # (B, heads, Sk, D)
    dp = doh @ vh.transpose(-1, -2)  # (B, heads, Sq, Sk)
    ds = p * (dp - torch.where(blocked, zero, (doh * oh).sum(-1, keepdim=True)))
    dq = scale * (ds @ kh)
    dk = scale * (ds.transpose(-1, -2) @ qh)
    return tuple(g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))


def spacetime_attention_reference(q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int], *, mode: str = "full",
                                  window: Optional[Sequence[int]] = None, rope=None,
                                  scale: Optional[float] = None, return_lse: bool = False,
                                  window_tile: Optional[Sequence[int]] = None):
    """spacetime_attention spelled out: RoPE on q and k, then SDPA with the explicit (S, S) mask."""
    rope = as_rope(rope)
    if rope is not None:
        q = apply_rope_3d_reference(q, grid, rope.theta, rope.split)
        k = apply_rope_3d_reference(k, grid, rope.theta, rope.split)
    mask = None if mode == "full" and window is None else spacetime_mask(grid, mode, window, q.device, window_tile)
    return attention_reference(q, k, v, scale=scale, mask=mask, return_lse=return_lse)


# ---------------------------------------------------------------------------------------------
# Input checks (dit_fast/ops/_attention_checks.py, shared with the planner) and the reference's mask.
# ---------------------------------------------------------------------------------------------


def reference_mask(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """A key padding mask, (B, Sk) or per head (B, heads, Sk), as attention_reference's mask:
    (B, 1, 1, Sk) or (B, heads, 1, Sk), broadcast over the queries (and the heads)."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dim() == 2:
        return key_padding_mask[:, None, None, :]
    return key_padding_mask[:, :, None, :]


# ---------------------------------------------------------------------------------------------
# Kernel dispatch and torch.library registration. grid, window and rope_split are int lists,
# empty when absent; rope is on when rope_split has three entries.
# ---------------------------------------------------------------------------------------------


def _launchers(backend: str):
    if backend == "triton":
        from dit_fast.triton_kernels import attention
        return attention
    raise ValueError(f"no attention kernels for backend {backend!r}")


@torch.library.custom_op("dit_fast::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], grid: List[int],
                   mode: str, window: List[int], window_tile: List[int], rope_theta: float, rope_split: List[int],
                   scale: float, backend: str, deterministic: Optional[bool] = None,
                   tma: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Returns (out (B, Sq, heads, D), lse (B, heads, Sq) fp32). deterministic: the backward to run (see
    the public functions); tma: the forward's Hopper path."""
    return _launchers(backend).attention_forward(q, k, v, key_padding_mask, grid, mode, window, window_tile,
                                                 rope_theta, rope_split, scale, tma=tma)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split, scale,
                        backend, deterministic=None, tma=None):
    B, Sq, heads, D = q.shape
    return q.new_empty(B, Sq, heads, D), q.new_empty(B, heads, Sq, dtype=torch.float32)


@torch.library.custom_op("dit_fast::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   key_padding_mask: Optional[Tensor], grid: List[int], mode: str, window: List[int],
                   window_tile: List[int], rope_theta: float, rope_split: List[int], scale: float,
                   backend: str, deterministic: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv), contiguous."""
    return _launchers(backend).attention_backward(dout, q, k, v, out, lse, key_padding_mask, grid, mode, window,
                                                  window_tile, rope_theta, rope_split, scale, deterministic)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, key_padding_mask, grid, mode, window, window_tile, rope_theta,
                        rope_split, scale, backend, deterministic=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, grid, mode, window, window_tile, rope_theta, rope_split, scale, backend = inputs[:12]
    deterministic = inputs[12] if len(inputs) > 12 else None
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.args = (grid, mode, window, window_tile, rope_theta, rope_split, scale, backend, deterministic)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.dit_fast.attention_bwd(dout, q, k, v, out, lse, key_padding_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions (re-exported by dit_fast.ops).
# ---------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
              key_padding_mask: Optional[Tensor] = None, return_lse: bool = False,
              backend: str = "auto", deterministic: Optional[bool] = None,
              tma: Optional[bool] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Dense attention ``softmax(scale * q k^T) v``, self or cross (Sq != Sk), in flash-attn's layout.

    q: (B, Sq, heads, D); k, v: (B, Sk, heads, D); any head dim D from 1 to 256; scale defaults to
    1 / sqrt(D). key_padding_mask: optional bool, True = attend: (B, Sk) for every head, or per head
    (B, heads, Sk) (the same kernels: the mask's head stride is 0 for the first); a query whose keys
    are all masked (in its head) returns zeros. With return_lse, also returns the (non-differentiable)
    log-sum-exp of the scaled, masked scores, (B, heads, Sq) fp32 (-inf for a fully masked row). A
    masked key influences nothing, whatever its values (NaN, inf); a query that sees a non-finite key
    or value gets a non-finite row.

    Kernel options (backend="triton"; None reads the environment, opt-in until a GPU run has passed):
    deterministic: True (default) the two-kernel backward, bitwise reproducible; False the one-pass
    backward that adds dq up with fp32 atomics (fewer matrix products; $DIT_FAST_ATTENTION_BWD=atomic).
    tma: the Hopper forward with TMA loads and warp specialization on maskless tiles
    ($DIT_FAST_ATTENTION_FWD=tma; other devices run the pointer path).
    """
    _check_qkv(q, k, v)
    scale = _check_scale(scale, q.shape[-1])
    mask = _check_key_padding_mask(key_padding_mask, q, k)
    _check_kernel_options(deterministic, tma)
    name = _resolve(backend, q)
    if name == "torch":
        return attention_reference(q, k, v, scale=scale, mask=reference_mask(mask), return_lse=return_lse)
    if name == "auto":  # our kernel or torch's best for this call class, measured once (attention_planner.py)
        options = deterministic is not None or tma is not None  # options of our kernel: then it runs
        name, result = _auto_plan(q, k, v, mask, _PlanCall(scale, bool(return_lse), kernel_options=options))
        if result is not None:
            return result
    out, lse = torch.ops.dit_fast.attention_fwd(q, k, v, mask, [], "full", [], [], 0.0, [], scale, name,
                                                deterministic, tma)
    return (out, lse) if return_lse else out


def spacetime_attention(q: Tensor, k: Tensor, v: Tensor, grid: Sequence[int], *, mode: str = "full",
                        window: Optional[Sequence[int]] = None, window_tile: Optional[Sequence[int]] = None,
                        rope: Union[None, str, RoPE3D] = None, scale: Optional[float] = None,
                        return_lse: bool = False, rope_in_kernel: bool = False,
                        backend: str = "auto", deterministic: Optional[bool] = None,
                        tma: Optional[bool] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Self-attention over the tokens of a video grid (T, H, W) in (t, h, w) raster order.

    q, k, v: (B, S, heads, D) with S = T * H * W. mode: "full", "spatial" (within each frame) or
    "temporal" (within each (h, w) column). window=(wt, wh, ww): 3D local attention, wt <= T,
    wh <= H, ww <= W (see the module docstring for the exact window). window_tile=(tt, th, tw):
    the window in whole 3D tiles of tt x th x tw tokens instead (Sliding Tile Attention; mode "full"):
    each query tile sees every token of the (wt // tt) x (wh // th) x (ww // tw) key tiles around it,
    centred and shifted inside the tile grid; wt a multiple of tt (and so on), the window at most the
    grid in tiles (ceil(T / tt), ...), tt * th * tw a multiple of 16. The kernels then visit only the
    kept tiles, with no token mask inside them. rope: None, "3d" or
    RoPE3D(theta, split): rotary embedding of q and k. Returns (B, S, heads, D), and with
    return_lse also the log-sum-exp (B, heads, S) fp32.

    rope_in_kernel: False (default) rotates q and k in one pass each (apply_rope_3d's kernel), then
    runs the attention kernel; True rotates them inside the attention kernels, with no rotated
    copies in memory but every key tile rotated again for each query tile: 12x slower on an H100
    (benchmarks/NOTES.md), kept for memory-bound cases and as the tested fused path.
    deterministic, tma: the kernel options of attention(). Masked keys (another frame, another column,
    outside the window) influence nothing, whatever their values.
    """
    _check_qkv(q, k, v)
    grid = _check_grid(grid, q, k)
    window = _check_mode_window(mode, window, grid, window_tile)
    window_tile = _check_window_tile(window_tile, window, grid)
    rope = as_rope(rope)
    if not isinstance(rope_in_kernel, bool):
        raise TypeError(f"rope_in_kernel must be True or False, got {rope_in_kernel!r}")
    _check_kernel_options(deterministic, tma)
    split = list(rope_split(q.shape[-1], rope.split)) if rope is not None else []
    scale = _check_scale(scale, q.shape[-1])
    name = _resolve(backend, q)
    if name == "torch":
        rope_ref = RoPE3D(rope.theta, tuple(split)) if rope is not None else None
        return spacetime_attention_reference(q, k, v, grid, mode=mode, window=window, rope=rope_ref, scale=scale,
                                             return_lse=return_lse, window_tile=window_tile)
    if rope is not None and not rope_in_kernel:  # one rotation pass each; its op differentiates it
        rope_backend = "auto" if backend == "auto" else name
        q = apply_rope_3d(q, grid, theta=rope.theta, split=split, backend=rope_backend)
        k = apply_rope_3d(k, grid, theta=rope.theta, split=split, backend=rope_backend)
        rope, split = None, []
    if name == "auto":  # our kernel or torch's best for this call class, measured once (attention_planner.py)
        options = deterministic is not None or tma is not None  # options of our kernel: then it runs
        name, result = _auto_plan(q, k, v, None, _PlanCall(scale, bool(return_lse), tuple(grid), mode,
                                                           window and tuple(window), window_tile and tuple(window_tile),
                                                           rope is not None, options))
        if result is not None:
            return result
    out, lse = torch.ops.dit_fast.attention_fwd(q, k, v, None, grid, mode, window or [], window_tile or [],
                                                float(rope.theta) if rope is not None else 0.0, split, scale, name,
                                                deterministic, tma)
    return (out, lse) if return_lse else out
