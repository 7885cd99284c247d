"""Windows: the token-exact 3D window and the tile-granular one (Sliding Tile Attention).

The kernels must skip the tiles outside every window (counted through the CPU interpreter's calls of
the tile helpers) and match the reference where they do visit; the reference masks themselves are
checked against hand-counted windows. Mode-by-dtype correctness of the windows lives in
tests/test_attention.py's matrix; here the cases that need more tokens (interior tiles, wide frames).
"""

import pytest
import torch

from dit_fast import ops
from dit_fast.ops.flash_attention import spacetime_mask
from tests.conftest import HAS_GPU
from tests.launches import count_launches
from tests.test_attention import _bad, _check_against_reference, _count_calls, _qkv, assert_kernels_ran

GRID = (3, 5, 7)


def _visits(monkeypatch, grid, window):
    """Tile visits of forward, dk/dv and dq (one call each per tile pair) for a window on a grid."""
    counters = _count_calls(monkeypatch, ("_fwd_tile", "_dkdv_tile", "_dq_tile"))
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, S, S, 1, 16, torch.float32))
    with count_launches() as launches:
        out = ops.spacetime_attention(q, k, v, grid, window=window, backend="triton")
        torch.autograd.grad(out.sum(), (q, k, v))
    assert_kernels_ran(launches)
    return {name: c.calls for name, c in counters.items()}


@pytest.mark.skipif(HAS_GPU, reason="counts tile visits through the CPU interpreter")
def test_window_skips_the_tiles_outside_the_window(monkeypatch):
    """Work scales with the kept tiles: forward, dk/dv and dq visit ~1/3 of the dense tile pairs for a
    window keeping 1/4 of the keys (2 of 4 frames, 3 of 6 rows; 16-token tiles span two rows of 8)."""
    dense = (192 // 16) ** 2  # 12 x 12 pairs of 16-token tiles
    visits = _visits(monkeypatch, (4, 6, 8), (2, 3, 8))
    assert all(0 < n <= 0.4 * dense for n in visits.values()), visits
    # frames wider than a tile: tiles inside one row also skip the columns outside their windows (a
    # window of all 40 columns is the dense attention over 120 tokens: 8 x 8 pairs)
    visits = _visits(monkeypatch, (1, 3, 40), (1, 3, 9))
    assert all(0 < n <= 0.8 * 8 * 8 for n in visits.values()), visits


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_window_interior_tiles_match_reference(deterministic):
    """Frames as wide as the window (W = 8 = ww): many key tiles lie inside every query's window and
    skip the window test; with the tiles at the window's edges, still the reference's result."""
    grid = (4, 6, 8)
    inputs = _qkv(1, 192, 192, 1, 64, torch.float32)

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, grid, window=(2, 3, 8), return_lse=True, backend=backend,
                                       deterministic=deterministic)

    _check_against_reference(fn, inputs, torch.bfloat16, deterministic=deterministic)


@pytest.mark.skipif(HAS_GPU, reason="counts Python calls of the kernels' helpers, which only the CPU interpreter "
                    "makes; on a GPU the window correctness tests cover the compiled kernels")
def test_window_test_skipped_on_interior_tiles(monkeypatch):
    """The per-score window test runs only on tiles at a window's edge: interior tiles cost what dense
    ones do. Grid (4, 6, 8), window (2, 3, 8), 16-token tiles (2 rows of 8)."""
    names = ("_fwd_tile", "_dkdv_tile", "_dq_tile", "_window_allowed")
    counters = _count_calls(monkeypatch, names)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 192, 192, 1, 16, torch.float32))
    with count_launches() as launches:
        out = ops.spacetime_attention(q, k, v, (4, 6, 8), window=(2, 3, 8), backend="triton")
        torch.autograd.grad(out.sum(), (q, k, v))
    assert_kernels_ran(launches)
    visits = sum(counters[name].calls for name in names[:3])
    tests = counters["_window_allowed"].calls
    assert 0 < tests <= 0.75 * visits, (tests, visits)


