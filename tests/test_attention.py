"""Attention kernels against the SDPA reference: every mode, forward and dq/dk/dv, fp32/fp16/bf16.

On CPU the Triton kernels run in the interpreter (tests/conftest.py), so the shapes are tiny and odd:
a (3, 5, 7) grid, head dims 72 and 64, one 16 x 16 tile configuration. The GPU tests at the end add
large shapes, every head dim and offsets past 2^31 elements.
"""

import os
import tempfile
from pathlib import Path

import pytest
import torch

from dit_fast import nn as dnn
from dit_fast import ops
from dit_fast.ops.attention import spacetime_attention_reference, spacetime_mask
from dit_fast.ops.rope import RoPE3D
from tests.conftest import HAS_GPU, kernel_devices
from tests.utils import ATOL_FLOOR, assert_close_to_reference

DEVICE = kernel_devices()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _qkv(B, Sq, Sk, heads, D, dtype, device=DEVICE):
    return [torch.randn(B, S, heads, D, device=device, dtype=dtype) for S in (Sq, Sk, Sk)]


def _run(fn, inputs, dout, backend):
    """fn(q, k, v, backend) -> (out, lse); returns out, lse and the grads of q, k, v for dout."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = fn(*leaves, backend)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out, lse, *grads]


def _check_against_reference(fn, inputs, dtype, factor=2.0):
    """Kernel in `dtype` vs the reference in fp64, with the reference in `dtype` as PyTorch's own error."""
    inputs = [t.to(dtype) for t in inputs]
    dout = torch.randn_like(inputs[0], dtype=torch.float32)
    ref64 = _run(fn, [t.double() for t in inputs], dout.double(), "torch")
    ref_dtype = _run(fn, inputs, dout, "torch")
    got = _run(fn, inputs, dout, "triton")
    for name, g, r64, rd in zip(("out", "lse", "dq", "dk", "dv"), got, ref64, ref_dtype):
        if name == "lse":
            # rows with no visible key: -inf in both; the rest compared as fp32 values
            empty = r64.isinf()
            assert torch.equal(g.isinf() & (g < 0), empty), "lse: -inf rows differ from the reference"
            g, r64, rd = g[~empty], r64[~empty], rd[~empty]
            assert_close_to_reference(name, g, r64, rd, factor, dtype=torch.float32)
        else:
            assert_close_to_reference(name, g, r64, rd, factor, dtype=dtype)
    return got


# ---- spacetime modes --------------------------------------------------------------------------

GRID = (3, 5, 7)  # S = 105: no dimension a multiple of the 16-token tiles
SPACETIME_CASES = {
    "full": dict(mode="full"),
    "spatial": dict(mode="spatial"),
    "temporal": dict(mode="temporal"),
    "window": dict(window=(2, 3, 5)),
    "rope": dict(rope="3d"),
    "rope_window": dict(window=(3, 3, 3), rope=RoPE3D(theta=100.0)),
    "rope_temporal": dict(mode="temporal", rope=RoPE3D(theta=500.0, split=(8, 28, 28))),
    # rope_in_kernel: q and k rotated inside the attention kernels instead of one pass before them
    "rope_in_kernel": dict(rope="3d", rope_in_kernel=True),
    "rope_window_in_kernel": dict(window=(3, 3, 3), rope=RoPE3D(theta=100.0), rope_in_kernel=True),
    "rope_temporal_in_kernel": dict(mode="temporal", rope=RoPE3D(theta=500.0, split=(8, 28, 28)),
                                    rope_in_kernel=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(SPACETIME_CASES))
def test_spacetime_attention_matches_reference(case, dtype):
    kwargs = SPACETIME_CASES[case]
    D = 64 if case.startswith(("spatial", "rope_window", "rope_temporal")) else 72
    S = GRID[0] * GRID[1] * GRID[2]
    inputs = _qkv(1, S, S, 2, D, torch.float32)

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, GRID, return_lse=True, backend=backend, **kwargs)

    _check_against_reference(fn, inputs, dtype)


