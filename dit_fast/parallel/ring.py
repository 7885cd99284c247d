"""Ring attention over a token-sharded sequence: queries stay, key/value blocks travel the ring.

Rank i of a ring of R holds the queries, keys and values of chunk i (L tokens). At step s it computes
its queries against the keys of chunk (i - s) mod R, merges the partial result into its running
(out, lse) by log-sum-exp (attention_parts.merge_partials), and meanwhile passes that K/V block on to
rank i + 1. After R steps every query has seen every key. The backward runs the same ring from the
saved merged (out, lse): at each step the block's dK/dV accumulators travel with it, so after R
steps each rank holds the complete gradients of its own keys and values, and its dQ summed locally.

How one (query chunk, key chunk) pair is computed is a ``Blocks`` object:

    DenseBlocks    every query sees every real key of the block (mode "full", no window; or mode
                   "temporal" on whole frames, regrouped into (h, w) columns): the kernels
                   (attention_parts), with a key padding mask on padded chunks
    MaskedBlocks   any other layout (windows, tile windows, spatial / temporal chunks that cut
                   frames): an explicit (L, L) mask from the tokens' global (t, h, w) positions, on the
                   PyTorch reference (memory O(L^2) per block: the kernels take no arbitrary mask).
                   Blocks without any visible pair are skipped (their K/V still pass through).
"""

import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dit_fast.ops.flash_attention import _resolve, attention_backward_reference, attention_reference, window_span
from dit_fast.ops.rope import as_rope, rope_split
from dit_fast.parallel import comm
from dit_fast.parallel.attention_parts import attention_block_backward, attention_block_forward, merge_partials


# ---------------------------------------------------------------------------------------------
# Global positions of token shards: masks and RoPE
# ---------------------------------------------------------------------------------------------


