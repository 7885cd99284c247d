"""Property-based tests (hypothesis) of block-sparse attention's data and entry points.

TileLayout and SparseBlocks against definitions written out here token by token (not with the
library's helpers); the op's torch path against a float64 masked softmax written here; junk arguments
to every constructor and pattern: a ValueError or TypeError, never another exception.
Derandomized, tiny sizes, bounded example counts (tests/test_properties.py's house style): seconds.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit_fast.ops import block_sparse_attention
from dit_fast.ops.block_sparse import check_block_values
from dit_fast.ops.sparse_layout import SparseBlocks, TileLayout
from dit_fast.sparse import SparseAttention, radial, sliding_tile, topk

PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def examples(n):
    return settings(PROPERTY, max_examples=n)


JUNK = [None, "x", "1", True, False, float("nan"), float("inf"), -1, 0, 1.5, 1e300, (), [1.5], (1, 2), (0, 1, 1),
        (1, True, 1), (1.0, 1, 1), torch.ones(3)]


@st.composite
def layouts(draw, max_axis=6):
    grid = tuple(draw(st.integers(1, max_axis)) for _ in range(3))
    tile = tuple(draw(st.integers(1, 4)) for _ in range(3))
    return TileLayout(grid, tile, draw(st.integers(0, 9)))


def tile_of_tokens(layout: TileLayout) -> torch.Tensor:
    """(S,) the tile of each raster token, from the definition: video token (t, h, w) in tile
    (t // tt, h // th, w // tw) of the ceil-divided tile grid (raster), extra token j in n_video + j // V."""
    (T, H, W), (tt, th, tw) = layout.grid, layout.tile
    nb, nc = -(-H // th), -(-W // tw)
    video = [(t // tt * nb + h // th) * nc + w // tw for t in range(T) for h in range(H) for w in range(W)]
    n_video = -(-T // tt) * nb * nc
    extra = [n_video + j // (tt * th * tw) for j in range(layout.extra)]
    return torch.tensor(video + extra, dtype=torch.int64)


@examples(40)
@given(layout=layouts())
def test_layout_tiles_and_orders_follow_the_definition(layout):
    tile_of = tile_of_tokens(layout)
    assert layout.tokens == tile_of.numel() and layout.n_tiles == int(tile_of.max()) + 1
    assert torch.equal(layout.token_tile(), tile_of)
    assert torch.equal(layout.tile_sizes(), torch.bincount(tile_of, minlength=layout.n_tiles))
    perm = layout.perm()
    assert torch.equal(perm.sort().values, torch.arange(layout.tokens))  # a permutation
    # tile order: tile by tile, each tile one run at [starts[i], starts[i + 1]), raster order inside it
    assert torch.equal(tile_of[perm], torch.repeat_interleave(torch.arange(layout.n_tiles), layout.tile_sizes()))
    starts = layout.tile_starts()
    for i in range(layout.n_tiles):
        run = perm[starts[i]:starts[i + 1]]
        assert torch.equal(run, (tile_of == i).nonzero().flatten())
    x = torch.randn(2, layout.tokens, 3)
    assert torch.equal(layout.to_tiles(x), x[:, perm]) and torch.equal(layout.from_tiles(layout.to_tiles(x)), x)


@st.composite
def blocks_cases(draw):
    layout = draw(layouts(max_axis=5))
    batch, heads = draw(st.sampled_from([(1, 1), (2, 1), (1, 3), (2, 3)]))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**16))
    mask = torch.rand(batch, heads, layout.n_tiles, layout.n_tiles, generator=torch.Generator().manual_seed(seed))
    return layout, mask < density, seed


@examples(30)
@given(case=blocks_cases())
def test_blocks_hold_the_tile_mask(case):
    """from_tile_mask -> counts and ascending lists that give the mask back, its transpose for the backward,
    the kept token pairs and the token masks of both orders, all against the definition."""
    layout, mask, _ = case
    blocks = SparseBlocks.from_tile_mask(layout, mask)
    check_block_values(blocks)  # the lists are what the kernels accept
    assert torch.equal(blocks.kv_count, mask.sum(-1, dtype=torch.int32))
    assert torch.equal(blocks.tile_mask(), mask)
    q_count, q_index = blocks.transposed()
    assert torch.equal(SparseBlocks(layout, q_count, q_index).tile_mask(), mask.transpose(-1, -2))
    tile_of = tile_of_tokens(layout)
    tokens = mask[..., tile_of, :][..., tile_of]  # (B, heads, S, S) raster order
    assert torch.equal(blocks.token_mask(), tokens)
    perm = layout.perm()
    assert torch.equal(blocks.token_mask("tiles"), tokens[..., perm, :][..., perm])
    assert torch.equal(blocks.kept_pairs(), tokens.sum((-1, -2)))


def masked_softmax_attention(q, k, v, token_mask, scale):
    """float64 softmax(scale q k^T) v over the visible keys; a query with none gets zeros. (B, S, heads, D)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row of -inf only: 0 / 0 -> zeros
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double())


@examples(25)
@given(case=blocks_cases(), head_dim=st.sampled_from([1, 3, 8]), order=st.sampled_from(["raster", "tiles"]),
       padded=st.booleans())
def test_op_torch_path_is_the_masked_softmax(case, head_dim, order, padded):
    layout, mask, seed = case
    blocks = SparseBlocks.from_tile_mask(layout, mask)
    g = torch.Generator().manual_seed(seed + 1)
    B, heads = 2, 3
    q, k, v = (torch.randn(B, layout.tokens, heads, head_dim, generator=g) for _ in range(3))
    padding = torch.rand(B, layout.tokens, generator=g) < 0.8 if padded else None
    token_mask = tile_of_tokens(layout)
    token_mask = mask[..., token_mask, :][..., token_mask]
    if padding is not None:
        token_mask = token_mask & padding[:, None, None, :]
    want = masked_softmax_attention(q, k, v, token_mask, 1 / math.sqrt(head_dim))
    if order == "tiles":
        q, k, v, want = (layout.to_tiles(t) for t in (q, k, v, want))
        padding = None if padding is None else layout.to_tiles(padding)
    got = block_sparse_attention(q, k, v, blocks, order=order, key_padding_mask=padding, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _calls(junk):
    layout = TileLayout((3, 4, 5), (1, 2, 2), 2)
    q = torch.randn(1, layout.tokens, 2, 8)
    blocks = sliding_tile(layout, (1, 1, 1))
    return {
        "TileLayout.grid": lambda: TileLayout(junk, (1, 1, 1)),
        "TileLayout.tile": lambda: TileLayout((2, 2, 2), junk),
        "TileLayout.extra": lambda: TileLayout((2, 2, 2), (1, 1, 1), junk),
        "SparseBlocks.layout": lambda: SparseBlocks(junk, blocks.kv_count, blocks.kv_index),
        "SparseBlocks.kv_count": lambda: SparseBlocks(layout, junk, blocks.kv_index),
        "from_tile_mask.tile_mask": lambda: SparseBlocks.from_tile_mask(layout, junk),
        "from_tile_mask.width": lambda: SparseBlocks.from_tile_mask(layout, blocks.tile_mask(), width=junk),
        "sliding_tile.window": lambda: sliding_tile(layout, junk),
        "radial.decay": lambda: radial(layout, decay=junk),
        "radial.dense_radius": lambda: radial(layout, dense_radius=junk),
        "radial.sink": lambda: radial(layout, sink=junk),
        "topk.keep": lambda: topk(q, q, layout, keep=junk),
        "topk.local": lambda: topk(q, q, layout, keep=1, local=junk),
        "topk.q": lambda: topk(junk, q, layout, keep=1),
        "op.blocks": lambda: block_sparse_attention(q, q, q, junk, backend="torch"),
        "op.scale": lambda: block_sparse_attention(q, q, q, blocks, scale=junk, backend="torch"),
        "op.order": lambda: block_sparse_attention(q, q, q, blocks, order=junk, backend="torch"),
        "op.key_padding_mask": lambda: block_sparse_attention(q, q, q, blocks, key_padding_mask=junk, backend="torch"),
        "op.return_lse": lambda: block_sparse_attention(q, q, q, blocks, return_lse=junk, backend="torch"),
        "SparseAttention.pattern": lambda: SparseAttention(pattern=junk),
        "SparseAttention.density": lambda: SparseAttention(density=junk),
        "SparseAttention.dense_steps": lambda: SparseAttention(dense_steps=junk),
        "SparseAttention.dense_layers": lambda: SparseAttention(dense_layers=junk),
        "SparseAttention.tolerance": lambda: SparseAttention(tolerance=junk),
        "SparseAttention.tile": lambda: SparseAttention(tile=junk),
        "SparseAttention.local": lambda: SparseAttention(local=junk),
        "SparseAttention.from_spec": lambda: SparseAttention.from_spec(junk),
        "SparseAttention.from_dict": lambda: SparseAttention.from_dict(junk),
    }


@pytest.mark.parametrize("junk", JUNK, ids=repr)
def test_junk_arguments_raise_value_or_type_error(junk):
    """Each entry point with one junk argument: it runs (some junk is valid somewhere: 1.5 is a decay) or raises
    ValueError / TypeError naming the argument; never another exception."""
    for name, call in _calls(junk).items():
        try:
            call()
        except (ValueError, TypeError) as exc:
            argument = name.split(".")[-1]
            if argument not in ("kv_count", "tile_mask", "q", "blocks", "from_spec", "from_dict", "window", "local"):
                assert argument in str(exc), f"{name}({junk!r}): {exc}"
        except Exception as exc:  # noqa: BLE001 - the property: nothing else escapes
            pytest.fail(f"{name}({junk!r}) raised {type(exc).__name__}: {exc}")
