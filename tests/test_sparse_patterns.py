"""Sparse patterns (dit_fast/sparse/patterns.py): each pattern's blocks equal its token-level predicate.

Layouts with partial edge tiles (odd, prime grid sizes), text tokens after the video (the extra tiles,
dense both ways) and per-head windows; the densities the configuration asks for; radial's O(S log S)
growth; clear errors for bad input. The kernels run one pattern through the interpreter (launch counts).
"""

import itertools
import math

import pytest
import torch

from dit_fast.ops.block_sparse import block_sparse_attention, block_sparse_attention_reference
from dit_fast.ops.flash_attention import attention_reference
from dit_fast.ops.sparse_layout import TileLayout
from dit_fast.sparse import patterns as P
from tests.launches import count_launches

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU

LAYOUTS = [TileLayout((5, 7, 6), (2, 3, 4), extra=5),  # partial tiles on every axis, 5 text tokens (a partial tile)
           TileLayout((3, 5, 7), (1, 2, 2))]  # one frame per tile, no text


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("window", [(1, 1, 1), (2, 2, 1), (3, 2, 2)])
def test_sliding_tile_equals_its_predicate(layout, window):
    window = tuple(min(w, n) for w, n in zip(window, layout.tiles_per_axis, strict=True))
    blocks = P.sliding_tile(layout, window)
    assert blocks.kv_count.shape == (1, 1, layout.n_tiles)
    assert torch.equal(blocks.token_mask()[0, 0], P.sliding_tile_token_mask(layout, window))


def test_sliding_tile_per_head_windows():
    layout = LAYOUTS[0]
    windows = [(1, 1, 1), (3, 3, 2), (2, 1, 2)]
    mask = P.sliding_tile(layout, windows).token_mask()
    assert mask.shape == (1, 3, layout.tokens, layout.tokens)
    for h, w in enumerate(windows):
        assert torch.equal(mask[0, h], P.sliding_tile_token_mask(layout, w))


@pytest.mark.parametrize("layout", [LAYOUTS[0], TileLayout((11, 3, 5), (1, 2, 2), extra=3)], ids=str)
@pytest.mark.parametrize("decay,dense_radius,sink", [(1.0, 1, True), (0.3, 0, False), (0.05, 1, False),
                                                     (4.0, 0, True)])
def test_radial_equals_its_predicate(layout, decay, dense_radius, sink):
    blocks = P.radial(layout, decay=decay, dense_radius=dense_radius, sink=sink)
    expected = P.radial_token_mask(layout, decay, dense_radius, sink)
    assert torch.equal(blocks.token_mask()[0, 0], expected)
    video = P.radial_video_mask(layout, decay, dense_radius, sink)
    assert P.radial_fraction(layout, decay, dense_radius, sink) == pytest.approx(P.video_fraction(layout, video))


def test_radial_is_dense_near_the_diagonal_and_shrinks_with_distance():
    layout = TileLayout((16, 8, 8), (1, 1, 1))
    video = P.radial_video_mask(layout, decay=1.0, dense_radius=1, sink=False).view(16, 64, 16, 64)
    kept = video.sum(-1).float().mean(1)  # (query frame, key frame): key tiles kept per query tile
    assert kept[5, 5] == kept[5, 6] == 64  # |d| <= 1: the whole slab
    assert kept[5, 8] == 6 * 6  # d = 3 (band 1): area 64 / 2 -> a window of ceil(8 / sqrt(2)) = 6 per axis
    assert kept[5, 12] == 4 * 4  # d = 7 (band 2): area 64 / 4 -> 4 x 4
    assert kept[5, 13] == 3 * 3  # d = 8 (band 3): area 8 -> ceil(8 / sqrt(8)) = 3 per axis