def test_spatial_and_temporal_read_strided_views_in_place():
    """q, k, v as views into one fused qkv projection output (no contiguous copy) give the same result."""
    S, heads, D = 105, 2, 64
    qkv = torch.randn(2, S, 3, heads, D, device=DEVICE)
    q, k, v = qkv.unbind(2)  # each (B, S, heads, D) with token stride 3 * heads * D
    assert not q.is_contiguous()
    for mode in ("spatial", "temporal"):
        got = ops.spacetime_attention(q, k, v, GRID, mode=mode, backend="triton")
        want = ops.spacetime_attention(q.double(), k.double(), v.double(), GRID, mode=mode, backend="torch")
        assert_close_to_reference(mode, got, want, want.float(), dtype=torch.float32)


def test_int64_offset_variant(monkeypatch):
    """The kernels switch to int64 element offsets when a group's extent passes 2^31: run that variant."""
    from dit_fast.triton_kernels import attention as kernels

    monkeypatch.setattr(kernels, "FORCE_INT64_OFFSETS", True)
    inputs = _qkv(1, 105, 105, 2, 64, torch.float32)

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, GRID, mode="temporal", rope="3d", rope_in_kernel=True,
                                       return_lse=True, backend=backend)

    _check_against_reference(fn, inputs, torch.float32)


class _CountCalls:
    """Wraps an interpreted @triton.jit helper and counts its calls (the kernels look it up by name)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _count_calls(monkeypatch, names):
    """{name: _CountCalls} for kernel helpers, patched in every kernel module that looks the name up."""
    from dit_fast.triton_kernels import attention_bwd, attention_common, attention_fwd

    modules = (attention_common, attention_fwd, attention_bwd)
    counters = {}
    for name in names:
        counters[name] = _CountCalls(next(getattr(m, name) for m in modules if hasattr(m, name)))
        for module in modules:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counters[name])
    return counters


@pytest.mark.skipif(HAS_GPU, reason="counts tile visits through the CPU interpreter")
def test_window_skips_the_tiles_outside_the_window(monkeypatch):
    """Work scales with the kept tiles: forward, dk/dv and dq visit ~1/3 of the dense tile pairs for a
    window keeping 1/4 of the keys (2 of 4 frames, 3 of 6 rows; 16-token tiles span two rows of 8)."""
    counters = _count_calls(monkeypatch, ("_fwd_tile", "_dkdv_tile", "_dq_tile"))
    grid = (4, 6, 8)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 192, 192, 1, 16, torch.float32))
    visits = {}
    for label, window in (("dense", None), ("window", (2, 3, 8))):
        for counter in counters.values():
            counter.calls = 0
        out = ops.spacetime_attention(q, k, v, grid, window=window, backend="triton")
        torch.autograd.grad(out.sum(), (q, k, v))
        visits[label] = {name: c.calls for name, c in counters.items()}
    assert visits["dense"] == {"_fwd_tile": 144, "_dkdv_tile": 144, "_dq_tile": 144}  # 12 x 12 tiles of 16
    for name in counters:
        assert visits["window"][name] <= 0.4 * visits["dense"][name], visits
    # frames wider than a tile: tiles inside one row also skip the columns outside their windows
    grid = (2, 3, 40)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 240, 240, 1, 16, torch.float32))
    for label, window in (("all columns", (1, 3, 40)), ("9 columns", (1, 3, 9))):
        for counter in counters.values():
            counter.calls = 0
        out = ops.spacetime_attention(q, k, v, grid, window=window, backend="triton")
        torch.autograd.grad(out.sum(), (q, k, v))
        visits[label] = {name: c.calls for name, c in counters.items()}
    for name in counters:
        assert visits["9 columns"][name] <= 0.8 * visits["all columns"][name], visits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_window_interior_tiles_match_reference(dtype):
    """Frames as wide as the window (W = 8 = ww): many key tiles lie inside every query's window and
    skip the window test; with the tiles at the window's edges, still the reference's result."""
    grid = (4, 6, 8)
    inputs = _qkv(1, 192, 192, 2, 64, torch.float32)

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, grid, window=(2, 3, 8), return_lse=True, backend=backend)

    _check_against_reference(fn, inputs, dtype)


@pytest.mark.skipif(HAS_GPU, reason="counts Python calls of the kernels' helpers, which only the CPU interpreter "
                    "makes; on a GPU the window correctness tests cover the compiled kernels")
def test_window_test_skipped_on_interior_tiles(monkeypatch):
    """The per-score window test runs only on tiles at a window's edge: interior tiles cost what dense
    ones do. Grid (4, 6, 8), window (2, 3, 8), 16-token tiles (2 rows of 8)."""
    names = ("_fwd_tile", "_dkdv_tile", "_dq_tile", "_window_allowed")
    counters = _count_calls(monkeypatch, names)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 192, 192, 1, 16, torch.float32))
    out = ops.spacetime_attention(q, k, v, (4, 6, 8), window=(2, 3, 8), backend="triton")
    torch.autograd.grad(out.sum(), (q, k, v))
    visits = sum(counters[name].calls for name in names[:3])
    tests = counters["_window_allowed"].calls
    assert 0 < tests <= 0.75 * visits, (tests, visits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_window_on_wide_frames_matches_reference(dtype):
    """W = 40 > the 16-token tiles: runs restricted to the window's columns inside one row."""
    grid = (2, 3, 40)
    inputs = _qkv(1, 240, 240, 2, 64, torch.float32)

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, grid, window=(1, 3, 9), rope="3d", rope_in_kernel=True,
                                       return_lse=True, backend=backend)

    _check_against_reference(fn, inputs, dtype)


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