def test_window_on_wide_frames_matches_reference():
    """W = 40 > the 16-token tiles: runs restricted to the window's columns inside one row."""
    grid = (1, 3, 40)
    inputs = _qkv(1, 120, 120, 1, 72, torch.float32)

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, grid, window=(1, 3, 9), rope="3d", rope_in_kernel=True,
                                       return_lse=True, backend=backend)

    _check_against_reference(fn, inputs, torch.float32)


def test_window_reference_mask_is_the_shifted_3d_window():
    """The reference mask: along each axis a query sees exactly w positions, centred, shifted inside."""
    grid, window = (3, 5, 7), (2, 3, 5)
    mask = spacetime_mask(grid, "full", window)
    assert (mask.sum(1) == 2 * 3 * 5).all()
    pos = [(t, h, w) for t in range(3) for h in range(5) for w in range(7)]
    i = pos.index((0, 2, 6))  # t at the start border, h centred, w at the end border
    seen = {pos[j] for j in mask[i].nonzero().flatten().tolist()}
    assert seen == {(t, h, w) for t in (0, 1) for h in (1, 2, 3) for w in (2, 3, 4, 5, 6)}
    full = spacetime_mask(grid, "full", (3, 5, 7))
    assert full.all()


# ---- tile-granular windows (Sliding Tile Attention) ----------------------------------------------


@pytest.mark.skipif(HAS_GPU, reason="counts Python calls of the kernels' helpers, which only the CPU interpreter "
                    "makes; on a GPU the tile window correctness tests cover the compiled kernels")
@pytest.mark.parametrize("grid,window_tile,window", [((2, 8, 12), (1, 4, 4), (2, 4, 8)),
                                                     ((3, 5, 7), (1, 4, 4), (1, 4, 8)),
                                                     ((3, 5, 7), (2, 4, 4), (2, 4, 8))])
