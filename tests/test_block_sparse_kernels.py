"""The block-sparse attention kernels (triton_kernels/attention_sparse.py) against the reference, through
Triton's interpreter on CPU: forward, lse and every gradient, each dtype, odd grids with partial tiles,
text tokens, padding masks, per-batch / per-head / shared blocks, empty query tiles, both token orders;
the launches; the block pairs the kernels visit, counted against the index lists; masked keys."""

import math

import pytest
import torch

from dit_fast.ops import block_sparse_attention
from dit_fast.ops.block_sparse import backward_lists
from dit_fast.ops.sparse_layout import SparseBlocks, TileLayout
from dit_fast.triton_kernels import attention_sparse
from tests.conftest import kernel_devices
from tests.launches import count_launches
from tests.utils import assert_close_to_reference

DEVICE = kernel_devices()

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

# (layout, batch, heads, head dim, blocks' (B, heads), padding mask, density, dtype, order)
CASES = {
    # partial tiles on every axis (blocks of 16 divide the 32-token tiles: only the partial ones are masked),
    # 5 text tokens in a partial tile, blocks per batch, no padding mask (nothing else masks the tile ends),
    # D = 10 (rows of 40 bytes: not 16-byte aligned)
    "fp32-text-per-batch": (TileLayout((3, 5, 7), (2, 4, 4), extra=5), 2, 1, 10, (2, 1), None, 0.5,
                            torch.float32, "raster"),
    # tiles of 15 tokens (no block divides them: every block masked at the tile's end), per head, a
    # per-head mask, tile order, D = 40 in two chunks (32 + 16)
    "bf16-per-head-tiles": (TileLayout((2, 5, 7), (1, 3, 5), extra=0), 1, 2, 40, (1, 2), "head", 0.3,
                            torch.bfloat16, "tiles"),
    # whole tiles of two blocks each (EVEN: no bounds masks), one text tile, shared blocks, every tile kept
    # (dense attention as blocks), a (B, S) padding mask, D = 8
    "fp16-whole-tiles-dense": (TileLayout((2, 4, 12), (2, 4, 4), extra=32), 1, 2, 8, (1, 1), "batch", 1.0,
                               torch.float16, "raster"),
}


def _blocks(layout, shape, density, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, layout.n_tiles, layout.n_tiles, generator=generator) < density
    if density < 1:
        mask[0, 0, 1] = False  # a query tile that keeps nothing: zeros, lse -inf
        mask[0, 0, :, 2] = False  # a key tile nobody keeps: zero dK, dV
    return SparseBlocks.from_tile_mask(layout, mask.to(DEVICE)), mask