# grid, window_tile, window and the rest. Tiles are partial at the grid's edges in each case; the
# interpreter's 16-token blocks make a tile of V tokens V // 16 blocks.
TILED_CASES = {
    # (3, 5, 7) in (1, 4, 4) tiles: a 3 x 2 x 2 tile grid; the window (1, 4, 8) is 1 x 1 x 2 tiles
    "partial": dict(grid=(3, 5, 7), window_tile=(1, 4, 4), window=(1, 4, 8), D=72),
    # (5, 6, 9) in (2, 4, 2) tiles: 3 x 2 x 5 tiles, window 2 x 1 x 2 tiles, shifted at every border
    "rope": dict(grid=(5, 6, 9), window_tile=(2, 4, 2), window=(4, 4, 4), D=64, rope="3d"),
    # 48-token tiles, three blocks each: (5, 6, 9) in (3, 4, 4) is 2 x 2 x 3 tiles, window 1 x 1 x 2
    "three_blocks": dict(grid=(5, 6, 9), window_tile=(3, 4, 4), window=(3, 4, 8), D=72),
    # 32-token tiles: 3 x 2 x 3 tiles of (2, 4, 4), window 1 x 1 x 2 tiles
    "rope_in_kernel": dict(grid=(5, 6, 9), window_tile=(2, 4, 4), window=(2, 4, 8), D=72,
                           rope=RoPE3D(theta=100.0), rope_in_kernel=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(TILED_CASES))
def test_tile_window_matches_reference(case, dtype):
    kwargs = dict(TILED_CASES[case])
    grid, D = kwargs.pop("grid"), kwargs.pop("D")
    S = grid[0] * grid[1] * grid[2]
    inputs = _qkv(1, S, S, 2, D, torch.float32)

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, grid, return_lse=True, backend=backend, **kwargs)

    _check_against_reference(fn, inputs, dtype)


@pytest.mark.skipif(HAS_GPU, reason="counts Python calls of the kernels' helpers, which only the CPU interpreter "
                    "makes; on a GPU the tile window correctness tests cover the compiled kernels")
@pytest.mark.parametrize("grid,window_tile,window", [((4, 8, 12), (1, 4, 4), (2, 4, 8)),
                                                     ((3, 5, 7), (1, 4, 4), (1, 4, 8)),
                                                     ((3, 5, 7), (2, 4, 4), (2, 4, 8))])
