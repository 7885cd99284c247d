"""Masked keys never leak into the kernels' results, and tile windows never cost more than needed.

NaN and inf planted in keys and values that a mask hides (key padding, per-head key padding, another
frame, another column, outside a window or a tile window) must change nothing that cannot see them: outputs,
lse and every gradient equal the clean run's bit for bit, on the Triton kernels (the CPU interpreter here,
launches counted), on the reference (autograd) and on the reference backward spelled out from (out, lse)
(attention_backward_reference: ring attention's). Queries that can see a poisoned key return a NaN row and
a NaN lse, and pass no gradient to the keys hidden from them. Tiny fp32 shapes with partial 16-token tiles.
"""

import pytest
import torch

from dit_fast import ops
from dit_fast.ops.flash_attention import attention_backward_reference, spacetime_mask
from tests.conftest import HAS_GPU, kernel_devices
from tests.launches import count_launches
from tests.test_attention import assert_kernels_ran

DEVICE = kernel_devices()

# mode -> (grid, spacetime_attention kwargs); None: attention() with a key padding mask
LEAK_CASES = {
    "padding": None,
    "spatial": ((3, 3, 5), dict(mode="spatial")),
    "temporal": ((3, 2, 3), dict(mode="temporal")),
    "window": ((2, 4, 6), dict(window=(1, 3, 3))),
    "window_tile": ((2, 5, 6), dict(window=(1, 4, 4), window_tile=(1, 4, 4))),
    # 48 columns, windows of 32: the forward visits a key tile inside every window of its query tile (no
    # window test there), and the backward meets keys hidden from those queries in edge tiles
    "window_interior": ((1, 1, 48), dict(window=(1, 1, 32))),
}
# the poisoned keys of batch 0 and batch 1 where the defaults (two keys near the ends, the middle key)
# would miss the case: key 32 lies in the key tile 17..32, inside the window of every query 16..31
# (windows from 1..16 to 32..47), and query 16 (window 1..32) meets key 0 (hidden from it, seen only by
# queries 0..15, whose windows end at 31) in the edge tile 0..15 of the dk / dv kernel
POISONED = {"window_interior": ([32, 40], [32])}


def _leak_setup(case, deterministic=None):
    """(fn(q, k, v, backend) -> (out, lse), q, k, v, visible (B, Sq, Sk) bool)."""
    if LEAK_CASES[case] is None:
        Sq, Sk = 20, 23
        mask = torch.rand(2, Sk, device=DEVICE) > 0.4
        mask[:, 0] = True
        mask[:, 1] = mask[:, Sk - 3] = False  # the keys poisoned in batch 0

        def fn(q, k, v, backend):
            return ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend=backend,
                                 deterministic=deterministic)

        visible = mask[:, None, :].expand(2, Sq, Sk)
    else:
        grid, kwargs = LEAK_CASES[case]
        Sq = Sk = grid[0] * grid[1] * grid[2]

        def fn(q, k, v, backend):
            return ops.spacetime_attention(q, k, v, grid, return_lse=True, backend=backend,
                                           deterministic=deterministic, **kwargs)

        mode = kwargs.get("mode", "full")
        visible = spacetime_mask(grid, mode, kwargs.get("window"), DEVICE, kwargs.get("window_tile"))
        visible = visible[None].expand(2, Sq, Sk)
    q, k, v = (torch.randn(2, S, 2, 16, device=DEVICE) for S in (Sq, Sk, Sk))
    fn.deterministic = deterministic  # the backward whose kernels _run expects
    return fn, q, k, v, visible


def _run(fn, q, k, v, dout, backend, visible=None):
    """(out, lse, dq, dk, dv). backend "triton" (launches counted), "torch" (autograd through the
    reference) or "torch-flash": the reference forward, then attention_backward_reference from its
    (out, lse) with the (B, Sq, Sk) mask `visible`."""
    if backend == "torch-flash":
        with torch.no_grad():
            out, lse = fn(q, k, v, "torch")
        return (out, lse, *attention_backward_reference(q, k, v, out, lse, dout, mask=visible[:, None]))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with count_launches() as launches:
        out, lse = fn(*leaves, backend)
        grads = torch.autograd.grad(out, leaves, dout)
    if backend == "triton":
        assert_kernels_ran(launches, getattr(fn, "deterministic", None))
    return (out, lse, *grads)


