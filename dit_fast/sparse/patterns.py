"""Sparse attention patterns: each builds the ``SparseBlocks`` that ``dit_fast.ops.block_sparse_attention`` runs.

    sliding_tile(layout, window)                 Sliding Tile Attention (FastVideo, arXiv:2502.04507): each
                                                 query tile keeps the (wt, wh, ww) tiles around it
    radial(layout, decay=1.0, dense_radius=1)    Radial Attention (Li et al., arXiv:2506.19852): dense near
                                                 the temporal diagonal, the spatial window shrinking with
                                                 the temporal distance, O(S log S) kept pairs
    topk(q, k, layout, keep=..., local=...)      Video Sparse Attention's coarse stage (arXiv:2505.13389),
                                                 training-free: scores of tile-pooled q and k; each query tile
                                                 keeps its ``keep`` best key tiles plus its local window

Every pattern keeps the extra (text) tiles dense both ways (``with_extra_dense``): every query sees
the text and the text sees everything. Beside each builder is a token-level predicate
(``*_token_mask``), written from the tokens' (t, h, w) coordinates and a plain loop where that is
clearest; the tests compare each pattern's ``SparseBlocks.token_mask()`` with it.

The rules, on the tile grid (tiles_per_axis = (nt, nh, nw); a video tile at tile coordinates (a, b, c)):

    window rule   along an axis of n tiles, the query tile at x keeps the W tiles starting at
                  clamp(x - (W - 1) // 2, 0, n - W): centred, shifted inside the grid at the borders
                  (spacetime_attention's window_tile rule, so the count is exactly W everywhere)
    sliding_tile  the window rule on each axis with (wt, wh, ww)
    radial        by the temporal tile distance d = |a_q - a_k|:
                    d <= dense_radius    the whole key slab (every spatial tile)
                    else band g = bit_length(d) - bit_length(dense_radius) >= 1; the slab keeps
                    area = decay * nh * nw / 2^g tiles: the window rule on (h, w) with
                    W_h = clamp(ceil(nh * sqrt(area / (nh nw))), 1, nh) (W_w alike) when area >= 1,
                    else (1, 1) on the slabs with d % ceil(1 / area) == 0 only (Radial's temporal split)
                  and, with sink=True, the whole first slab (a_k = 0: Radial's attention sink). The kept
                  area halves each time the temporal distance doubles: each band of distances keeps about
                  decay * nh * nw tiles, and there are log2(nt) bands: O(S log S) kept pairs.
    topk          mean-pool q and k over each video tile (B, heads, tiles, D); score = pooled_q . pooled_k;
                  the local window (the window rule with ``local``) plus the ``keep`` best-scoring video tiles
                  outside it (ties: the lower tile index first)

``PATTERNS`` is the named registry the configuration (dit_fast.sparse.SparseAttention), the
calibration and the command line use: per pattern, how to build its video tile mask from parameters
and which parameters give a target density (the fraction of video token pairs kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from dit_fast._checks import check_int, check_int_triple, check_number
from dit_fast.ops.sparse_layout import SparseBlocks, TileLayout, with_extra_dense

Triple = Tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# Shared pieces: the window rule, video -> full tile masks, kept fractions
# ---------------------------------------------------------------------------------------------


def window_start(x: Tensor, size, length: int) -> Tensor:
    """First tile of the ``size``-tile window around tile ``x`` on an axis of ``length`` tiles."""
    return (x - (size - 1) // 2).clamp(min=0).minimum(length - torch.as_tensor(size))


def window_keeps(query: Tensor, key: Tensor, size, length: int) -> Tensor:
    """Whether the key tile coordinate lies in the query's window (broadcasting)."""
    start = window_start(query, size, length)
    return (key >= start) & (key < start + size)


def blocks_from_video_mask(layout: TileLayout, video: Tensor) -> SparseBlocks:
    """(B | 1, heads | 1, nv, nv) bool over the video tiles -> SparseBlocks over every tile, the extra
    (text) tiles dense both ways."""
    nv, n = layout.n_video_tiles, layout.n_tiles
    if video.shape[-2:] != (nv, nv):
        raise ValueError(f"a video tile mask must be (..., {nv}, {nv}) for layout {layout}, got {tuple(video.shape)}")
    while video.dim() < 4:
        video = video.unsqueeze(0)
    full = torch.zeros(*video.shape[:2], n, n, dtype=torch.bool, device=video.device)
    full[..., :nv, :nv] = video
    return SparseBlocks.from_tile_mask(layout, with_extra_dense(layout, full))