def test_tile_window_visits_only_the_kept_tiles(monkeypatch, grid, window_tile, window):
    """Forward, dk/dv and dq each visit exactly (query tiles) x (kept key tiles per query tile) tile pairs,
    V // 16 x V // 16 blocks of 16 tokens per pair, and never test the token window."""
    names = ("_fwd_tile", "_dkdv_tile", "_dq_tile", "_window_allowed")
    counters = _count_calls(monkeypatch, names)
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, S, S, 1, 16, torch.float32))
    out = ops.spacetime_attention(q, k, v, grid, window=window, window_tile=window_tile, backend="triton")
    torch.autograd.grad(out.sum(), (q, k, v))
    tiles = [-(-n // t) for n, t in zip(grid, window_tile)]
    kept = [w // t for w, t in zip(window, window_tile)]
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
        kept = _prune(configs, named, TILED=True, BLOCK_D=128)
        assert kept and all(c.kwargs["BLOCK_M"] in allowed and c.kwargs["BLOCK_N"] in allowed for c in kept), tile
    named = dict(LQ_BUCKET=16384, LK_BUCKET=16384, Q_ptr=q, TILE_T=1, TILE_H=1, TILE_W=1)
    assert any(c.kwargs["BLOCK_M"] == 128 for c in _prune(configs, named, TILED=False, BLOCK_D=128))


def test_tile_window_bad_input_raises_clear_errors():
    q, k, v = _qkv(1, 105, 105, 2, 64, torch.float32)
    st = ops.spacetime_attention
    _bad(ValueError, r"window_tile \(1, 4, 4\) needs a window", lambda: st(q, k, v, GRID, window_tile=(1, 4, 4)))
    for bad in ((1, 4), (1, 0, 4), (1, 4.0, 4), "144"):
        _bad(ValueError, "window_tile must be three positive ints",
             lambda: st(q, k, v, GRID, window=(1, 4, 8), window_tile=bad))
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


# ---- cross attention with a key padding mask ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("D", [72, 64])
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")
def test_cross_attention_with_padding_matches_reference(D, dtype):
    B, Sq, Sk, heads = 2, 29, 37, 2
    inputs = _qkv(B, Sq, Sk, heads, D, torch.float32)
    mask = torch.rand(B, Sk, device=DEVICE) > 0.4
    mask[0, :3] = True
    mask[1] = False  # sample 1 has no text at all: its queries return zeros, never NaN

    def fn(q, k, v, backend):
        return ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend=backend)

    out, lse, dq, dk, dv = _check_against_reference(fn, inputs, dtype)
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("D", [96, 128])
def test_cross_attention_without_mask_and_custom_scale(D):
    inputs = _qkv(1, 20, 45, 2, D, torch.float32)

    def fn(q, k, v, backend):
        return ops.attention(q, k, v, scale=0.3, return_lse=True, backend=backend)

    _check_against_reference(fn, inputs, torch.float32)


# ---- modules ------------------------------------------------------------------------------------


def test_spacetime_attention_module_matches_reference_backend():
    torch.manual_seed(1)
    module = dnn.SpacetimeAttention(128, 2, qk_norm=True, mode="spatial", rope="3d", backend="triton").to(DEVICE)
    x = torch.randn(1, 105, 128, device=DEVICE, requires_grad=True)
    y = module(x, GRID)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    module.backend = "torch"
    x64, m64 = x.detach().double().requires_grad_(True), module.double()
    y64 = m64(x64, GRID)
    (gx64,) = torch.autograd.grad(y64.square().sum(), x64)
    assert_close_to_reference("module out", y, y64, y64.float(), dtype=torch.float32)
    assert_close_to_reference("module dx", gx, gx64, gx64.float(), dtype=torch.float32)


def test_modules_keep_dit_parameter_names():
    sa = dnn.SpacetimeAttention(64, 4, qk_norm=True)
    assert set(sa.state_dict()) == {"qkv.weight", "qkv.bias", "q_norm.weight", "q_norm.bias", "k_norm.weight",
                                    "k_norm.bias", "proj.weight", "proj.bias"}
    ca = dnn.CrossAttention(64, 32, 4)
    assert set(ca.state_dict()) == {"q_linear.weight", "q_linear.bias", "kv_linear.weight", "kv_linear.bias",
                                    "proj.weight", "proj.bias"}


def test_spacetime_attention_module_passes_the_tile_window():
    grid, dim, heads = (3, 5, 7), 32, 2
    module = dnn.SpacetimeAttention(dim, heads, window=(1, 4, 8), window_tile=(1, 4, 4), backend="torch")
    x = torch.randn(2, 105, dim)
    q, k, v = module.qkv(x).reshape(2, 105, 3, heads, dim // heads).unbind(2)
    expected = module.proj(spacetime_attention_reference(q, k, v, grid, window=(1, 4, 8),
                                                             window_tile=(1, 4, 4)).reshape(2, 105, dim))
    torch.testing.assert_close(module(x, grid), expected)
    token_window = spacetime_attention_reference(q, k, v, grid, window=(1, 4, 7)).reshape(2, 105, dim)
    assert not torch.allclose(module(x, grid), module.proj(token_window), atol=1e-4)  # the tile rule is in use


def test_spacetime_attention_module_loads_a_timm_style_attention_state_dict():
    """DiT / timm's Attention: qkv -> (B, N, 3, heads, D) -> SDPA -> proj. Same weights, same output."""
    dim, heads = 64, 4
    timm_like = torch.nn.ModuleDict({"qkv": torch.nn.Linear(dim, 3 * dim), "proj": torch.nn.Linear(dim, dim)})
    x = torch.randn(2, 12, dim)
    B, N, C = x.shape
    qkv = timm_like["qkv"](x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, D)
    want = timm_like["proj"](torch.nn.functional.scaled_dot_product_attention(*qkv).transpose(1, 2).reshape(B, N, C))
    module = dnn.SpacetimeAttention(dim, heads, backend="triton").to(DEVICE)
    module.load_state_dict(timm_like.state_dict())
    got = module(x.to(DEVICE), (2, 2, 3)).cpu()
    assert_close_to_reference("timm attention", got, want.double(), want, dtype=torch.float32)


def test_cross_attention_module_with_context_mask():
    module = dnn.CrossAttention(128, 48, 2, backend="triton").to(DEVICE)
    x, ctx = torch.randn(2, 21, 128, device=DEVICE), torch.randn(2, 13, 48, device=DEVICE)
    mask = torch.ones(2, 13, dtype=torch.bool, device=DEVICE)
    mask[1, 5:] = False
    got = module(x, ctx, mask)
    module.backend = "torch"
    want = module(x, ctx, mask)
    # the padded context rows must not matter: truncating them gives the same output for sample 1
    trunc = module(x[1:], ctx[1:, :5])
    assert_close_to_reference("cross module", got, want.double(), want, dtype=torch.float32)
    assert_close_to_reference("cross module truncated", got[1:], trunc.double(), trunc, dtype=torch.float32)


# ---- registration, compile ----------------------------------------------------------------------


def test_opcheck_forward_and_backward():
    grid = [2, 2, 3]
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 12, 12, 1, 16, torch.float32))
    fwd_args = (q, k, v, None, grid, "full", [2, 1, 3], [], 10000.0, [4, 6, 6], 0.25, "triton")
    torch.library.opcheck(torch.ops.dit_fast.attention_fwd.default, fwd_args)
    out, lse = torch.ops.dit_fast.attention_fwd(*fwd_args)
    mask = torch.tensor([[True] * 10 + [False] * 2], device=DEVICE)
    cross_args = (q.detach(), k.detach(), v.detach(), mask, [], "full", [], [], 0.0, [], 0.25, "triton")
    torch.library.opcheck(torch.ops.dit_fast.attention_fwd.default, cross_args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, None, grid,
                "spatial", [], [], 10000.0, [4, 6, 6], 0.25, "triton")
    torch.library.opcheck(torch.ops.dit_fast.attention_bwd.default, bwd_args)


def test_torch_compile_fullgraph_module():
    module = dnn.SpacetimeAttention(32, 2, mode="temporal", rope="3d", backend="triton").to(DEVICE)
    x = torch.randn(1, 12, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    y = compiled(x, (3, 2, 2))
    (gx,) = torch.autograd.grad(y.sum(), x)
    y_eager = module(x, (3, 2, 2))
    (gx_eager,) = torch.autograd.grad(y_eager.sum(), x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, gx_eager)


# ---- bad input ----------------------------------------------------------------------------------


def _bad(error, match, fn):
    with pytest.raises(error, match=match):
        fn()


def test_bad_input_raises_clear_errors():
    q, k, v = _qkv(1, 105, 105, 2, 64, torch.float32)
    st = ops.spacetime_attention
    _bad(ValueError, r"grid \(3, 5, 6\) has 90 tokens .* S = 105", lambda: st(q, k, v, (3, 5, 6)))
    _bad(ValueError, "grid must be three positive ints", lambda: st(q, k, v, (105,)))
    _bad(ValueError, r"window \(4, 1, 1\) is larger than the grid \(3, 5, 7\)",
         lambda: st(q, k, v, GRID, window=(4, 1, 1)))
    _bad(ValueError, "window needs mode='full'", lambda: st(q, k, v, GRID, mode="spatial", window=(1, 3, 3)))
    _bad(ValueError, "mode must be one of", lambda: st(q, k, v, GRID, mode="diagonal"))
    _bad(ValueError, "rope must be None", lambda: st(q, k, v, GRID, rope="2d"))
    _bad(TypeError, "rope_in_kernel must be True or False", lambda: st(q, k, v, GRID, rope="3d", rope_in_kernel="yes"))
    _bad(ValueError, "rope split", lambda: st(q, k, v, GRID, rope=RoPE3D(split=(10, 30, 30))))
    _bad(ValueError, "self-attention", lambda: st(q, k[:, :50], v[:, :50], GRID))
    _bad(ValueError, "mismatched batch, heads or head dim",
         lambda: ops.attention(q, k[:, :, :1], v[:, :, :1]))
    _bad(ValueError, "v must have the shape of k", lambda: ops.attention(q, k, v[:, :100]))
    _bad(TypeError, "k has dtype torch.float16 but q has torch.float32", lambda: ops.attention(q, k.half(), v))
    _bad(TypeError, "must be float32, float16 or bfloat16",
         lambda: ops.attention(q.double(), k.double(), v.double(), backend="triton"))
    _bad(TypeError, "must be float32, float16 or bfloat16", lambda: ops.attention(q.int(), k, v))
    _bad(ValueError, r"must be \(B, S, heads, D\)", lambda: ops.attention(q[0], k, v))
    _bad(ValueError, "scale must be a positive", lambda: ops.attention(q, k, v, scale=-1.0))
    for D in (12, 264):
        qd, kd, vd = _qkv(1, 8, 8, 1, D, torch.float32)
        _bad(ValueError, f"head dim D = {D} .* is not supported", lambda: ops.attention(qd, kd, vd))
    mask = torch.ones(1, 105, dtype=torch.bool, device=DEVICE)
    _bad(ValueError, r"key_padding_mask must be \(B, Sk\) = \(1, 105\)",
         lambda: ops.attention(q, k, v, key_padding_mask=mask[:, :50]))
    _bad(TypeError, "key_padding_mask must be a bool tensor",
         lambda: ops.attention(q, k, v, key_padding_mask=mask.float()))
    _bad(ValueError, "unknown backend", lambda: ops.attention(q, k, v, backend="cudnn"))


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v = _qkv(1, 12, 12, 1, 16, torch.float32, device="cpu")
    got = ops.spacetime_attention(q, k, v, (1, 3, 4), mode="spatial")
    want = spacetime_attention_reference(q, k, v, (1, 3, 4), mode="spatial")
    assert torch.equal(got, want)


# ---- GPU: large shapes, every head dim, bf16, 64-bit offsets ------------------------------------

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


GPU_CASES = [("full", 64), ("full", 72), ("full", 96), ("full", 128), ("spatial", 72), ("temporal", 72),
             ("window", 128), ("rope", 72), ("rope", 128), ("rope_window", 64), ("rope_in_kernel", 128),
             ("rope_window_in_kernel", 64), ("tile_window", 128), ("tile_window", 72), ("rope_tile_window", 64)]


@gpu
@pytest.mark.parametrize("case,D", GPU_CASES)
def test_gpu_large_shapes(case, D):
    grid = (5, 30, 45)  # S = 6750
    kwargs = {"full": {}, "spatial": dict(mode="spatial"), "temporal": dict(mode="temporal"),
              "window": dict(window=(3, 9, 15)), "rope": dict(rope="3d"),
              "rope_window": dict(rope="3d", window=(3, 15, 15)),
              "rope_in_kernel": dict(rope="3d", rope_in_kernel=True),
              "rope_window_in_kernel": dict(rope="3d", window=(3, 15, 15), rope_in_kernel=True),
              # partial edge tiles on h and w (30 = 3 x 8 + 6, 45 = 5 x 8 + 5)
              "tile_window": dict(window=(2, 16, 24), window_tile=(1, 8, 8)),
              "rope_tile_window": dict(rope="3d", window=(2, 8, 16), window_tile=(2, 4, 8), rope_in_kernel=True)}[case]
    S = grid[0] * grid[1] * grid[2]
    inputs = _qkv(2, S, S, 4, D, torch.float32)

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, grid, return_lse=True, backend=backend, **kwargs)

    _check_against_reference(fn, inputs, torch.bfloat16)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cross_attention_text_lengths(dtype):
    inputs = _qkv(3, 4096, 512, 8, 128, torch.float32)
    mask = torch.arange(512, device=DEVICE)[None, :] < torch.tensor([512, 77, 0], device=DEVICE)[:, None]

    def fn(q, k, v, backend):
        return ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend=backend)

    _check_against_reference(fn, inputs, dtype)


