"""Block-sparse attention as data: 3D tiles over a video's tokens, and the key tiles each query tile keeps.

A pattern (a sliding tile window, a radial pattern, a top-k choice; dit_fast/sparse/) only builds a
``SparseBlocks``; one kernel consumes any ``SparseBlocks`` (dit_fast/ops/block_sparse.py), and the
predicate-level reference here (``SparseBlocks.token_mask``) checks both. As FlexAttention's
BlockMask (kv_num_blocks / kv_indices and their transpose for the backward) and FastVideo's
Sliding Tile / Video Sparse Attention (tokens reordered tile-major once at the model's input).

Tiles. ``TileLayout(grid=(T, H, W), tile=(tt, th, tw), extra=E)`` cuts the grid into
ceil(T / tt) x ceil(H / th) x ceil(W / tw) video tiles, numbered in raster order over the tile grid;
edge tiles are partial (Wan's 21 x 30 x 52 latent grid does not divide by 4). E extra tokens (the
text tokens of a joint text + video attention, HunyuanVideo's) follow the video tokens, cut into
extra tiles of V = tt * th * tw tokens (the last partial). Two token orders:

    raster  the video tokens in (t, h, w) raster order, then the extra tokens (the models' order)
    tiles   tile by tile (raster order inside a tile), then the extra tokens: every tile one contiguous
            run of positions, tile i at [tile_starts[i], tile_starts[i + 1]) (TMA-loadable blocks)

``perm`` maps tile order to raster order (``x_tiles = x_raster[:, perm]``); ``to_tiles`` /
``from_tiles`` apply it and its inverse along the sequence dim.

Kept tiles. ``SparseBlocks(layout, kv_count, kv_index)``: for each (batch, head, query tile), the
first kv_count entries of kv_index are the key tiles it attends to, ascending and distinct (later
entries are ignored: -1 by convention). kv_count (B | 1, heads | 1, n_tiles) and kv_index
(B | 1, heads | 1, n_tiles, width) are int32; a size-1 batch or head dim is shared (broadcast). Every
token of a kept key tile is visible to every token of the query tile (no mask inside a tile; a key
padding mask, given to the op, applies on top).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor


def _three_positive_ints(value, name: str) -> Tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
        raise ValueError(f"{name} must be three positive ints, got {value!r}")
    return tuple(int(n) for n in value)


@dataclass(frozen=True)
class TileLayout:
    """3D tiles of ``tile`` tokens over a ``grid`` of video tokens, then ``extra`` tokens (text) in tiles of
    the same volume. Immutable and hashable (a cache key)."""
    grid: Tuple[int, int, int]
    tile: Tuple[int, int, int]
    extra: int = 0

    def __post_init__(self):
        object.__setattr__(self, "grid", _three_positive_ints(self.grid, "grid"))
        object.__setattr__(self, "tile", _three_positive_ints(self.tile, "tile"))
        if isinstance(self.extra, bool) or not isinstance(self.extra, int) or self.extra < 0:
            raise ValueError(f"extra must be a non-negative int (tokens after the video's), got {self.extra!r}")

    # ---- sizes ----

    @property
    def volume(self) -> int:
        """V: tokens in a whole tile."""
        return self.tile[0] * self.tile[1] * self.tile[2]

    @property
    def tiles_per_axis(self) -> Tuple[int, int, int]:
        return tuple(-(-n // t) for n, t in zip(self.grid, self.tile, strict=True))

    @property
    def video_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def tokens(self) -> int:
        """S: every token, video and extra."""
        return self.video_tokens + self.extra

    @property
    def n_video_tiles(self) -> int:
        return math.prod(self.tiles_per_axis)

    @property
    def n_extra_tiles(self) -> int:
        return -(-self.extra // self.volume)

    @property
    def n_tiles(self) -> int:
        return self.n_video_tiles + self.n_extra_tiles

    def axis_sizes(self, axis: int) -> Tensor:
        """(tiles along ``axis``,) int64: tokens of each tile along one axis of the grid (the last partial)."""
        n, t, count = self.grid[axis], self.tile[axis], self.tiles_per_axis[axis]
        sizes = torch.full((count,), t, dtype=torch.int64)
        sizes[-1] = n - t * (count - 1)
        return sizes

    def tile_sizes(self) -> Tensor:
        """(n_tiles,) int64: tokens in each tile (edge and last extra tiles partial)."""
        per_axis = [self.axis_sizes(axis) for axis in range(3)]
        video = (per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]).flatten()
        extra = torch.full((self.n_extra_tiles,), self.volume, dtype=torch.int64)
        if self.n_extra_tiles:
            extra[-1] = self.extra - self.volume * (self.n_extra_tiles - 1)
        return torch.cat([video, extra])

    def tile_starts(self) -> Tensor:
        """(n_tiles + 1,) int64: tile i holds tile-order positions [starts[i], starts[i + 1])."""
        return torch.cat([torch.zeros(1, dtype=torch.int64), self.tile_sizes().cumsum(0)])

    def tile_coords(self) -> Tensor:
        """(n_video_tiles, 3) int64: (a, b, c) tile coordinates of each video tile, raster over the tile grid."""
        a, b, c = self.tiles_per_axis
        idx = torch.arange(a * b * c)
        return torch.stack([idx // (b * c), (idx // c) % b, idx % c], dim=1)

    # ---- token orders ----

    def token_tile(self, device=None) -> Tensor:
        """(S,) int64, raster order: the tile of each token."""
        T, H, W = self.grid
        tt, th, tw = self.tile
        _, b, c = self.tiles_per_axis
        t = torch.arange(T, device=device)[:, None, None] // tt
        h = torch.arange(H, device=device)[None, :, None] // th
        w = torch.arange(W, device=device)[None, None, :] // tw
        video = ((t * b + h) * c + w).flatten()
        extra = self.n_video_tiles + torch.arange(self.extra, device=device) // self.volume
        return torch.cat([video, extra])

    def perm(self, device=None) -> Tensor:
        """(S,) int64: the raster index of the token at each tile-order position (x_tiles = x[:, perm])."""
        return _perms(self, device)[0]

    def inverse_perm(self, device=None) -> Tensor:
        """(S,) int64: the tile-order position of each raster token (x = x_tiles[:, inverse])."""
        return _perms(self, device)[1]

    def to_tiles(self, x: Tensor, dim: int = 1) -> Tensor:
        """x with its sequence dim (S tokens, raster order) reordered tile by tile (a gather, a copy)."""
        self._check_len(x, dim)
        return x.index_select(dim, self.perm(x.device))

    def from_tiles(self, x: Tensor, dim: int = 1) -> Tensor:
        """The inverse of to_tiles."""
        self._check_len(x, dim)
        return x.index_select(dim, self.inverse_perm(x.device))

    def _check_len(self, x: Tensor, dim: int):
        if x.shape[dim] != self.tokens:
            raise ValueError(f"the layout has S = {self.tokens} tokens (grid {self.grid}, extra {self.extra}) but the "
                             f"tensor {tuple(x.shape)} has {x.shape[dim]} along dim {dim}")


_perm_cache: Dict[tuple, Tuple[Tensor, Tensor]] = {}


def _perms(layout: TileLayout, device) -> Tuple[Tensor, Tensor]:
    key = (layout, str(torch.device(device) if device is not None else "cpu"))
    if key not in _perm_cache:
        with torch.inference_mode(False):  # a cache: ordinary tensors even if first built under inference_mode
            tile_of = layout.token_tile(device)
            perm = torch.sort(tile_of, stable=True).indices  # tiles in order, raster order inside each
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            _perm_cache[key] = (perm, inverse)
    return _perm_cache[key]


# ---------------------------------------------------------------------------------------------
# Kept tiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SparseBlocks:
    """Which key tiles each (batch, head, query tile) attends to (module docstring). Build with
    ``SparseBlocks.from_tile_mask`` or a pattern (dit_fast/sparse/)."""
    layout: TileLayout
    kv_count: Tensor  # (B | 1, heads | 1, n_tiles) int32
    kv_index: Tensor  # (B | 1, heads | 1, n_tiles, width) int32, the first kv_count entries ascending

    def __post_init__(self):
        if not isinstance(self.layout, TileLayout):
            raise TypeError(f"layout must be a TileLayout, got {type(self.layout).__name__}")
        n = self.layout.n_tiles
        c, i = self.kv_count, self.kv_index
        if not isinstance(c, Tensor) or not isinstance(i, Tensor):
            raise TypeError("kv_count and kv_index must be tensors")
        if c.dtype != torch.int32 or i.dtype != torch.int32:
            raise TypeError(f"kv_count and kv_index must be int32, got {c.dtype} and {i.dtype}")
        if c.dim() != 3 or c.shape[-1] != n:
            raise ValueError(f"kv_count must be (B | 1, heads | 1, n_tiles = {n}), got {tuple(c.shape)}")
        if i.dim() != 4 or i.shape[:3] != c.shape or not 1 <= i.shape[-1] <= n:
            raise ValueError(f"kv_index must be (B | 1, heads | 1, n_tiles, width <= {n}) matching kv_count "
                             f"{tuple(c.shape)}, got {tuple(i.shape)}")
        if c.device != i.device:
            raise ValueError(f"kv_count is on {c.device} but kv_index on {i.device}")

    @staticmethod
    def from_tile_mask(layout: TileLayout, tile_mask: Tensor, width: Optional[int] = None) -> "SparseBlocks":
        """From a bool (B | 1, heads | 1, n_tiles, n_tiles) tile mask (True = the query tile keeps the key
        tile). width: the index lists' length, at least the largest count (default: the largest count, one host
        sync; a given width is not checked against the counts here: the op checks them, once per blocks object)."""
        if not isinstance(layout, TileLayout):
            raise TypeError(f"layout must be a TileLayout, got {type(layout).__name__}")
        n = layout.n_tiles
        if not isinstance(tile_mask, Tensor):
            raise TypeError(f"tile_mask must be a bool tensor (B | 1, heads | 1, {n}, {n}), got "
                            f"{type(tile_mask).__name__}")
        if tile_mask.dtype != torch.bool or tile_mask.dim() != 4 or tuple(tile_mask.shape[-2:]) != (n, n):
            raise ValueError(f"tile_mask must be bool (B | 1, heads | 1, {n}, {n}), got {tile_mask.dtype} "
                             f"{tuple(tile_mask.shape)}")
        count = tile_mask.sum(-1, dtype=torch.int32)  # (..., n)
        if width is None:
            width = max(int(count.max()), 1) if count.numel() else 1  # an empty batch: lists of one entry
        elif isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n:
            raise ValueError(f"width must be an int in [1, n_tiles = {n}] (the index lists' length, at least the "
                             f"largest count), got {width!r}")
        # kept tiles first, in ascending order: sort the key (not kept -> n + j) and keep the first `width`
        j = torch.arange(n, device=tile_mask.device, dtype=torch.int32)
        order = torch.where(tile_mask, j, j + n).sort(dim=-1).values[..., :width]
        index = torch.where(order < n, order, torch.full_like(order, -1))
        return SparseBlocks(layout, count.contiguous(), index.contiguous())

    def tile_mask(self) -> Tensor:
        """bool (B | 1, heads | 1, n_tiles, n_tiles): True where the query tile keeps the key tile."""
        n = self.layout.n_tiles
        valid = torch.arange(self.kv_index.shape[-1], device=self.kv_index.device) < self.kv_count[..., None]
        mask = torch.zeros(*self.kv_count.shape, n + 1, dtype=torch.bool, device=self.kv_index.device)
        index = torch.where(valid, self.kv_index.long(), torch.full_like(self.kv_index, n, dtype=torch.long))
        mask.scatter_(-1, index, True)
        return mask[..., :n]

    def token_mask(self, order: str = "raster") -> Tensor:
        """bool (B | 1, heads | 1, S, S): True where query token i may attend to key token j, tokens in
        ``order`` ("raster" or "tiles"). The reference's mask (dit_fast/ops/block_sparse.py)."""
        tile_of = self.layout.token_tile(self.kv_index.device)
        if order == "tiles":
            tile_of = tile_of[self.layout.perm(tile_of.device)]
        elif order != "raster":
            raise ValueError(f"order must be 'raster' or 'tiles', got {order!r}")
        tiles = self.tile_mask()
        return tiles[..., tile_of, :][..., tile_of]

    def transposed(self) -> Tuple[Tensor, Tensor]:
        """(q_count (B | 1, heads | 1, n_tiles), q_index (..., n_tiles, n_tiles)) int32: for each key tile,
        the query tiles that keep it, ascending (the backward's dK / dV walk)."""
        n = self.layout.n_tiles
        t = self.tile_mask().transpose(-1, -2)
        count = t.sum(-1, dtype=torch.int32)
        j = torch.arange(n, device=t.device, dtype=torch.int32)
        order = torch.where(t, j, j + n).sort(dim=-1).values
        return count.contiguous(), torch.where(order < n, order, torch.full_like(order, -1)).contiguous()

    def kept_pairs(self) -> Tensor:
        """(B | 1, heads | 1) int64: kept (query token, key token) pairs, the work the kernels do."""
        sizes = self.layout.tile_sizes().to(self.kv_index.device)
        tiles = self.tile_mask().to(torch.int64)
        return (sizes[:, None] * tiles * sizes[None, :]).sum((-1, -2))

    def kept_fraction(self) -> float:
        """Kept token pairs over all S * S, averaged over batch and heads (one host sync)."""
        return float(self.kept_pairs().double().mean()) / float(self.layout.tokens) ** 2

    def expand(self, batch: int, heads: int) -> "SparseBlocks":
        """The same blocks with the batch and head dims expanded (views) to (batch, heads)."""
        b, h = self.kv_count.shape[:2]
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"blocks for (B, heads) = ({b}, {h}) cannot serve ({batch}, {heads}): each must be 1 "
                             "or equal")
        return SparseBlocks(self.layout, self.kv_count.expand(batch, heads, -1),
                            self.kv_index.expand(batch, heads, -1, -1))

    def to(self, device) -> "SparseBlocks":
        return SparseBlocks(self.layout, self.kv_count.to(device), self.kv_index.to(device))


def dense_tile_mask(layout: TileLayout, device=None) -> Tensor:
    """(1, 1, n, n) all True: every tile keeps every tile (dense attention as blocks)."""
    n = layout.n_tiles
    return torch.ones(1, 1, n, n, dtype=torch.bool, device=device)


def with_extra_dense(layout: TileLayout, tile_mask: Tensor) -> Tensor:
    """tile_mask with the extra tiles (text) seen by every query tile and seeing every key tile."""
    if layout.n_extra_tiles == 0:
        return tile_mask
    mask = tile_mask.clone()
    v = layout.n_video_tiles
    mask[..., :, v:] = True
    mask[..., v:, :] = True
    return mask


__all__ = ["SparseBlocks", "TileLayout", "dense_tile_mask", "with_extra_dense"]