def test_radial_without_a_dense_band():
    """dense_radius = 0: only the query's own slab is whole; band g = bit_length(d) covers distances
    [2^(g-1), 2^g), each keeping an area of 64 / 2^g tiles (a window of ceil(8 / sqrt(2^g)) per axis)."""
    layout = TileLayout((16, 8, 8), (1, 1, 1))
    video = P.radial_video_mask(layout, decay=1.0, dense_radius=0, sink=False).view(16, 64, 16, 64)
    kept = video.sum(-1).float().mean(1)  # (query frame, key frame): key tiles kept per query tile
    assert kept[5, 5] == 64  # d = 0: the whole slab
    assert kept[5, 6] == kept[5, 4] == 6 * 6  # d = 1 (band 1): area 32 -> ceil(8 / sqrt(2)) = 6 per axis
    assert kept[5, 7] == kept[5, 8] == 4 * 4  # d = 2, 3 (band 2): area 16 -> 4 x 4
    assert kept[5, 9] == kept[5, 12] == 3 * 3  # d = 4, 7 (band 3): area 8 -> ceil(8 / sqrt(8)) = 3
    assert kept[5, 13] == 2 * 2  # d = 8 (band 4): area 4 -> 2 x 2


def test_radial_kept_pairs_grow_as_s_log_s():
    """Kept key tiles per query tile grow by about a constant per doubling of the frames (O(S log S) in
    all), unlike dense (doubling)."""
    per_query = []
    for frames in (8, 16, 32, 64):
        layout = TileLayout((frames, 8, 8), (1, 2, 2))  # 16 spatial tiles per frame
        video = P.radial_video_mask(layout, decay=1.0, dense_radius=1, sink=True)
        per_query.append(video.sum(-1).float().mean().item())
    steps = [b - a for a, b in itertools.pairwise(per_query)]  # measured: 86.5, 125.3, 168.6, 206.6
    assert 0 < min(steps) and max(steps) <= 1.3 * min(steps), (per_query, steps)  # a constant per doubling
    assert per_query[-1] < 3 * per_query[0]  # 8x the frames: dense would keep 8x the tiles


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("keep,local", [(0, (1, 1, 1)), (3, (1, 1, 1)), (2, (2, 1, 2))])
def test_topk_equals_its_predicate(layout, keep, local):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, layout.tokens, 2, 16, generator=g)
    k = torch.randn(2, layout.tokens, 2, 16, generator=g)
    local = tuple(min(w, n) for w, n in zip(local, layout.tiles_per_axis, strict=True))
    blocks = P.topk(q, k, layout, keep=keep, local=local)
    assert blocks.kv_count.shape == (2, 2, layout.n_tiles)
    assert torch.equal(blocks.token_mask(), P.topk_token_mask(q, k, layout, keep, local))
    counts = blocks.kv_count[..., :layout.n_video_tiles]  # video query tiles: local + keep video tiles + text
    assert (counts == math.prod(local) + keep + layout.n_extra_tiles).all()


def test_topk_in_tile_order_equals_raster():
    layout = LAYOUTS[0]
    q, k = torch.randn(2, 1, layout.tokens, 2, 16).unbind(0)
    raster = P.topk(q, k, layout, keep=2)
    tiles = P.topk(layout.to_tiles(q), layout.to_tiles(k), layout, keep=2, order="tiles")
    assert torch.equal(raster.tile_mask(), tiles.tile_mask())


def test_topk_per_head_keep():
    layout = LAYOUTS[1]
    q, k = torch.randn(2, 1, layout.tokens, 3, 16).unbind(0)
    blocks = P.topk(q, k, layout, keep=[0, 2, 5])
    assert blocks.kv_count[0, :, 0].tolist() == [1, 3, 6]


@pytest.mark.parametrize("name", ["sliding_tile", "radial", "topk"])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_for_density_reaches_the_density_asked(name, density):
    layout = TileLayout((21, 30, 52), (4, 4, 4))  # Wan2.1's 480p latent grid: partial tiles on two axes
    params = P.PATTERNS[name].for_density(layout, density)
    if name == "topk":  # exact by construction: (local + keep) tiles of each query tile
        assert (params["keep"] + 1) / layout.n_video_tiles == pytest.approx(density, abs=1 / layout.n_video_tiles)
        return
    fraction = P.video_fraction(layout, P.video_mask({"pattern": name, **params}, layout))
    assert density <= fraction
    if name == "sliding_tile":
        assert fraction <= density * 1.1