@gpu
def test_gpu_offsets_past_2_31_elements():
    """Token offsets * strides pass 2^31 elements: the last frames must still be indexed correctly."""
    T, H, W, heads, D = 16400, 8, 16, 16, 64  # B * S * heads * D = 2.15e9 > 2^31
    S = T * H * W
    q, k, v = (torch.randn(1, S, heads, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ops.spacetime_attention(q, k, v, (T, H, W), mode="spatial", backend="triton")
    tail = slice((T - 3) * H * W, S)  # spatial attention: the last three frames are independent
    want = ops.spacetime_attention(q[:, tail].double(), k[:, tail].double(), v[:, tail].double(), (3, H, W),
                                   mode="spatial", backend="torch")
    got = out[:, tail]
    err = (got.double() - want).abs().max().item()
    assert err <= ATOL_FLOOR[torch.bfloat16] * max(1.0, want.abs().max().item()), f"max err {err}"


def test_kernels_compile_for_sm90_with_16_byte_loads():
    """Compiled for an H100 (no GPU needed): at D = 72 the tiles load 16 bytes at a time, as at D = 128.

    A head stride of 72 hides the alignment from Triton; without the ALIGNED hint every q, k, v
    element was a separate 2-byte load (measured on an H100: 0.32x SDPA at D = 72)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter never lowers
    out = Path(tempfile.mkdtemp()) / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--kernels", "fwd", "dq",
                           "--head-dims", "72", "--variants", "dense", "--configs", "64,64,4,3", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["kernel"] for r in rows] == ["fwd", "dq"]
    for row in rows:
        assert "error" not in row, row
        assert row["ldg128"] > 0 and row["ldg_narrow"] == 0, row
        assert row["hgmma"] > 0, row  # Hopper's wgmma, not the older mma.sync path


@pytest.mark.parametrize("kernel, config", [("dkdv", (32, 128, 8, 2)), ("fwd", (128, 128, 8, 2))])
def test_quick_tuning_space_configs_compile_without_spills(kernel, config):
    """The quick space (the benchmarks' tuning) holds configurations chosen for one kernel each, on
    their sm_90a report: the dk/dv kernel's two fp32 (BLOCK_N, D) accumulators spill at 128 x 64 and
    64 x 64 (D = 128), so 32 x 128 is there; the forward's 128 x 128 tile halves its rescale work per
    score. Each must compile for sm_90a without spills, or the measured kernel is the spilled one."""
    import json
    import subprocess
    import sys

    from dit_fast.triton_kernels.attention import QUICK_SPACE

    pytest.importorskip("triton.compiler")
    assert config in QUICK_SPACE
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = Path(tempfile.mkdtemp()) / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--kernels", kernel,
                           "--head-dims", "128", "--variants", "dense", "--configs", ",".join(map(str, config)),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert "error" not in row, row
    assert row["ldl_stl"] == 0 and row["local_bytes"] == 0, row


def test_aligned_hint_only_when_every_pointer_and_stride_is_16_byte_aligned():
    """The kernels promise Triton 16-byte alignment (ALIGNED) only when the launcher checked it: a wrong
    promise would make the GPU read misaligned vectors (the interpreter cannot show that)."""
    from dit_fast.triton_kernels._layout import aligned_16 as _aligned_16

    def qkv(D, dtype=torch.bfloat16, offset=0, heads=3):
        flat = torch.randn(2 * 5 * heads * D + offset, dtype=dtype)
        return flat[offset:].view(2, 5, heads, D)

    assert _aligned_16([qkv(72), qkv(72)], 72)  # 144-byte rows, odd head count
    assert _aligned_16([qkv(72, torch.float32)], 72)
    assert not _aligned_16([qkv(72), qkv(72, offset=1)], 72)  # one pointer 2 bytes off
    assert not _aligned_16([qkv(36)], 36)  # 72-byte head stride
    packed = torch.randn(2, 5, 3, 3, 72, dtype=torch.bfloat16)[:, :, 1]  # a slice of a packed qkv
    assert _aligned_16([packed], 72)
