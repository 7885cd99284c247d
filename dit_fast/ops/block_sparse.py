"""Block-sparse spacetime attention: reference, input checks, torch.library registration, public function.

    block_sparse_attention(q, k, v, blocks, order=..., key_padding_mask=...)

Each query tile attends to every token of the key tiles it keeps and to nothing else; ``blocks`` (a
``SparseBlocks``, dit_fast/ops/sparse_layout.py) says which, per (batch, head, query tile), as counts and
ascending index lists (FlexAttention's BlockMask, VSA's block indices). A pattern (sliding tile windows,
radial, top-k; dit_fast/sparse/) only builds the blocks; this one op runs any of them.

Token orders. "raster": the models' order (video tokens in (t, h, w) raster order, then the extra text
tokens); the op gathers q, k, v (and the mask) into tile order and the output back, one copy each way.
"tiles": the tokens already tile-major (``layout.to_tiles`` once at the model's input, ``from_tiles``
at its output, as Sliding Tile Attention does), no copy: every tile is one contiguous run of rows.

Call flow: public function (validation, backend choice) -> "torch": the reference below (attention_reference
with the blocks' token mask), differentiated by PyTorch; "triton": torch.ops.dit_fast.block_sparse_fwd /
block_sparse_bwd (custom ops with fake kernels and registered autograd, opaque to torch.compile), always
in tile order -> the launchers in dit_fast/triton_kernels/attention_sparse.py.
"""

from __future__ import annotations

import weakref
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from dit_fast import _backend
from dit_fast.ops.flash_attention import (FLOAT_DTYPES, _check_key_padding_mask, _check_qkv, _check_scale,
                                          attention_reference, reference_mask)
from dit_fast.ops.sparse_layout import SparseBlocks, TileLayout

OP = "block_sparse_attention"
ORDERS = ("raster", "tiles")


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch). The CPU path, the oracle of the tests, and backend="torch".
# ---------------------------------------------------------------------------------------------


def block_sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, blocks: SparseBlocks, *, order: str = "raster",
                                     key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                                     return_lse: bool = False):
    """attention_reference with the (S, S) token mask of the kept tiles (``blocks.token_mask(order)``),
    and the key padding mask on top. q, k, v: (B, S, heads, D) in ``order``; key_padding_mask (B, S) or
    (B, heads, S), True = attend, in ``order``. A query tile with no kept tile gets zeros (lse -inf); a key
    outside every kept tile of a query, or padded, never influences its output or any gradient, whatever
    its values (attention_reference's contract)."""
    mask = blocks.token_mask(order)  # (B | 1, heads | 1, S, S)
    padding = reference_mask(key_padding_mask)  # (B, 1 | heads, 1, S)
    if padding is not None:
        mask = mask & padding
    return attention_reference(q, k, v, scale=scale, mask=mask, return_lse=return_lse)


# ---------------------------------------------------------------------------------------------
# Input checks: clear ValueError / TypeError naming the argument and the shapes.
# ---------------------------------------------------------------------------------------------


def _check_blocks(blocks, q, k) -> SparseBlocks:
    if not isinstance(blocks, SparseBlocks):
        raise TypeError(f"blocks must be a dit_fast.ops.sparse_layout.SparseBlocks (SparseBlocks.from_tile_mask or a "
                        f"pattern of dit_fast.sparse), got {type(blocks).__name__}")
    B, S, heads, _ = q.shape
    layout = blocks.layout
    if S != layout.tokens or k.shape[1] != layout.tokens:
        raise ValueError(f"blocks' layout has S = {layout.tokens} tokens (grid {layout.grid}, extra {layout.extra}) "
                         f"but q is {tuple(q.shape)} and k {tuple(k.shape)}: block-sparse attention is self-attention "
                         "over the layout's tokens")
    b, h = blocks.kv_count.shape[:2]
    if b not in (1, B) or h not in (1, heads):
        raise ValueError(f"blocks.kv_count {tuple(blocks.kv_count.shape)} is for (B, heads) = ({b}, {h}), which cannot "
                         f"serve q {tuple(q.shape)} with (B, heads) = ({B}, {heads}): each must be 1 or equal")
    if blocks.kv_count.device != q.device:
        raise ValueError(f"blocks are on {blocks.kv_count.device} but q is on {q.device}; use blocks.to(q.device)")
    return blocks


def _check_order(order) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (the token order of q, k, v and the mask), got {order!r}")
    return order


def _check_return_lse(return_lse):
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False, got {return_lse!r}")


# Blocks whose index lists were checked, and their transposed lists: once per SparseBlocks object (the
# same blocks serve every layer of a step). Keyed weakly by the object (a new pattern is a new object), and
# by the version counters of its two tensors: lists written in place since are checked (and transposed) again.
_checked: "weakref.WeakKeyDictionary[SparseBlocks, tuple]" = weakref.WeakKeyDictionary()
_transposed: "weakref.WeakKeyDictionary[SparseBlocks, tuple]" = weakref.WeakKeyDictionary()