def _padding(kind, batch, heads, tokens):
    if kind is None:
        return None
    shape = (batch, tokens) if kind == "batch" else (batch, heads, tokens)
    mask = torch.rand(shape) < 0.75
    mask[..., 0] = False
    return mask.to(DEVICE)


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_the_reference(case):
    layout, batch, heads, head_dim, shape, padding_kind, density, dtype, order = CASES[case]
    blocks, _ = _blocks(layout, shape, density)
    q, k, v, dout = (torch.randn(batch, layout.tokens, heads, head_dim, device=DEVICE) for _ in range(4))
    padding = _padding(padding_kind, batch, heads, layout.tokens)

    def run(dtype, backend):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = block_sparse_attention(*inputs, blocks, order=order, key_padding_mask=padding, return_lse=True,
                                          backend=backend)
        grads = torch.autograd.grad(out, inputs, dout.to(dtype))
        return out, lse, grads

    with count_launches() as launches:
        out, lse, grads = run(dtype, "triton")
    assert launches == {"_sparse_fwd_kernel": 1, "_attn_bwd_preprocess_kernel": 1, "_sparse_bwd_dkdv_kernel": 1,
                        "_sparse_bwd_dq_kernel": 1}, launches
    want, want_lse, want_grads = run(torch.float64, "torch")
    same, _, same_grads = run(dtype, "torch")  # PyTorch's own error in the dtype
    assert_close_to_reference("out", out, want, same)
    finite = want_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite) and (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite], want_lse[finite].float(), atol=2e-2 if dtype != torch.float32 else 1e-5,
                               rtol=0)
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want_grads, same_grads, strict=True):
        assert_close_to_reference(name, g, w, s)
    if density < 1:  # the empty query tile (tile 1) returns zeros; the unkept key tile (2) gets no gradient
        tile_of = layout.token_tile(DEVICE)
        if order == "tiles":
            tile_of = tile_of[layout.perm(DEVICE)]
        assert (out[0, tile_of == 1, 0] == 0).all() and (lse[0, 0, tile_of == 1] == float("-inf")).all()
        assert (grads[1][0, tile_of == 2, 0] == 0).all() and (grads[2][0, tile_of == 2, 0] == 0).all()


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU sizes and tile configurations (the interpreter runs 16 x 16)")
@pytest.mark.parametrize("tile", [(4, 4, 4), (4, 8, 8)], ids=["tile64", "tile256"])
@pytest.mark.parametrize("padding_kind", [None, "head"])
def test_gpu_real_tiles(tile, padding_kind):
    """On a GPU, the tile configurations the spaces pick (64- and 128-row blocks): a Wan-like grid with
    partial edge tiles and 77 text tokens, 4 heads of 128, bf16, per-head blocks at ~30%, fwd and every
    gradient against the fp64 reference (autograd through it), with and without a per-head mask."""
    layout = TileLayout((7, 15, 26), tile, extra=77)
    blocks, _ = _blocks(layout, (1, 4), 0.3)
    q, k, v, dout = (torch.randn(1, layout.tokens, 4, 128, device=DEVICE) for _ in range(4))
    padding = _padding(padding_kind, 1, 4, layout.tokens)

    def run(dtype, backend):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = block_sparse_attention(*inputs, blocks, key_padding_mask=padding, backend=backend)
        return out, torch.autograd.grad(out, inputs, dout.to(dtype))

    with count_launches() as launches:
        out, grads = run(torch.bfloat16, "triton")
    assert launches["_sparse_fwd_kernel"] >= 1 and launches["_sparse_bwd_dq_kernel"] >= 1, launches
    want, want_grads = run(torch.float64, "torch")
    same, same_grads = run(torch.bfloat16, "torch")
    assert_close_to_reference("out", out, want, same)
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want_grads, same_grads, strict=True):
        assert_close_to_reference(name, g, w, s)


@pytest.mark.parametrize("layout", [TileLayout((3, 5, 7), (2, 4, 4), extra=5), TileLayout((2, 5, 7), (1, 3, 5))],
                         ids=["partial-tiles-text", "tile-of-15"])