@pytest.mark.parametrize("backend", ["triton", "triton-atomic", "torch", "torch-flash"])
@pytest.mark.parametrize("case", list(LEAK_CASES))
def test_masked_keys_never_leak(case, backend):
    """Both backwards of the kernels (the one-pass one meets every key of a tile pair in dq's share), the
    reference's autograd and the reference backward from (out, lse)."""
    fn, q, k, v, visible = _leak_setup(case, deterministic=False if backend == "triton-atomic" else None)
    backend = backend.replace("triton-atomic", "triton")
    Sk = k.shape[1]
    # poison: in batch 0, two keys (NaN in k, +inf in v); in batch 1, every key no query of it sees
    # (padding) or one key (other modes)
    default = ([1, Sk - 3], (~visible[1].any(0)).nonzero().flatten().tolist() if case == "padding" else [Sk // 2])
    poisoned = [torch.tensor(keys, device=DEVICE) for keys in POISONED.get(case, default)]
    k_bad, v_bad = k.clone(), v.clone()
    for b, keys in enumerate(poisoned):
        k_bad[b, keys, 0] = float("nan")
        v_bad[b, keys, 1, 3] = float("inf")
        v_bad[b, keys[:1], 0] = -float("inf")
    dout = torch.randn_like(q)
    clean = _run(fn, q, k, v, dout, backend, visible)
    dirty = _run(fn, q, k_bad, v_bad, dout, backend, visible)
    for b, keys in enumerate(poisoned):
        sees = visible[b][:, keys].any(1)  # queries that can see a poisoned key
        unseen = ~visible[b][sees].any(0)  # keys that no such query sees: their gradients stay clean
        if case == "padding":
            assert not sees.any()
        else:
            assert sees.any() and (~sees).any() and unseen.any()
        for name, c, d in zip(("out", "lse", "dq", "dk", "dv"), clean, dirty, strict=True):
            rows = unseen if name in ("dk", "dv") else ~sees
            c, d = (c[b][:, rows], d[b][:, rows]) if name == "lse" else (c[b][rows], d[b][rows])
            assert torch.equal(c, d), f"{case} {backend} batch {b}: {name} differs where nothing sees the poison"
        seen = dirty[0][b][sees].flatten(1)  # (queries, heads * D)
        assert (~seen.isfinite()).any(1).all(), "a query that sees a non-finite key must not return a finite row"
        # heads 0 and 1 both see poison (k NaN, v inf): the whole row NaN, and the lse, in both
        assert dirty[0][b][sees].isnan().all() and dirty[1][b][:, sees].isnan().all()
    # gradients of keys no query sees at all (padding) are zero, whatever their values
    hidden = ~visible.any(1)  # (B, Sk)
    assert (dirty[3][hidden] == 0).all() and (dirty[4][hidden] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "triton-atomic", "torch"])
def test_per_head_masked_keys_never_leak(backend):
    """A per-head key padding mask (B, heads, Sk): NaN / inf in every key and value row its head masks,
    among them a key one head masks and another sees, whose copy in the seeing head is poisoned too. Every
    head but that one returns bit for bit the clean run's outputs, lse and gradients; that head's queries
    return non-finite rows; masked keys get zero gradients."""
    B, Sq, Sk, heads = 2, 20, 23, 3
    mask = torch.rand(B, heads, Sk, device=DEVICE) > 0.4
    mask[:, :, 0] = True
    mask[0, 0, 5], mask[0, 1, 5] = False, True  # sample 0's key 5: hidden from head 0, seen by head 1
    mask[1, :, 7] = False  # sample 1's key 7: hidden from every head
    hidden = ~mask.transpose(1, 2)  # (B, Sk, heads)
    q, k, v = (torch.randn(B, S, heads, 16, device=DEVICE) for S in (Sq, Sk, Sk))
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[hidden] = float("nan")
    v_bad[hidden] = float("inf")
    v_bad[0, 5, 1, 3] = -float("inf")  # the copy head 1 sees
    deterministic = False if backend == "triton-atomic" else None

    def fn(q, k, v, backend):
        return ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend=backend,
                             deterministic=deterministic)

    fn.deterministic = deterministic
    dout = torch.randn_like(q)
    clean = _run(fn, q, k, v, dout, backend.split("-")[0])
    dirty = _run(fn, q, k_bad, v_bad, dout, backend.split("-")[0])
    for b in range(B):
        for h in range(heads):
            if (b, h) == (0, 1):
                continue
            for name, c, d in zip(("out", "lse", "dq", "dk", "dv"), clean, dirty, strict=True):
                c, d = (c[b, h], d[b, h]) if name == "lse" else (c[b, :, h], d[b, :, h])
                assert torch.equal(c, d), f"{backend}: sample {b} head {h}: {name} differs from the clean run"
    assert (~dirty[0][0, :, 1].isfinite()).any(-1).all(), "head 1 sees a poisoned value: no finite row"
    assert (dirty[3][hidden] == 0).all() and (dirty[4][hidden] == 0).all()


