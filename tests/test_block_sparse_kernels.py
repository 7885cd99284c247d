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
BLOCK = 16  # the interpreter's BLOCK_M = BLOCK_N (attention_sparse._configs)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

# (layout, batch, heads, head dim, blocks' (B, heads), padding mask, density, dtype, order)
CASES = {
    # partial tiles on every axis, 5 text tokens in a partial tile, blocks per batch, a (B, S) mask
    "fp32-text-per-batch": (TileLayout((3, 5, 7), (2, 4, 4), extra=5), 2, 1, 16, (2, 1), "batch", 0.5,
                            torch.float32, "raster"),
    # tiles of 15 tokens (no block divides them: every block masked at the tile's end), per head, a
    # per-head mask, tile order, D = 40 in two chunks (32 + 16)
    "bf16-per-head-tiles": (TileLayout((2, 5, 7), (1, 3, 5), extra=0), 1, 2, 40, (1, 2), "head", 0.3,
                            torch.bfloat16, "tiles"),
    # whole tiles of two blocks each (EVEN: no bounds masks), one text tile, shared blocks, every tile kept
    # (dense attention as blocks), no mask
    "fp16-whole-tiles-dense": (TileLayout((2, 4, 12), (2, 4, 4), extra=32), 1, 2, 16, (1, 1), None, 1.0,
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
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want_grads, same_grads):
        assert_close_to_reference(name, g, w, s)
    if density < 1:  # the empty query tile (tile 1) returns zeros; the unkept key tile (2) gets no gradient
        tile_of = layout.token_tile(DEVICE)
        if order == "tiles":
            tile_of = tile_of[layout.perm(DEVICE)]
        assert (out[0, tile_of == 1, 0] == 0).all() and (lse[0, 0, tile_of == 1] == float("-inf")).all()
        assert (grads[1][0, tile_of == 2, 0] == 0).all() and (grads[2][0, tile_of == 2, 0] == 0).all()


@pytest.mark.parametrize("layout", [TileLayout((3, 5, 7), (2, 4, 4), extra=5), TileLayout((2, 5, 7), (1, 3, 5))],
                         ids=["partial-tiles-text", "tile-of-15"])
def test_visited_block_pairs_are_the_index_lists(layout):
    """RECORD: each kernel counts the (query tile, key tile) block pairs it visits. Every kept pair is
    visited once per (query block, key block) of the two tiles, and no other pair at all, in the forward,
    the dK / dV kernel (walking the transposed lists) and the dQ kernel."""
    blocks, mask = _blocks(layout, (1, 2), 0.4)  # per head
    sizes = layout.tile_sizes()
    per_pair = (-(-sizes // BLOCK))[:, None] * (-(-sizes // BLOCK))[None, :]  # (query blocks) x (key blocks)
    want = (mask.int() * per_pair.int()).to(DEVICE)
    q, k, v, dout = (torch.randn(1, layout.tokens, 2, 16, device=DEVICE) for _ in range(4))
    visits = [torch.zeros(1, 2, layout.n_tiles, layout.n_tiles, dtype=torch.int32, device=DEVICE) for _ in range(3)]
    out, lse = attention_sparse.block_sparse_forward(q, k, v, blocks.kv_count, blocks.kv_index, None, layout, 0.25,
                                                     visits=visits[0])
    q_count, q_index = backward_lists(blocks)
    attention_sparse.block_sparse_backward(dout, q, k, v, out, lse, blocks.kv_count, blocks.kv_index, q_count,
                                           q_index, None, layout, 0.25, visits=visits[1:])
    for name, got in zip(("forward", "dk/dv", "dq"), visits):
        assert torch.equal(got, want), f"{name}: visited {got.sum()} block pairs, expected {want.sum()}"


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
    for name, c, b in zip(("out", "dq", "dk", "dv"), clean, bad):
        torch.testing.assert_close(b, c, msg=name)
    assert (bad[2][0, hidden] == 0).all() and (bad[3][0, hidden] == 0).all()

    rows = tile_of == 0
    clean, bad = run(k, v, rows), run(*poisoned(~mask[0, 0, 0].to(DEVICE)[tile_of] | ~padding[0]), rows)
    torch.testing.assert_close(bad[0], clean[0])
    torch.testing.assert_close(bad[1][:, rows], clean[1][:, rows])


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