def video_fraction(layout: TileLayout, video: Tensor) -> float:
    """The fraction of video token pairs a video tile mask keeps (averaged over its leading dims)."""
    sizes = layout.tile_sizes()[:layout.n_video_tiles].to(device=video.device, dtype=torch.float64)
    kept = (video.to(torch.float64) @ sizes) @ sizes  # (...,) kept token pairs
    return float(kept.mean()) / float(layout.video_tokens) ** 2


def _check_layout(layout) -> TileLayout:
    if not isinstance(layout, TileLayout):
        raise TypeError(f"layout must be a dit_fast.ops.sparse_layout.TileLayout, got {type(layout).__name__}")
    return layout


def _check_window(name: str, window, layout: TileLayout) -> Triple:
    window = check_int_triple(name, window)
    tiles = layout.tiles_per_axis
    if any(w > n for w, n in zip(window, tiles, strict=True)):
        raise ValueError(f"{name} {window} (in tiles) is larger than the tile grid {tiles} (grid {layout.grid} in "
                         f"tiles of {layout.tile}); at most the whole grid")
    return window


def _per_head(name: str, value, check: Callable) -> list:
    """One value, or a list / tuple with one per head (a triple counts as one value where ``check`` takes triples)."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check(name, value)]


# ---------------------------------------------------------------------------------------------
# (a) Sliding tile windows (STA)
# ---------------------------------------------------------------------------------------------


def axis_window_mask(size: int, length: int) -> Tensor:
    """(length, length) bool: tile x keeps tile y along one axis (the window rule)."""
    x = torch.arange(length)
    return window_keeps(x[:, None], x[None, :], size, length)


def axis_fraction(layout: TileLayout, axis: int, size: int) -> float:
    """The fraction of token pairs along ``axis`` the window rule with ``size`` tiles keeps."""
    sizes = layout.axis_sizes(axis).double()
    mask = axis_window_mask(size, layout.tiles_per_axis[axis]).double()
    return float(sizes @ mask @ sizes) / layout.grid[axis] ** 2


def _outer(t: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """Per-axis tile masks (nt, nt), (nh, nh), (nw, nw) -> their conjunction (nv, nv) over raster tiles."""
    nt, nh, nw = t.shape[0], h.shape[0], w.shape[0]
    full = t[:, None, None, :, None, None] & h[None, :, None, None, :, None] & w[None, None, :, None, None, :]
    return full.reshape(nt * nh * nw, nt * nh * nw)


def sliding_tile_video_mask(layout: TileLayout, window: Triple) -> Tensor:
    """(nv, nv) bool: the window rule on each axis of the tile grid."""
    return _outer(*(axis_window_mask(w, n) for w, n in zip(window, layout.tiles_per_axis, strict=True)))


def sliding_tile(layout: TileLayout, window: Union[Sequence[int], Sequence[Sequence[int]]]) -> SparseBlocks:
    """Sliding Tile Attention: each query tile keeps the ``window`` = (wt, wh, ww) tiles around it.

    window: one triple for every head, or a list with one triple per head (blocks (1, heads, ...)).
    Returns SparseBlocks; the text tiles (layout.extra) are dense both ways."""
    layout = _check_layout(layout)
    windows = _per_head("window", window, lambda n, w: _check_window(n, w, layout))
    video = torch.stack([sliding_tile_video_mask(layout, w) for w in windows])[None]  # (1, heads | 1, nv, nv)
    return blocks_from_video_mask(layout, video)


def _token_coords(layout: TileLayout) -> Tuple[Tensor, Tensor]:
    """((S, 3) tile coordinates of each token, (S,) True for the video tokens), raster order; extra tokens get 0s."""
    T, H, W = layout.grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    video = torch.stack([t.flatten(), h.flatten(), w.flatten()], dim=1) // torch.tensor(layout.tile)
    coords = torch.cat([video, torch.zeros(layout.extra, 3, dtype=torch.int64)])
    is_video = torch.arange(layout.tokens) < layout.video_tokens
    return coords, is_video


def _with_extra_tokens(layout: TileLayout, mask: Tensor) -> Tensor:
    """A token mask (S, S) with the extra tokens (the last layout.extra) seeing and seen by everything."""
    _, is_video = _token_coords(layout)
    return mask & is_video[:, None] & is_video[None, :] | ~is_video[:, None] | ~is_video[None, :]


def sliding_tile_token_mask(layout: TileLayout, window: Triple) -> Tensor:
    """(S, S) bool, raster order: query token i sees key token j. The predicate sliding_tile's blocks must
    equal: spacetime_attention's window_tile rule (dit_fast/ops/flash_attention.py), text dense."""
    from dit_fast.ops.flash_attention import spacetime_mask

    video = spacetime_mask(layout.grid, "full", [w * t for w, t in zip(window, layout.tile, strict=True)],
                           window_tile=layout.tile)
    mask = torch.zeros(layout.tokens, layout.tokens, dtype=torch.bool)
    mask[:layout.video_tokens, :layout.video_tokens] = video
    return _with_extra_tokens(layout, mask)