def _versions(blocks: SparseBlocks) -> tuple:
    """The in-place write counters of kv_count and kv_index (inference tensors have none: their identity)."""
    return tuple(None if t.is_inference() else t._version for t in (blocks.kv_count, blocks.kv_index))


def check_block_values(blocks: SparseBlocks) -> None:
    """The index lists as the kernels read them: every count in [0, width], the first count entries of
    each list in [0, n_tiles) and strictly ascending (so distinct: a tile listed twice would be counted
    twice by the kernels and once by the reference). One host sync, once per blocks object and again after its
    lists are written in place; skipped while torch.compile traces (it cannot sync)."""
    if torch.compiler.is_compiling() or _checked.get(blocks) == _versions(blocks):
        return
    n, width = blocks.layout.n_tiles, blocks.kv_index.shape[-1]
    count, index = blocks.kv_count, blocks.kv_index
    live = torch.arange(width, device=index.device) < count[..., None]  # (..., n, width)
    bad_count = (count < 0) | (count > width)
    out_of_range = live & ((index < 0) | (index >= n))
    not_ascending = live[..., 1:] & (index[..., 1:] <= index[..., :-1])
    problems = torch.stack([bad_count.any(), out_of_range.any(), not_ascending.any()]).tolist()
    if problems[0]:
        raise ValueError(f"blocks.kv_count must lie in [0, width = {width}] (the index lists' length), got values in "
                         f"[{int(count.min())}, {int(count.max())}]")
    if problems[1]:
        raise ValueError(f"blocks.kv_index: the first kv_count entries of each list must be key tiles in [0, "
                         f"n_tiles = {n}); found {int(out_of_range.sum())} outside (e.g. at "
                         f"{out_of_range.nonzero()[0].tolist()})")
    if problems[2]:
        raise ValueError("blocks.kv_index: the first kv_count entries of each list must be strictly ascending "
                         f"(distinct key tiles); not so at {not_ascending.nonzero()[0].tolist()}")
    _checked[blocks] = _versions(blocks)


def backward_lists(blocks: SparseBlocks) -> Tuple[Tensor, Tensor]:
    """(q_count (B | 1, heads | 1, n_tiles), q_index (..., n_tiles, width)) int32: for each key tile, the
    query tiles that keep it (``blocks.transposed()``, cut to the longest list), the dK / dV kernel's walk.
    Cached per blocks object (until its lists are written in place) outside torch.compile."""
    if torch.compiler.is_compiling():
        return blocks.transposed()
    versions = _versions(blocks)
    if blocks not in _transposed or _transposed[blocks][0] != versions:
        count, index = blocks.transposed()
        width = max(int(count.max()), 1) if count.numel() else 1
        _transposed[blocks] = (versions, count, index[..., :width].contiguous())
    return _transposed[blocks][1:]


def _resolve(backend, q):
    """"torch" or "triton". "auto": the reference on CPU, our kernel on a GPU, untimed: sparse attention is
    opt-in, and no torch candidate computes the same thing as cheaply (SDPA with the token mask runs all
    S^2 pairs), so "auto" never changes the math and has nothing to measure."""
    name = _backend.resolve_backend(backend, q.device, OP, implemented=("triton",))
    if q.dtype not in FLOAT_DTYPES:
        if name not in ("torch", "auto"):
            raise TypeError(f"q must be float32, float16 or bfloat16 for the {name} kernels, got {q.dtype} "
                            "(float64 runs with backend='torch')")
        return "torch"
    return "triton" if name == "auto" else name


# ---------------------------------------------------------------------------------------------
# Kernel dispatch and torch.library registration. Every tensor in tile order; layout is
# [T, H, W, tt, th, tw, extra]; q_count / q_index (the backward's lists) may be empty tensors, then the
# backward computes them.
# ---------------------------------------------------------------------------------------------


def _layout_list(layout: TileLayout) -> List[int]:
    return [*layout.grid, *layout.tile, layout.extra]


def _layout_of(values: List[int]) -> TileLayout:
    return TileLayout(tuple(values[:3]), tuple(values[3:6]), values[6])


def _launchers(backend: str):
    if backend == "triton":
        from dit_fast.triton_kernels import attention_sparse
        return attention_sparse
    raise ValueError(f"no block-sparse attention kernels for backend {backend!r}")