# ---- tile windows larger than the grid ---------------------------------------------------------

# grid, window, window_tile, and what the kernels run: (window, window_tile), [] for none
EFFECTIVE_CASES = [
    ((1, 4, 4), (1, 1, 4096), (1, 1, 4096), ([1, 1, 4], [])),  # one tile along w: a token window
    ((3, 5, 7), (1, 8, 8), (1, 8, 8), ([1, 5, 7], [])),  # a frame per tile: spatial attention
    ((1, 3, 5), (4, 4, 16), (4, 4, 16), ([], [])),  # one tile in all: dense
    ((3, 5, 7), (3, 5, 7), None, ([], [])),  # a token window over the whole grid: dense
    ((4, 3, 40), (2, 4, 16), (2, 4, 8), ([2, 3, 16], [2, 3, 8])),  # h: 4 -> 3 (one tile), volume 48
    ((2, 3, 40), (4, 4, 16), (4, 4, 8), ([2, 3, 16], [2, 3, 8])),
    ((5, 6, 9), (4, 4, 4), (2, 4, 2), ([4, 4, 4], [2, 4, 2])),  # fits the grid: unchanged
    ((3, 5, 7), (2, 3, 5), None, ([2, 3, 5], [])),
]


@pytest.mark.parametrize("grid,window,window_tile,want", EFFECTIVE_CASES)
def test_tile_clamped_to_the_grid_keeps_the_mask(grid, window, window_tile, want):
    """A tile longer than the grid along an axis shrinks to it (or the rule runs as a token window, or
    dense attention), with exactly the mask that was asked for, and never more positions than before."""
    from dit_fast.triton_kernels.attention import effective_window, tile_order_length

    got = effective_window(grid, list(window), list(window_tile or []))
    assert got == want
    asked = spacetime_mask(grid, "full", window, window_tile=window_tile)
    run = spacetime_mask(grid, "full", got[0] or None, window_tile=got[1] or None)
    assert torch.equal(asked, run)
    if got[1] and window_tile:
        assert tile_order_length(grid, got[1]) <= tile_order_length(grid, window_tile)


@pytest.mark.skipif(HAS_GPU, reason="counts Python calls of the kernels' helpers, which only the CPU interpreter "
                    "makes; on a GPU the tile window correctness tests cover the compiled kernels")
def test_tile_larger_than_the_grid_costs_no_more_than_dense(monkeypatch):
    """Issue 11: a (1, 1, 4096) tile on 16 tokens visited 4096-token tiles (minutes in the interpreter).
    Clamped, forward, dk/dv and dq visit at most the dense tile pairs, with the reference's result."""
    from tests.test_attention import _count_calls

    grid, window, tile = (1, 4, 4), (1, 1, 4096), (1, 1, 4096)
    q, k, v = (torch.randn(1, 16, 1, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    counters = _count_calls(monkeypatch, ("_fwd_tile", "_dkdv_tile", "_dq_tile"))
    with count_launches() as launches:
        out = ops.spacetime_attention(q, k, v, grid, window=window, window_tile=tile, backend="triton")
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert_kernels_ran(launches)  # else "at most one tile pair" would pass with none
    assert all(c.calls <= 1 for c in counters.values()), {n: c.calls for n, c in counters.items()}  # 1 dense pair
    with torch.no_grad():
        want = ops.spacetime_attention(q, k, v, grid, window=window, window_tile=tile, backend="torch")
    torch.testing.assert_close(out, want)
    assert all(g.isfinite().all() for g in grads)