def test_visited_block_pairs_are_the_index_lists(layout):
    """RECORD: each kernel counts the (query tile, key tile) block pairs it visits. Every kept pair is
    visited once per (query block, key block) of the two tiles, and no other pair at all, in the forward,
    the dK / dV kernel (walking the transposed lists) and the dQ kernel."""
    blocks, mask = _blocks(layout, (1, 2), 0.4)  # per head
    sizes = layout.tile_sizes()
    q, k, v, dout = (torch.randn(1, layout.tokens, 2, 16, device=DEVICE) for _ in range(4))
    visits = [torch.zeros(1, 2, layout.n_tiles, layout.n_tiles, dtype=torch.int32, device=DEVICE) for _ in range(3)]
    out, lse = attention_sparse.block_sparse_forward(q, k, v, blocks.kv_count, blocks.kv_index, None, layout, 0.25,
                                                     visits=visits[0])
    q_count, q_index = backward_lists(blocks)
    attention_sparse.block_sparse_backward(dout, q, k, v, out, lse, blocks.kv_count, blocks.kv_index, q_count,
                                           q_index, None, layout, 0.25, visits=visits[1:])
    kernels = (attention_sparse._sparse_fwd, attention_sparse._sparse_bwd_dkdv, attention_sparse._sparse_bwd_dq)
    for name, got, kernel in zip(("forward", "dk/dv", "dq"), visits, kernels, strict=True):
        block_m, block_n = kernel.best_config.kwargs["BLOCK_M"], kernel.best_config.kwargs["BLOCK_N"]
        per_pair = (-(-sizes // block_m))[:, None] * (-(-sizes // block_n))[None, :]  # query x key blocks
        want = (mask.int() * per_pair.int()).to(DEVICE)
        assert torch.equal(got, want), (f"{name}: {int((got != want).sum())} (head, query tile, key tile) entries "
                                        f"differ; visited {int(got.sum())} block pairs, expected {int(want.sum())}")


def test_masked_keys_never_reach_the_kernels_outputs():
    """NaN and inf in keys and values hidden from queries. Hidden from every query (a key tile nobody keeps,
    padded keys): every output and gradient equals the clean run's, the hidden keys' dK, dV are exactly 0.
    Hidden from one query tile only (the tiles it does not keep): its outputs and dQ rows equal the clean
    run's (other tiles may see those keys, and return NaN themselves)."""
    layout = TileLayout((2, 5, 7), (1, 3, 5), extra=5)
    blocks, mask = _blocks(layout, (1, 1), 0.5, seed=3)
    q, k, v, dout = (torch.randn(1, layout.tokens, 1, 16, device=DEVICE) for _ in range(4))
    padding = torch.ones(1, layout.tokens, dtype=torch.bool, device=DEVICE)
    padding[0, :9] = False
    tile_of = layout.token_tile(DEVICE)

    def run(k, v, rows=slice(None)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = block_sparse_attention(*inputs, blocks, key_padding_mask=padding, backend="triton")
        return (out[:, rows], *torch.autograd.grad(out[:, rows], inputs, dout[:, rows]))

    def poisoned(hidden):
        assert hidden.any() and (~hidden).any()
        k_bad, v_bad = k.clone(), v.clone()
        k_bad[0, hidden], v_bad[0, hidden] = float("nan"), float("inf")
        return k_bad, v_bad

    hidden = (tile_of == 2) | ~padding[0]  # key tile 2 is kept by no query tile (_blocks)
    clean, bad = run(k, v), run(*poisoned(hidden))
    for name, c, b in zip(("out", "dq", "dk", "dv"), clean, bad, strict=True):
        torch.testing.assert_close(b, c, msg=name)
    assert (bad[2][0, hidden] == 0).all() and (bad[3][0, hidden] == 0).all()

    rows = tile_of == 0
    clean, bad = run(k, v, rows), run(*poisoned(~mask[0, 0, 0].to(DEVICE)[tile_of] | ~padding[0]), rows)
    torch.testing.assert_close(bad[0], clean[0])
    torch.testing.assert_close(bad[1][:, rows], clean[1][:, rows])


def test_a_query_that_sees_garbage_returns_nan_and_passes_no_gradient():
    """One visible key poisoned (inf in its v): the queries whose kept tiles hold it return a NaN row
    and a NaN lse (the dense kernels' _finish_rows); every other query's out, lse and dq are the clean
    run's, and so are dK, dV of every key none of the poisoned queries sees (_backward_rows)."""
    layout = TileLayout((2, 5, 7), (1, 3, 5), extra=5)
    blocks, mask = _blocks(layout, (1, 1), 0.5, seed=3)
    q, k, v, dout = (torch.randn(1, layout.tokens, 1, 16, device=DEVICE) for _ in range(4))
    visible = blocks.token_mask()[0, 0]  # (S, S) raster order
    key = int(visible.sum(0).argmax())  # a key some query tiles keep and others do not
    sees = visible[:, key]
    unseen = ~visible[sees].any(0)
    assert sees.any() and (~sees).any() and unseen.any()

    def run(k, v):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = block_sparse_attention(*inputs, blocks, return_lse=True, backend="triton")
        return (out, lse, *torch.autograd.grad(out, inputs, dout))

    v_bad = v.clone()
    v_bad[0, key, 0, 3] = float("inf")  # k finite: the scores stay finite, only the accumulator meets the inf
    clean, bad = run(k, v), run(k, v_bad)
    assert bad[0][0, sees].isnan().all() and bad[1][0, 0, sees].isnan().all()
    for name, c, b in zip(("out", "lse", "dq", "dk", "dv"), clean, bad, strict=True):
        keep = unseen if name in ("dk", "dv") else ~sees
        c, b = (c[0, 0, keep], b[0, 0, keep]) if name == "lse" else (c[0, keep], b[0, keep])
        assert torch.equal(c, b), f"{name} differs where no query sees the poison"


def test_index_lists_of_any_strides():
    """Per-head counts and index lists stored head-last (non-contiguous views, as a pattern may build them):
    the forward reads them as given and equals the reference."""
    layout = TileLayout((2, 5, 7), (1, 3, 5), extra=5)
    blocks, _ = _blocks(layout, (1, 2), 0.5)
    count = blocks.kv_count.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    index = blocks.kv_index.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not count.is_contiguous() and not index.is_contiguous()
    strided = SparseBlocks(layout, count, index)
    q, k, v = (torch.randn(1, layout.tokens, 2, 16, device=DEVICE) for _ in range(3))
    torch.testing.assert_close(block_sparse_attention(q, k, v, strided, backend="triton"),
                               block_sparse_attention(q, k, v, blocks, backend="torch"))


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schemas, fake kernels and the registered autograd of the two custom ops."""
    layout = TileLayout((3, 3, 5), (1, 3, 5))
    blocks, _ = _blocks(layout, (1, 1), 0.5)
    q, k, v = (torch.randn(1, layout.tokens, 1, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    q_count, q_index = backward_lists(blocks)
    args = (q, k, v, blocks.kv_count, blocks.kv_index, q_count, q_index, None, [3, 3, 5, 1, 3, 5, 0],
            1 / math.sqrt(16), "triton")
    torch.library.opcheck(torch.ops.dit_fast.block_sparse_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = torch.ops.dit_fast.block_sparse_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:])
    torch.library.opcheck(torch.ops.dit_fast.block_sparse_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# The kernels compiled for an H100 / H200 (sm_90a) without a GPU (benchmarks/kernel_resources.py; see
# tests/test_attention_compile.py): registers, spills, load widths and wgmma shapes against the dense
# kernels at the same tiles.
# ---------------------------------------------------------------------------------------------

# KERNEL:D:VARIANT:BLOCK_M,BLOCK_N,num_warps,num_stages; each sparse row beside the dense kernel's row at its tile
COMPILE_PAIRS = [
    ("sparse_fwd:128:dense:128,128,8,2", "fwd:128:dense:128,128,8,2"),
    ("sparse_dkdv:128:dense:32,128,8,2", "dkdv:128:dense:32,128,8,2"),
    ("sparse_dq:128:dense:128,64,8,3", "dq:128:dense:128,64,8,3"),
    ("sparse_fwd:128:padding:128,64,8,3", "fwd:128:padding:128,64,8,3"),
    ("sparse_dq:128:padding:128,32,8,2", None),
    # the tiles for 64-token tiles (4 x 4 x 4, Video Sparse Attention's)
    ("sparse_fwd:128:dense:64,64,4,3", None),
    ("sparse_dkdv:128:dense:32,64,4,3", None),
    ("sparse_dq:128:dense:64,64,4,3", None),
]
COMPILE_ROWS_36 = ["sparse_fwd:128:dense:128,128,8,2", "sparse_dkdv:128:dense:32,128,8,2",
                   "sparse_dq:128:padding:128,32,8,2"]


def _compiled(rows, python=None):
    from tests.test_attention_compile import _key, _rows
    from tests.utils import compile_in_subprocess

    compiled = _rows(compile_in_subprocess(["--rows", *rows], python=python))
    for row in compiled.values():
        assert "error" not in row, row
    return {spec: compiled[_key(spec)] for spec in rows}


def _assert_clean(spec, row):
    assert row["ldl_stl"] == 0 and row["local_bytes"] == 0, f"{spec} spills: {row}"
    assert row["hgmma"] > 0 and row["hmma"] == 0, f"{spec}: not on wgmma: {row}"
    assert row["ldg128"] > 0, f"{spec}: no 16-byte loads: {row}"
    if ":dense:" in spec:  # the padding mask is read a byte per key; q, k, v, dO never narrower than 16 bytes
        assert row["ldg_narrow"] == 0, f"{spec}: narrow loads: {row}"


def test_sparse_kernels_compile_for_sm90_like_the_dense_ones():
    """sm_90a, bf16, D = 128, the tiles the sparse spaces start from, for long tiles and for 64-token ones
    (tiles of 4 x 8 x 8 tokens, partial ones at the edges: every block bounds-masked): no spills, 16-byte
    loads, wgmma only, and the same wgmma shapes as the dense kernel at that tile (one tile body in the
    flat loop: the dense kernel has a second for its last partial block, so its counts may be double)."""
    pytest.importorskip("triton.compiler")
    rows = _compiled([spec for pair in COMPILE_PAIRS for spec in pair if spec])
    for sparse, dense in COMPILE_PAIRS:
        _assert_clean(sparse, rows[sparse])
        if dense:
            assert set(rows[sparse]["hgmma_shapes"]) == set(rows[dense]["hgmma_shapes"]), (rows[sparse], rows[dense])


def test_sparse_kernels_compile_under_triton_36():
    """The GPU machines' Triton (3.6), the same three kernels: no spills, wgmma, 16-byte loads."""
    from tests.test_attention_compile import _triton36_python

    python = _triton36_python()
    if python is None:
        pytest.skip("needs a Python with Triton 3.6 (the GPU machines' version): set DIT_FAST_TRITON36_PYTHON")
    for spec, row in _compiled(COMPILE_ROWS_36, python).items():
        assert row["triton"].startswith("3.6"), row["triton"]
        _assert_clean(spec, row)


def test_tile_spaces_drop_what_spills_and_prefer_whole_blocks():
    """_prune, on the facts it is given (no compile): configurations the sm_90a reports show spilling at
    D = 128 are dropped there (with a padding mask where that is when), blocks longer than a tile never
    run, and blocks that divide the tile's volume are preferred."""
    def kept(space, volume, head_dim, mask, dtype=torch.bfloat16):
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                   for bm, bn, w, st, _ in space]
        d0, d1 = head_chunks(head_dim)
        args = dict(TILE_V=volume, BLOCK_D0=d0, BLOCK_D1=d1, HAS_MASK=mask, Q_ptr=torch.empty(0, dtype=dtype))
        pruned = attention_sparse._pruner(space)["early_config_prune"](configs, args)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in pruned}

    import triton

    from dit_fast.triton_kernels.attention import head_chunks

    fwd, dkdv, dq = attention_sparse.FWD_SPACE, attention_sparse.DKDV_SPACE, attention_sparse.DQ_SPACE
    assert (128, 128, 8, 2) in kept(fwd, 256, 128, False) and (128, 128, 8, 2) not in kept(fwd, 256, 128, True)
    assert (128, 128, 8, 2) in kept(fwd, 256, 64, True)  # spill-free at D = 64
    assert (64, 64, 4, 3) not in kept(dkdv, 256, 128, False) and (64, 64, 4, 3) in kept(dkdv, 256, 64, False)
    assert (128, 64, 8, 3) not in kept(dq, 256, 128, True) and (128, 32, 8, 2) in kept(dq, 256, 128, True)
    assert all(bm <= 64 and bn <= 64 for bm, bn, _, _ in kept(fwd, 64, 128, False))  # Wan's 4 x 4 x 4 tiles
    assert kept(fwd, 15, 64, False) == {(16, 16, 4, 2)}  # nothing divides 15: the blocks that fit
    assert all(bm * bn <= 64 * 64 for bm, bn, _, _ in kept(fwd, 256, 64, False, torch.float32))


def test_bench_sparse_counts_pairs_and_its_cpu_smoke_runs():
    """The pairs benchmarks/bench_sparse.py's FLOPs count (benchmarks/sparse_flops.pair_counts): kept ones are
    the token mask's True entries; issued ones the whole blocks the kernels run (kept ones when every tile is
    one whole block); and its --cpu-smoke mode runs the GPU code path on a tiny case (every provider checked
    against the reference, both variants), so it cannot rot."""
    from benchmarks import bench_sparse, sparse_flops

    layout = TileLayout((3, 5, 7), (2, 4, 4), extra=5)
    blocks, _ = _blocks(layout, (1, 2), 0.4)
    kept, issued = sparse_flops.pair_counts(blocks, block=16)
    assert kept == int(blocks.token_mask().sum()) and issued > kept
    whole = TileLayout((2, 4, 8), (1, 4, 4))  # 16-token tiles, all whole
    blocks, _ = _blocks(whole, (1, 1), 0.5)
    assert sparse_flops.pair_counts(blocks, block=16) == (int(blocks.token_mask().sum()),) * 2
    summaries = bench_sparse.smoke()
    assert [s["variant"] for s in summaries] == ["fwd", "fwd+bwd"]


def test_compiles_fullgraph_with_the_kernels_opaque():
    """torch.compile(fullgraph=True) traces the public function (checks, gathers, the blocks' transposed
    lists) without a break, in both orders; the custom ops run the kernels at run time (launches counted)
    and the compiled forward and gradients equal the eager ones."""
    layout = TileLayout((2, 5, 7), (1, 3, 5), extra=5)
    blocks, _ = _blocks(layout, (1, 1), 0.5)
    q, k, v = (torch.randn(1, layout.tokens, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    for order in ("raster", "tiles"):
        def fn(q, k, v, order=order):
            return block_sparse_attention(q, k, v, blocks, order=order, backend="triton")

        with count_launches() as launches:
            out = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert launches["_sparse_fwd_kernel"] == 1 and launches["_sparse_bwd_dq_kernel"] == 1, launches
        want = fn(q, k, v)
        torch.testing.assert_close(out, want)
        for g, w in zip(grads, torch.autograd.grad(want.sum(), (q, k, v)), strict=True):
            torch.testing.assert_close(g, w)