@torch.library.custom_op("dit_fast::block_sparse_fwd", mutates_args=())
def _block_sparse_fwd(q: Tensor, k: Tensor, v: Tensor, kv_count: Tensor, kv_index: Tensor, q_count: Tensor,
                      q_index: Tensor, key_padding_mask: Optional[Tensor], layout: List[int], scale: float,
                      backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (out (B, S, heads, D), lse (B, heads, S) fp32), tile order."""
    return _launchers(backend).block_sparse_forward(q, k, v, kv_count, kv_index, key_padding_mask,
                                                    _layout_of(layout), scale)


@_block_sparse_fwd.register_fake
def _block_sparse_fwd_fake(q, k, v, kv_count, kv_index, q_count, q_index, key_padding_mask, layout, scale, backend):
    B, S, heads, D = q.shape
    return q.new_empty(B, S, heads, D), q.new_empty(B, heads, S, dtype=torch.float32)


@torch.library.custom_op("dit_fast::block_sparse_bwd", mutates_args=())
def _block_sparse_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_count: Tensor,
                      kv_index: Tensor, q_count: Tensor, q_index: Tensor, key_padding_mask: Optional[Tensor],
                      layout: List[int], scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv), contiguous, tile order."""
    return _launchers(backend).block_sparse_backward(dout, q, k, v, out, lse, kv_count, kv_index, q_count, q_index,
                                                     key_padding_mask, _layout_of(layout), scale)


@_block_sparse_bwd.register_fake
def _block_sparse_bwd_fake(dout, q, k, v, out, lse, kv_count, kv_index, q_count, q_index, key_padding_mask, layout,
                           scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_count, kv_index, q_count, q_index, key_padding_mask, layout, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, kv_count, kv_index, q_count, q_index, key_padding_mask)
    ctx.args = (layout, scale, backend)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, kv_count, kv_index, q_count, q_index, key_padding_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.dit_fast.block_sparse_bwd(dout, q, k, v, out, lse, kv_count, kv_index, q_count, q_index,
                                                     key_padding_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_block_sparse_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function (re-exported by dit_fast.ops).
# ---------------------------------------------------------------------------------------------


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, blocks: SparseBlocks, *, order: str = "raster",
                           key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                           return_lse: bool = False, backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention in which each query tile sees every token of its kept key tiles, and nothing else.

    q, k, v: (B, S, heads, D), S = blocks.layout.tokens, D from 1 to 256, in ``order``:
    "raster" (the model's order; the op gathers into tile order and back, a copy each way) or "tiles"
    (tile-major already, ``blocks.layout.to_tiles``: no copy). blocks: a ``SparseBlocks`` (counts and
    ascending index lists of the kept key tiles per (batch, head, query tile); size-1 batch or head dims
    are shared). key_padding_mask: optional bool, True = attend, (B, S) or per head (B, heads, S), in
    ``order``, applied on top of the kept tiles. scale defaults to 1 / sqrt(D).

    Returns out (B, S, heads, D) in ``order``, and with return_lse also the (non-differentiable)
    log-sum-exp of the scaled, kept scores (B, heads, S) fp32 (-inf for a query with no visible key,
    whose output is zeros). A key outside the kept tiles or padded influences nothing, whatever its
    values (NaN, inf); a query that sees a non-finite key or value gets a non-finite row.

    backend: "torch" the reference (block_sparse_attention_reference); "triton" the kernels (work in
    proportion to the kept tile pairs, forward and backward: dK / dV walk the transposed lists, dQ the
    kept ones); "auto" the reference on CPU and the kernels on a GPU, untimed (sparse attention is
    opt-in and no torch candidate computes the same result as cheaply: "auto" never changes the math).
    Differentiable on every backend. The index lists are checked once per blocks object (one host
    sync; not while torch.compile traces).
    """
    _check_qkv(q, k, v)
    blocks = _check_blocks(blocks, q, k)
    order = _check_order(order)
    scale = _check_scale(scale, q.shape[-1])
    mask = _check_key_padding_mask(key_padding_mask, q, k)
    _check_return_lse(return_lse)
    check_block_values(blocks)
    name = _resolve(backend, q)
    if name == "torch":
        return block_sparse_attention_reference(q, k, v, blocks, order=order, key_padding_mask=mask, scale=scale,
                                                return_lse=return_lse)
    layout = blocks.layout
    if order == "raster":  # one gather each way (index_select: its backward scatters the gradients back)
        q, k, v = (layout.to_tiles(t) for t in (q, k, v))
        if mask is not None:
            mask = mask.index_select(-1, layout.perm(mask.device))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    none = (blocks.kv_count.new_empty(0), blocks.kv_count.new_empty(0))  # inference: no backward lists
    q_count, q_index = backward_lists(blocks) if needs_grad else none
    out, lse = torch.ops.dit_fast.block_sparse_fwd(q, k, v, blocks.kv_count, blocks.kv_index, q_count, q_index, mask,
                                                   _layout_list(layout), scale, name)
    if order == "raster":
        out = layout.from_tiles(out)
        lse = lse.index_select(-1, layout.inverse_perm(lse.device))
    return (out, lse) if return_lse else out


__all__ = ["block_sparse_attention", "block_sparse_attention_reference"]