# ---------------------------------------------------------------------------------------------
# (b) Radial (Radial Attention)
# ---------------------------------------------------------------------------------------------


def radial_slab(d: int, spatial_tiles: Tuple[int, int], decay: float, dense_radius: int) -> Optional[Tuple[int, int]]:
    """The spatial window (W_h, W_w) in tiles a query tile keeps in the key slab at temporal tile distance
    d, or None when it skips that slab (the module docstring's radial rule)."""
    nh, nw = spatial_tiles
    if d <= dense_radius:
        return nh, nw
    band = (d // (dense_radius + 1)).bit_length()  # >= 1; doubles of the distance past the dense band
    area = decay * nh * nw / 2 ** band  # tiles kept in this slab
    if area >= 1:
        scale = math.sqrt(area / (nh * nw))
        return min(nh, max(1, math.ceil(nh * scale))), min(nw, max(1, math.ceil(nw * scale)))
    return (1, 1) if d % math.ceil(1 / area) == 0 else None


def _radial_slabs(layout: TileLayout, decay: float, dense_radius: int):
    """Per temporal tile distance d: radial_slab's window (or None)."""
    nt, nh, nw = layout.tiles_per_axis
    return [radial_slab(d, (nh, nw), decay, dense_radius) for d in range(nt)]


def radial_video_mask(layout: TileLayout, decay: float = 1.0, dense_radius: int = 1, sink: bool = True) -> Tensor:
    """(nv, nv) bool: the radial rule over the tile grid."""
    nt, nh, nw = layout.tiles_per_axis
    ns = nh * nw
    spatial = torch.stack([_outer(torch.ones(1, 1, dtype=torch.bool), axis_window_mask(w[0], nh),
                                  axis_window_mask(w[1], nw)) if w is not None
                           else torch.zeros(ns, ns, dtype=torch.bool)
                           for w in _radial_slabs(layout, decay, dense_radius)])  # (nt, ns, ns) by distance
    a = torch.arange(nt)
    keep = spatial[(a[:, None] - a[None, :]).abs()]  # (nt_q, nt_k, ns, ns)
    if sink:
        keep[:, 0] = True
    return keep.permute(0, 2, 1, 3).reshape(nt * ns, nt * ns)


def radial_fraction(layout: TileLayout, decay: float, dense_radius: int = 1, sink: bool = True) -> float:
    """The fraction of video token pairs radial keeps, counted per slab (no tile mask built)."""
    nt = layout.tiles_per_axis[0]
    st = layout.axis_sizes(0).double()
    slab = torch.tensor([0.0 if w is None else axis_fraction(layout, 1, w[0]) * axis_fraction(layout, 2, w[1])
                         for w in _radial_slabs(layout, decay, dense_radius)], dtype=torch.float64)
    a = torch.arange(nt)
    per_pair = slab[(a[:, None] - a[None, :]).abs()]  # (nt_q, nt_k): spatial fraction kept
    if sink:
        per_pair[:, 0] = 1.0
    return float(st @ per_pair @ st) / layout.grid[0] ** 2


def radial(layout: TileLayout, decay: float = 1.0, dense_radius: int = 1, sink: bool = True) -> SparseBlocks:
    """Radial Attention on the tile grid (module docstring): dense within ``dense_radius`` temporal tiles,
    then a spatial window whose area halves each time the temporal distance doubles (``decay`` scales it),
    plus the first temporal slab (``sink``). Text tiles dense. Blocks shared by every head."""
    layout = _check_layout(layout)
    decay = check_number("decay", decay, 0, low_open=True)
    dense_radius = check_int("dense_radius", dense_radius, low=0)
    if not isinstance(sink, bool):
        raise TypeError(f"sink must be True or False, got {sink!r}")
    return blocks_from_video_mask(layout, radial_video_mask(layout, decay, dense_radius, sink)[None, None])


def radial_token_mask(layout: TileLayout, decay: float = 1.0, dense_radius: int = 1, sink: bool = True) -> Tensor:
    """(S, S) bool, raster order: the predicate radial's blocks must equal, token by token."""
    coords, _ = _token_coords(layout)
    nt, nh, nw = layout.tiles_per_axis
    mask = torch.zeros(layout.tokens, layout.tokens, dtype=torch.bool)
    for i in range(layout.video_tokens):
        a, b, c = coords[i].tolist()
        for j in range(layout.video_tokens):
            a2, b2, c2 = coords[j].tolist()
            if sink and a2 == 0:
                mask[i, j] = True
                continue
            window = radial_slab(abs(a - a2), (nh, nw), decay, dense_radius)
            if window is None:
                continue
            h0 = min(max(b - (window[0] - 1) // 2, 0), nh - window[0])
            w0 = min(max(c - (window[1] - 1) // 2, 0), nw - window[1])
            mask[i, j] = h0 <= b2 < h0 + window[0] and w0 <= c2 < w0 + window[1]
    return _with_extra_tokens(layout, mask)


# ---------------------------------------------------------------------------------------------
# (c) Dynamic top-k on tile-pooled q and k (VSA's coarse stage)
# ---------------------------------------------------------------------------------------------


def _check_qk(q: Tensor, k: Tensor, layout: TileLayout) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[1] != layout.tokens:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be (B, S = {layout.tokens}, heads, D) for layout grid {layout.grid} with "
                             f"{layout.extra} extra tokens, got {shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")


def tile_means(x: Tensor, layout: TileLayout, order: str = "raster") -> Tensor:
    """x (B, S, heads, D) -> (B, heads, nv, D) fp32: the mean of each video tile's tokens."""
    tile_of = layout.token_tile(x.device)
    if order == "tiles":
        tile_of = tile_of[layout.perm(x.device)]
    elif order != "raster":
        raise ValueError(f"order must be 'raster' or 'tiles', got {order!r}")
    B, _, heads, D = x.shape
    sums = torch.zeros(B, layout.n_tiles, heads, D, dtype=torch.float32, device=x.device)
    sums.index_add_(1, tile_of, x.float())
    sizes = layout.tile_sizes().to(x.device, torch.float32)
    return (sums / sizes[None, :, None, None])[:, :layout.n_video_tiles].transpose(1, 2)


def topk_video_mask(q: Tensor, k: Tensor, layout: TileLayout, keep: Sequence[int], local: Triple,
                    order: str = "raster") -> Tensor:
    """(B, heads, nv, nv) bool: the local window plus each head's keep[h] best video tiles outside it."""
    nv = layout.n_video_tiles
    local_mask = sliding_tile_video_mask(layout, local).to(q.device)  # (nv, nv)
    scores = tile_means(q, layout, order) @ tile_means(k, layout, order).transpose(-1, -2)  # (B, heads, nv, nv)
    scores = scores.masked_fill(local_mask, float("-inf"))  # the local tiles are kept anyway
    ranked = scores.sort(dim=-1, descending=True, stable=True).indices  # best first, ties: lower index
    keep = torch.as_tensor(list(keep), device=q.device).clamp(max=nv - int(local_mask.sum(-1).min()))
    chosen = torch.arange(nv, device=q.device) < keep.view(-1, 1, 1)  # (heads | 1, 1, nv) by rank
    video = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, ranked, chosen.expand_as(ranked))
    return video | local_mask


def topk(q: Tensor, k: Tensor, layout: TileLayout, keep: Union[int, Sequence[int]],
         local: Sequence[int] = (1, 1, 1), order: str = "raster") -> SparseBlocks:
    """Dynamic top-k blocks from this call's q and k (B, S, heads, D) in ``order``: each query tile keeps
    its local window (``local`` tiles per axis) and the ``keep`` best video tiles outside it by the score
    of the tile-pooled q and k; keep may be one int or one per head. Blocks (B, heads, ...); text dense."""
    layout = _check_layout(layout)
    _check_qk(q, k, layout)
    local = _check_window("local", local, layout)
    keeps = [check_int(f"keep[{i}]", n, low=0) for i, n in enumerate(keep)] if isinstance(keep, (list, tuple)) \
        else [check_int("keep", keep, low=0)]
    if len(keeps) not in (1, q.shape[2]):
        raise ValueError(f"keep has {len(keeps)} values but q has {q.shape[2]} heads: give one, or one per head")
    with torch.no_grad():
        return blocks_from_video_mask(layout, topk_video_mask(q, k, layout, keeps, local, order))


def topk_token_mask(q: Tensor, k: Tensor, layout: TileLayout, keep: int, local: Triple) -> Tensor:
    """(B, heads, S, S) bool, raster order: the predicate topk's blocks must equal, written with loops."""
    coords, is_video = _token_coords(layout)
    tile_of = layout.token_tile()
    nv = layout.n_video_tiles
    B, S, heads, _ = q.shape
    local_tokens = sliding_tile_token_mask(layout, local)
    mask = torch.zeros(B, heads, S, S, dtype=torch.bool)
    for b in range(B):
        for h in range(heads):
            pooled_q = torch.stack([q[b, tile_of == i, h].double().mean(0) for i in range(nv)])
            pooled_k = torch.stack([k[b, tile_of == i, h].double().mean(0) for i in range(nv)])
            for i in range(nv):
                members = tile_of == i
                local_tiles = set(tile_of[local_tokens[members.nonzero()[0, 0]] & is_video].tolist())
                scores = {j: float(pooled_q[i] @ pooled_k[j]) for j in range(nv) if j not in local_tiles}
                best = sorted(scores, key=lambda j: (-scores[j], j))[:keep]
                kept = torch.tensor([int(t) in local_tiles or int(t) in best for t in tile_of])
                mask[b, h, members] = kept & is_video
    return _with_extra_tokens(layout, mask)


# ---------------------------------------------------------------------------------------------
# The registry: build a pattern from parameters, and the parameters of a target density
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """A named pattern: ``video_mask(layout, q, k, order, **params)`` -> (B | 1, heads | 1, nv, nv) bool;
    ``for_density(layout, density, **options)`` -> the params whose kept video fraction is the smallest
    one >= density (or the pattern's floor); ``dynamic``: the mask depends on q and k (rebuilt each call)."""
    name: str
    dynamic: bool
    video_mask: Callable[..., Tensor]
    for_density: Callable[..., dict]


def _sliding_mask(layout, q, k, order, window):
    return sliding_tile_video_mask(layout, tuple(window))[None, None]


def _sliding_for_density(layout, density):
    """The window whose kept fraction (the product of the axes') is the smallest >= density, up to 5%;
    among those, the most even share of the axes. The whole grid for density 1."""
    per_axis = [[axis_fraction(layout, axis, w) for w in range(1, n + 1)]
                for axis, n in enumerate(layout.tiles_per_axis)]
    best = None
    for wt, ft in enumerate(per_axis[0], 1):
        for wh, fh in enumerate(per_axis[1], 1):
            for ww, fw in enumerate(per_axis[2], 1):
                fraction = ft * fh * fw
                if fraction >= density - 1e-12:
                    key = (math.floor(math.log(fraction / density + 1e-12) / math.log(1.05)),
                           max(ft, fh, fw) / min(ft, fh, fw))
                    if best is None or key < best[0]:
                        best = (key, [wt, wh, ww])
    return {"window": best[1]}


RADIAL_DECAYS = tuple(2.0 ** (e / 2) for e in range(-16, 17))  # 1/256 ... 256, by sqrt(2)


def _radial_mask(layout, q, k, order, decay, dense_radius=1, sink=True):
    return radial_video_mask(layout, decay, dense_radius, sink)[None, None]


def _radial_for_density(layout, density, dense_radius=None, sink=None):
    """The smallest decay reaching density, with Radial's dense band and sink (dense_radius 1, sink) when
    they leave room, else without them (a short tile grid: few temporal tiles); the sparsest if none does."""
    options = [(r, s) for r in ((1, 0) if dense_radius is None else (dense_radius,))
               for s in ((True, False) if sink is None else (sink,))]
    for r, s in options:
        fractions = [radial_fraction(layout, decay, r, s) for decay in RADIAL_DECAYS]
        if fractions[0] <= density + 1e-12:  # kept fraction grows with decay: the first that reaches density
            decay = next((d for d, f in zip(RADIAL_DECAYS, fractions, strict=True) if f >= density - 1e-12),
                         RADIAL_DECAYS[-1])
            return {"decay": decay, "dense_radius": r, "sink": s}
    return {"decay": RADIAL_DECAYS[0], "dense_radius": options[-1][0], "sink": options[-1][1]}


def _topk_mask(layout, q, k, order, keep, local=(1, 1, 1)):
    if q is None or k is None:
        raise ValueError("the topk pattern scores this call's q and k: it needs them")
    return topk_video_mask(q, k, layout, [keep], tuple(local), order)


def _topk_for_density(layout, density, local=(1, 1, 1)):
    local = [min(w, n) for w, n in zip(local, layout.tiles_per_axis, strict=True)]
    nv, local_tiles = layout.n_video_tiles, math.prod(local)
    return {"keep": max(0, min(nv - local_tiles, math.ceil(density * nv - 1e-9) - local_tiles)), "local": local}


def _dense_mask(layout, q, k, order):
    nv = layout.n_video_tiles
    return torch.ones(1, 1, nv, nv, dtype=torch.bool)


PATTERNS: Dict[str, Pattern] = {
    "sliding_tile": Pattern("sliding_tile", False, _sliding_mask, _sliding_for_density),
    "radial": Pattern("radial", False, _radial_mask, _radial_for_density),
    "topk": Pattern("topk", True, _topk_mask, _topk_for_density),
    "dense": Pattern("dense", False, _dense_mask, lambda layout, density: {}),
}


def video_mask(choice: dict, layout: TileLayout, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
               order: str = "raster") -> Tensor:
    """The (B | 1, heads | 1, nv, nv) video tile mask of one choice {"pattern": name, **params}."""
    params = dict(choice)
    name = params.pop("pattern")
    if name not in PATTERNS:
        raise ValueError(f"unknown sparse pattern {name!r}; known: {', '.join(PATTERNS)}")
    return PATTERNS[name].video_mask(layout, q, k, order, **params).to(q.device if q is not None else "cpu")


def blocks_for_heads(choices: Sequence[dict], layout: TileLayout, q: Optional[Tensor] = None,
                     k: Optional[Tensor] = None, order: str = "raster") -> SparseBlocks:
    """SparseBlocks with one choice per head (B | 1, heads, ...); one choice for every head: (B | 1, 1, ...)."""
    masks = [video_mask(c, layout, None if q is None else q[:, :, [h]], None if k is None else k[:, :, [h]], order)
             for h, c in enumerate(choices)] if len(choices) > 1 else [video_mask(choices[0], layout, q, k, order)]
    if len(masks) == 1:
        return blocks_from_video_mask(layout, masks[0])
    batch = max(m.shape[0] for m in masks)
    return blocks_from_video_mask(layout, torch.cat([m.expand(batch, 1, -1, -1) for m in masks], dim=1))


__all__ = ["PATTERNS", "Pattern", "blocks_for_heads", "blocks_from_video_mask", "radial", "radial_slab",
           "radial_token_mask", "radial_video_mask", "sliding_tile", "sliding_tile_token_mask",
           "sliding_tile_video_mask", "tile_means", "topk", "topk_token_mask", "topk_video_mask", "video_fraction",
           "video_mask", "window_keeps", "window_start"]
