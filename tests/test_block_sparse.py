"""block_sparse_attention: the reference against a mask built token by token, the masked-key contract,
both token orders, and the input checks (the kernels: tests/test_block_sparse_kernels.py)."""

import itertools

import pytest
import torch

from dit_fast.ops import block_sparse_attention
from dit_fast.ops.block_sparse import backward_lists
from dit_fast.ops.flash_attention import attention_reference
from dit_fast.ops.sparse_layout import SparseBlocks, TileLayout

LAYOUT = TileLayout((3, 5, 7), (2, 4, 4), extra=5)  # partial tiles on every axis, 5 text tokens: 9 tiles


def brute_force_mask(layout: TileLayout, tile_mask: torch.Tensor) -> torch.Tensor:
    """(B | 1, heads | 1, S, S) raster order, written token by token from the tile definition (not from
    TileLayout's own helpers): token (t, h, w) lies in tile (t // tt, h // th, w // tw) of the tile grid,
    extra token j in tile n_video + j // V."""
    (T, H, W), (tt, th, tw) = layout.grid, layout.tile
    _, nb, nc = layout.tiles_per_axis
    tile_of = [(t // tt * nb + h // th) * nc + w // tw for t, h, w in itertools.product(range(T), range(H), range(W))]
    tile_of += [layout.n_video_tiles + j // layout.volume for j in range(layout.extra)]
    tile_of = torch.tensor(tile_of)
    return tile_mask[..., tile_of, :][..., tile_of]


def random_blocks(layout, batch, heads, density, generator=None, empty_row=True):
    mask = torch.rand(batch, heads, layout.n_tiles, layout.n_tiles, generator=generator) < density
    if empty_row:
        mask[0, 0, 1] = False  # a query tile that keeps nothing
    return SparseBlocks.from_tile_mask(layout, mask), mask


def qkv(layout, batch=2, heads=3, head_dim=16, dtype=torch.float32, requires_grad=False):
    return [torch.randn(batch, layout.tokens, heads, head_dim, dtype=dtype, requires_grad=requires_grad)
            for _ in range(3)]


@pytest.mark.parametrize("blocks_shape", [(2, 3), (1, 3), (2, 1), (1, 1)])
def test_reference_is_attention_with_the_tile_mask(blocks_shape):
    """Per batch / per head / shared blocks, a per-head padding mask: out and lse equal attention_reference
    with the mask written token by token, in raster order; in tile order, the same values permuted."""
    blocks, tiles = random_blocks(LAYOUT, *blocks_shape, density=0.4)
    q, k, v = qkv(LAYOUT, dtype=torch.float64)
    padding = torch.rand(2, 3, LAYOUT.tokens) < 0.8
    out, lse = block_sparse_attention(q, k, v, blocks, key_padding_mask=padding, return_lse=True, backend="torch")
    mask = brute_force_mask(LAYOUT, tiles) & padding[:, :, None, :]
    want, want_lse = attention_reference(q, k, v, mask=mask, return_lse=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    assert (lse[0, 0, LAYOUT.token_tile() == 1] == float("-inf")).all()  # the empty query tile
    assert (out[0, LAYOUT.token_tile() == 1, 0] == 0).all()

    to = LAYOUT.to_tiles
    out_t, lse_t = block_sparse_attention(to(q), to(k), to(v), blocks, order="tiles", key_padding_mask=to(padding, -1),
                                          return_lse=True, backend="torch")
    torch.testing.assert_close(out_t, to(out))
    torch.testing.assert_close(lse_t, to(lse, -1))


def test_masked_keys_influence_nothing_in_the_reference():
    """NaN / inf in every key outside a query's kept tiles and in padded keys: the outputs are the clean
    run's, and those keys get zero gradients."""
    blocks, tiles = random_blocks(LAYOUT, 1, 1, density=0.5)
    q, k, v = qkv(LAYOUT, batch=1, heads=1, dtype=torch.float64)
    padding = torch.ones(1, LAYOUT.tokens, dtype=torch.bool)
    padding[0, :7] = False
    # key tiles that query tile 0 does not keep: poison them, and look at query tile 0's rows only
    tile_of = LAYOUT.token_tile()
    hidden = ~tiles[0, 0, 0][tile_of] | ~padding[0]
    rows = tile_of == 0
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, hidden] = float("nan")
    v_bad[0, hidden] = float("inf")
    clean = block_sparse_attention(q, k, v, blocks, key_padding_mask=padding, backend="torch")
    q_bad = q.clone().requires_grad_()
    k_bad.requires_grad_()
    v_bad.requires_grad_()
    out = block_sparse_attention(q_bad, k_bad, v_bad, blocks, key_padding_mask=padding, backend="torch")
    torch.testing.assert_close(out[:, rows], clean[:, rows])
    out[:, rows].sum().backward()
    assert torch.isfinite(q_bad.grad).all()
    assert (k_bad.grad[0, hidden] == 0).all() and (v_bad.grad[0, hidden] == 0).all()


def test_backward_lists_are_the_transpose():
    blocks, tiles = random_blocks(LAYOUT, 2, 3, density=0.3)
    count, index = backward_lists(blocks)
    assert backward_lists(blocks)[1] is index  # cached per blocks object
    transposed = SparseBlocks(LAYOUT, count, index).tile_mask()
    assert torch.equal(transposed, tiles.transpose(-1, -2))


def test_lists_written_in_place_are_checked_and_transposed_again():
    """The checks and the backward's transposed lists are cached per blocks object and the version counters of its
    tensors: lists written in place after a call are transposed again, and checked again (an out-of-range tile is
    a ValueError, never an index the kernels would read)."""
    q, k, v = qkv(LAYOUT, batch=1, heads=1)
    blocks, tiles = random_blocks(LAYOUT, 1, 1, density=0.5, empty_row=False)
    block_sparse_attention(q, k, v, blocks, backend="torch")
    assert torch.equal(SparseBlocks(LAYOUT, *backward_lists(blocks)).tile_mask(), tiles.transpose(-1, -2))
    row = int(blocks.kv_count[0, 0].argmax())
    blocks.kv_count[0, 0, row] -= 1  # drops the row's last kept tile
    tiles[0, 0, row, blocks.kv_index[0, 0, row, blocks.kv_count[0, 0, row]]] = False
    assert torch.equal(SparseBlocks(LAYOUT, *backward_lists(blocks)).tile_mask(), tiles.transpose(-1, -2))
    blocks.kv_index[0, 0, row, 0] = LAYOUT.n_tiles
    with pytest.raises(ValueError, match=r"in \[0, n_tiles"):
        block_sparse_attention(q, k, v, blocks, backend="torch")


def _bad(layout=LAYOUT, **override):
    blocks, _ = random_blocks(layout, 1, 1, density=0.5, empty_row=False)
    return SparseBlocks(layout, override.get("count", blocks.kv_count), override.get("index", blocks.kv_index))


def test_input_checks_name_the_argument():
    q, k, v = qkv(LAYOUT)
    blocks, _ = random_blocks(LAYOUT, 2, 3, density=0.5)
    cases = [
        (TypeError, "blocks must be", dict(blocks=torch.ones(3))),
        (ValueError, "S = 110 tokens", dict(q=q[:, :-1], k=k[:, :-1], v=v[:, :-1])),
        (ValueError, r"\(B, heads\) = \(2, 3\)", dict(q=q[:, :, :2], k=k[:, :, :2], v=v[:, :, :2])),
        (ValueError, "order must be", dict(order="column")),
        (ValueError, "key_padding_mask must be", dict(key_padding_mask=torch.ones(2, 109, dtype=torch.bool))),
        (TypeError, "key_padding_mask must be a bool", dict(key_padding_mask=torch.ones(2, 110))),
        (TypeError, "return_lse", dict(return_lse=1)),
        (TypeError, "q must be float32", dict(q=q.int(), k=k.int(), v=v.int())),
    ]
    for error, match, override in cases:
        args = {**dict(q=q, k=k, v=v, blocks=blocks), **override}
        with pytest.raises(error, match=match):
            block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("blocks"), **args)


def test_bad_index_lists_are_refused():
    q, k, v = qkv(LAYOUT, batch=1, heads=1)
    good = _bad()
    index = good.kv_index.clone()
    index[0, 0, 0, 0] = LAYOUT.n_tiles
    count = good.kv_count.clone()
    count[0, 0, 2] = good.kv_index.shape[-1] + 1
    full = torch.ones(1, 1, LAYOUT.n_tiles, LAYOUT.n_tiles, dtype=torch.bool)
    dense = SparseBlocks.from_tile_mask(LAYOUT, full)
    descending = dense.kv_index.clone()
    descending[0, 0, 3, :2] = descending[0, 0, 3, :2].flip(0)
    repeated = dense.kv_index.clone()  # a tile listed twice (ascending, not strictly): the kernels would count it twice
    repeated[0, 0, 4, 1] = repeated[0, 0, 4, 0]
    for blocks, match in ((_bad(index=index), r"in \[0, n_tiles"), (_bad(count=count), r"kv_count must lie"),
                          (SparseBlocks(LAYOUT, dense.kv_count, descending), "strictly ascending"),
                          (SparseBlocks(LAYOUT, dense.kv_count, repeated), "strictly ascending")):
        with pytest.raises(ValueError, match=match):
            block_sparse_attention(q, k, v, blocks, backend="torch")


def test_auto_on_cpu_is_the_reference():
    """backend="auto" on CPU runs the reference (no kernel launch) and equals backend="torch"."""
    from tests.launches import count_launches

    blocks, _ = random_blocks(LAYOUT, 1, 1, density=0.5)
    q, k, v = qkv(LAYOUT, batch=1, heads=1)
    with count_launches() as launches:
        out = block_sparse_attention(q, k, v, blocks)
    assert launches.total() == 0
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, blocks, backend="torch"), rtol=0, atol=0)