def test_tile_window_visits_only_the_kept_tiles(monkeypatch, grid, window_tile, window):
    """Forward, dk/dv and dq each visit exactly (query tiles) x (kept key tiles per query tile) tile pairs,
    V // 16 x V // 16 blocks of 16 tokens per pair, and never test the token window."""
    names = ("_fwd_tile", "_dkdv_tile", "_dq_tile", "_window_allowed")
    counters = _count_calls(monkeypatch, names)
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, S, S, 1, 16, torch.float32))
    with count_launches() as launches:
        out = ops.spacetime_attention(q, k, v, grid, window=window, window_tile=window_tile, backend="triton")
        torch.autograd.grad(out.sum(), (q, k, v))
    assert_kernels_ran(launches)
    tiles = [-(-n // t) for n, t in zip(grid, window_tile, strict=True)]
    kept = [w // t for w, t in zip(window, window_tile, strict=True)]
    blocks = window_tile[0] * window_tile[1] * window_tile[2] // 16  # 16-token blocks per tile
    pairs = tiles[0] * tiles[1] * tiles[2] * kept[0] * kept[1] * kept[2]
    want = pairs * blocks * blocks
    assert {name: counters[name].calls for name in names} == {
        "_fwd_tile": want, "_dkdv_tile": want, "_dq_tile": want, "_window_allowed": 0}
    assert kept[0] * kept[1] * kept[2] < tiles[0] * tiles[1] * tiles[2]  # fewer than dense


def test_tile_window_reference_mask_counts_the_window_in_tiles():
    """The reference mask: a query sees whole key tiles, the window of tiles around its own tile,
    centred and shifted inside the tile grid; tiles of one token give back the token window."""
    pos = [(t, h, w) for t in range(5) for h in range(6) for w in range(9)]
    mask = spacetime_mask((5, 6, 9), "full", (4, 4, 4), window_tile=(2, 4, 2))
    # query (4, 0, 8): tile (2, 0, 4) of a 3 x 2 x 5 tile grid; window 2 x 1 x 2 tiles, shifted in at t and w
    seen = {pos[j] for j in mask[pos.index((4, 0, 8))].nonzero().flatten().tolist()}
    assert seen == {(t, h, w) for t in (2, 3, 4) for h in range(4) for w in (6, 7, 8)}
    # every query of one tile sees the same keys
    tile_of = [(t // 2, h // 4, w // 2) for t, h, w in pos]
    for i in range(len(pos)):
        j = tile_of.index(tile_of[i])
        assert torch.equal(mask[i], mask[j])
    mask = spacetime_mask((3, 5, 7), "full", (1, 4, 8), window_tile=(1, 4, 4))
    pos = [(t, h, w) for t in range(3) for h in range(5) for w in range(7)]
    seen = {pos[j] for j in mask[pos.index((1, 4, 0))].nonzero().flatten().tolist()}
    assert seen == {(1, 4, w) for w in range(7)}  # the partial last row of tiles: h = 4 only
    assert torch.equal(spacetime_mask((3, 5, 7), "full", (2, 3, 5), window_tile=(1, 1, 1)),
                       spacetime_mask((3, 5, 7), "full", (2, 3, 5)))


def test_tile_window_configs_divide_the_tile():
    """TILED: the autotuner only keeps blocks that divide the tile's volume (a query block inside one
    tile, a key tile a whole number of key blocks)."""
    import triton

    from dit_fast.triton_kernels.attention import SPACE, _prune

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in SPACE]
    q = torch.empty(1, dtype=torch.bfloat16)
    for tile, allowed in (((2, 4, 4), {16, 32}), ((3, 4, 4), {16}), ((4, 8, 8), {16, 32, 64, 128})):
        named = dict(LQ_BUCKET=16384, LK_BUCKET=16384, Q_ptr=q, TILE_T=tile[0], TILE_H=tile[1], TILE_W=tile[2])
        kept = _prune(configs, named, TILED=True, BLOCK_D0=128, BLOCK_D1=0)
        assert kept and all(c.kwargs["BLOCK_M"] in allowed and c.kwargs["BLOCK_N"] in allowed for c in kept), tile
    named = dict(LQ_BUCKET=16384, LK_BUCKET=16384, Q_ptr=q, TILE_T=1, TILE_H=1, TILE_W=1)
    assert any(c.kwargs["BLOCK_M"] == 128 for c in _prune(configs, named, TILED=False, BLOCK_D0=128, BLOCK_D1=0))


def test_tile_window_bad_input_raises_clear_errors():
    q, k, v = _qkv(1, 105, 105, 2, 64, torch.float32)
    st = ops.spacetime_attention
    _bad(ValueError, r"window_tile \(1, 4, 4\) needs a window", lambda: st(q, k, v, GRID, window_tile=(1, 4, 4)))
    for bad in ((1, 4), (1, 0, 4), (1, 4.0, 4), "144"):
        _bad(ValueError, "window_tile must be three positive ints",
             lambda bad=bad: st(q, k, v, GRID, window=(1, 4, 8), window_tile=bad))
    _bad(ValueError, r"window \(1, 4, 6\) must be a multiple of window_tile \(1, 4, 4\)",
         lambda: st(q, k, v, GRID, window=(1, 4, 6), window_tile=(1, 4, 4)))
    _bad(ValueError, r"window \(1, 4, 12\) is \(1, 1, 3\) tiles of \(1, 4, 4\), larger than the grid \(3, 5, 7\) "
         r"in tiles \(3, 2, 2\)", lambda: st(q, k, v, GRID, window=(1, 4, 12), window_tile=(1, 4, 4)))
    _bad(ValueError, r"window \(1, 12, 4\) is \(1, 3, 1\) tiles", lambda: st(q, k, v, GRID, window=(1, 12, 4),
                                                                             window_tile=(1, 4, 4)))
    _bad(ValueError, r"window_tile \(1, 3, 4\) has 12 tokens: the kernels need a multiple of 16",
         lambda: st(q, k, v, GRID, window=(1, 3, 4), window_tile=(1, 3, 4)))
    _bad(ValueError, "window_tile needs mode='full', got mode='spatial'",
         lambda: st(q, k, v, GRID, mode="spatial", window_tile=(1, 4, 4)))
    _bad(ValueError, "window_tile needs mode='full', got mode='temporal'",
         lambda: st(q, k, v, GRID, mode="temporal", window=(2, 1, 1), window_tile=(1, 4, 4)))