def token_positions(grid: Sequence[int], idx: Tensor) -> Tensor:
    """(L, 3) int64 (t, h, w) of raster-order token indices idx (L,) of a (T, H, W) grid."""
    _, H, W = grid
    return torch.stack([idx // (H * W), (idx // W) % H, idx % W], dim=1)


def pair_mask(grid: Sequence[int], q_idx: Tensor, k_idx: Tensor, mode: str = "full",
              window: Optional[Sequence[int]] = None, window_tile: Optional[Sequence[int]] = None) -> Tensor:
    """(Lq, Lk) bool: may query token q_idx[i] see key token k_idx[j]? The rows and columns of
    dit_fast.ops.flash_attention.spacetime_mask for these global indices; keys past the grid (padding) never."""
    S = grid[0] * grid[1] * grid[2]
    q = token_positions(grid, q_idx)[:, None, :]  # (Lq, 1, 3)
    k = token_positions(grid, k_idx)[None, :, :]  # (1, Lk, 3)
    mask = (k_idx < S)[None, :].expand(len(q_idx), len(k_idx))
    if mode == "spatial":
        mask = mask & (q[..., 0] == k[..., 0])  # same frame
    elif mode == "temporal":
        mask = mask & (q[..., 1] == k[..., 1]) & (q[..., 2] == k[..., 2])  # same (h, w)
    if window is not None:
        lengths = list(grid)
        if window_tile is not None:  # the window counted in tiles, on tile coordinates
            tile = torch.tensor(window_tile, device=q.device)
            q, k = q // tile, k // tile
            window = [w // t for w, t in zip(window, window_tile)]
            lengths = [-(-n // t) for n, t in zip(grid, window_tile)]
        for axis, (size, length) in enumerate(zip(window, lengths)):
            start = window_span(q[..., axis], size, length)  # (Lq, 1)
            mask = mask & (k[..., axis] >= start) & (k[..., axis] < start + size)
    return mask


def rope_on_tokens(x: Tensor, grid: Sequence[int], idx: Tensor, rope) -> Tensor:
    """3D RoPE of x (B, L, heads, D) whose tokens sit at global raster indices idx (L,) of grid: the
    rotation of dit_fast.ops.rope.apply_rope_3d_reference, by global (not shard-local) positions.
    Indices past the grid (padding) are rotated as the last token. Differentiable (PyTorch ops)."""
    rope = as_rope(rope)
    B, L, heads, D = x.shape
    S = grid[0] * grid[1] * grid[2]
    positions = token_positions(grid, idx.clamp(max=S - 1)).to(torch.float64)  # (L, 3)
    angles = []
    for axis, d_axis in enumerate(rope_split(D, rope.split)):  # angles in fp64, as rope_3d_angles
        inv_freq = rope.theta ** (-torch.arange(0, d_axis, 2, device=x.device, dtype=torch.float64) / d_axis)
        angles.append(positions[:, axis, None] * inv_freq[None, :])  # (L, d_axis / 2)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = torch.cat(angles, dim=1).to(compute)  # (L, D / 2)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, L, 1, D / 2)
    pairs = x.to(compute).reshape(B, L, heads, D // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(B, L, heads, D).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# How one (query chunk, key chunk) pair is computed
# ---------------------------------------------------------------------------------------------


class DenseBlocks:
    """Every query sees every real key: the attention kernels (or reference) with a key padding mask.

    key_mask(src) -> None (every key real) or the (B', L) bool mask of chunk src's keys."""

    def __init__(self, key_mask: Callable[[int], Optional[Tensor]], backend: str):
        self.key_mask, self.backend = key_mask, backend

    def forward(self, q, k, v, src) -> Tuple[Tensor, Tensor]:
        return attention_block_forward(q, k, v, key_padding_mask=self.key_mask(src), backend=self.backend)

    def backward(self, q, k, v, out, lse, dout, src):
        return attention_block_backward(q, k, v, out, lse, dout, key_padding_mask=self.key_mask(src),
                                        backend=self.backend)


class MaskedBlocks:
    """An explicit (L, L) mask per pair from the tokens' global positions, on the PyTorch reference.

    mask(src) -> the (Lq, Lk) bool mask of this rank's queries against chunk src's keys."""

    _warned = False

    def __init__(self, mask: Callable[[int], Tensor], backend: str, q: Tensor, layout: str):
        self.mask = mask
        if _resolve(backend, q) != "torch" and not MaskedBlocks._warned:
            MaskedBlocks._warned = True
            warnings.warn(f"ring attention computes {layout} blocks with the PyTorch reference and an explicit "
                          "mask (the kernels take only key padding masks across blocks): use mode='ulysses', "
                          "whose kernels run every layout, for speed", stacklevel=4)

    def _mask(self, src):
        m = self.mask(src)
        return m[None, None] if bool(m.any()) else None  # (1, 1, Lq, Lk), or None: nothing visible

    @torch.no_grad()
    def forward(self, q, k, v, src):
        m = self._mask(src)
        return None if m is None else attention_reference(q, k, v, mask=m, return_lse=True)

    @torch.no_grad()
    def backward(self, q, k, v, out, lse, dout, src):
        m = self._mask(src)
        return None if m is None else attention_backward_reference(q, k, v, out.to(q.dtype), lse, dout, mask=m)


# ---------------------------------------------------------------------------------------------
# The ring
# ---------------------------------------------------------------------------------------------


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, blocks, group):
        R, me = comm.group_size(group), comm.group_rank(group)
        B, L, heads, D = q.shape
        out = torch.zeros(q.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        lse = torch.full((B, heads, L), float("-inf"), dtype=torch.float32, device=q.device)
        k_cur, v_cur = k, v
        for step in range(R):
            src = (me - step) % R  # the chunk whose keys this rank holds now
            transfer = comm.RingExchange([k_cur, v_cur], group) if step < R - 1 else None  # overlaps compute
            part = blocks.forward(q, k_cur, v_cur, src)
            if part is not None:
                out, lse = merge_partials(out, lse, *part)  # running result in fp32
            if transfer is not None:
                k_cur, v_cur = transfer.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks, ctx.group = blocks, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        blocks, group = ctx.blocks, ctx.group
        R, me = comm.group_size(group), comm.group_rank(group)
        dout = dout.contiguous()
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk_acc = torch.zeros(k.shape, dtype=acc, device=k.device)  # travels with the block it belongs to
        dv_acc = torch.zeros(v.shape, dtype=acc, device=v.device)
        k_cur, v_cur = k, v
        for step in range(R):
            src = (me - step) % R
            transfer = comm.RingExchange([k_cur, v_cur], group) if step < R - 1 else None
            grads = blocks.backward(q, k_cur, v_cur, out, lse, dout, src)
            if grads is not None:
                dq += grads[0]
                dk_acc += grads[1]
                dv_acc += grads[2]
            if transfer is not None:
                k_cur, v_cur = transfer.wait()
            # the accumulators follow their block to the next rank; the R-th hop brings them home
            dk_acc, dv_acc = comm.RingExchange([dk_acc, dv_acc], group).wait()
        return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype), None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, blocks, group) -> Tensor:
    """Attention of this rank's queries q (B, L, heads, D) over the keys of every rank of ``group``
    (each holding its chunk's k, v (B, L, heads, D)); ``blocks`` computes one pair. Differentiable."""
    return _RingAttention.apply(q, k, v, blocks, group)


__all__ = ["ring_attention", "DenseBlocks", "MaskedBlocks", "pair_mask", "rope_on_tokens", "token_positions"]