def test_pattern_errors_name_the_argument():
    layout = LAYOUTS[0]  # 3 x 3 x 2 tiles
    with pytest.raises(ValueError, match=r"window \(1, 4, 1\).*tile grid \(3, 3, 2\)"):
        P.sliding_tile(layout, (1, 4, 1))
    with pytest.raises(ValueError, match="window"):
        P.sliding_tile(layout, (0, 1, 1))
    with pytest.raises(ValueError, match="decay"):
        P.radial(layout, decay=0.0)
    with pytest.raises(TypeError, match="layout"):
        P.radial((5, 7, 6))
    q = torch.randn(1, layout.tokens - 1, 2, 16)
    with pytest.raises(ValueError, match=r"q must be \(B, S = 215"):
        P.topk(q, q, layout, keep=1)
    q = torch.randn(1, layout.tokens, 2, 16)
    with pytest.raises(ValueError, match="keep"):
        P.topk(q, q, layout, keep=-1)
    with pytest.raises(ValueError, match="3 values but q has 2 heads"):
        P.topk(q, q, layout, keep=[1, 2, 3])


@pytest.mark.parametrize("pattern", ["sliding_tile", "radial", "topk"])
def test_pattern_blocks_through_the_op_equal_the_predicate(pattern):
    """The op on a pattern's blocks (torch path) equals attention_reference with the pattern's own predicate."""
    layout = LAYOUTS[0]
    q, k, v = torch.randn(3, 2, layout.tokens, 2, 16, dtype=torch.float64).unbind(0)
    if pattern == "sliding_tile":
        blocks, mask = P.sliding_tile(layout, (2, 1, 1)), P.sliding_tile_token_mask(layout, (2, 1, 1))
    elif pattern == "radial":
        blocks, mask = P.radial(layout, decay=0.3, dense_radius=0), P.radial_token_mask(layout, 0.3, 0)
    else:
        blocks, mask = P.topk(q, k, layout, keep=2), P.topk_token_mask(q, k, layout, 2, (1, 1, 1))
    out = block_sparse_attention(q, k, v, blocks, backend="torch")
    torch.testing.assert_close(out, attention_reference(q, k, v, mask=mask), rtol=0, atol=1e-12)


def test_sliding_tile_on_the_kernels():
    """A pattern's blocks through the Triton kernels (the interpreter here): forward and backward launch,
    and equal the reference on the same blocks."""
    layout = TileLayout((2, 3, 5), (1, 2, 4), extra=3)  # 33 tokens, 8 tiles, partial ones
    blocks = P.sliding_tile(layout, (1, 2, 1))
    q, k, v = (torch.randn(1, layout.tokens, 1, 16, device=KERNEL_DEVICE, requires_grad=True) for _ in range(3))
    with count_launches() as launches:
        out = block_sparse_attention(q, k, v, blocks.to(KERNEL_DEVICE), backend="triton")
        out.backward(torch.ones_like(out))
    assert launches.total("_sparse_fwd") == 1 and launches.total("_sparse") >= 3, launches
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*leaves, blocks)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4)
    for got, want in zip((q, k, v), leaves, strict=True):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=1e-4, atol=1e-4)


def test_radial_band_starts_right_after_the_dense_radius():
    """Past the dense band the window shrinks at once, whatever the radius (band >= 1): with dense_radius 2,
    distance 3 keeps half the area of a slab, distance 6 a quarter (radius 0 and 1 unchanged)."""
    from dit_fast.sparse.patterns import radial_slab

    full = (8, 8)
    assert [radial_slab(d, full, 1.0, 2) for d in range(3)] == [full] * 3
    assert radial_slab(3, full, 1.0, 2) == (6, 6) and radial_slab(5, full, 1.0, 2) == (6, 6)  # area 32
    assert radial_slab(6, full, 1.0, 2) == (4, 4)  # area 16
    assert [radial_slab(d, full, 1.0, 1) for d in (2, 3, 4)] == [(6, 6), (6, 6), (4, 4)]
    assert [radial_slab(d, full, 1.0, 0) for d in (1, 2, 3)] == [(6, 6), (4, 4), (4, 4)]
