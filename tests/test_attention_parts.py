"""dit_fast.parallel.attention_parts: attention over key blocks merged by log-sum-exp equals dit_fast.ops.attention
over all the keys, forward and every gradient, on the reference and on the Triton custom ops."""

import itertools

import pytest
import torch

from dit_fast.ops.flash_attention import attention
from dit_fast.parallel.attention_parts import attention_block_backward, attention_block_forward, merge_partials
from tests.utils import assert_close_to_reference

BLOCKS = (7, 11, 5)  # uneven key blocks: sizes that fill no tile
CASES = {  # backend -> dtypes it accepts
    "torch": (torch.float64, torch.float32),
    "triton": (torch.float32, torch.bfloat16),
}
PARAMS = [(b, d) for b, dtypes in CASES.items() for d in dtypes]


def _inputs(dtype, masked, B=2, Sq=13, heads=2, D=72):
    Sk = sum(BLOCKS)
    q, k, v = (torch.randn(B, S, heads, D, dtype=torch.float64) for S in (Sq, Sk, Sk))
    mask = None
    if masked:  # True: (B, Sk); "per_head": (B, heads, Sk), a different mask in each head
        mask = torch.rand((B, heads, Sk) if masked == "per_head" else (B, Sk)) > 0.3
        mask[0, ..., :BLOCKS[0]] = False  # sample 0 sees nothing in block 0: lse -inf there, merged from the others
        mask[1] = False  # sample 1 sees no key at all: out 0, lse -inf, zero gradients
        mask[0, ..., -1] = True
    dout = torch.randn(B, Sq, heads, D, dtype=torch.float64)
    return q, k, v, mask, dout


def _blocks(t, mask):
    edges = torch.tensor((0,) + BLOCKS).cumsum(0).tolist()
    for lo, hi in itertools.pairwise(edges):
        yield t[:, lo:hi], None if mask is None else mask[..., lo:hi]


def _by_blocks(q, k, v, mask, dout, backend, scale=None):
    """Forward block by block and merge; backward block by block from the merged (out, lse)."""
    out = lse = None
    for (kb, mb), (vb, _) in zip(_blocks(k, mask), _blocks(v, mask), strict=True):
        o, s = attention_block_forward(q, kb, vb, key_padding_mask=mb, scale=scale, backend=backend)
        assert o.shape == q.shape and s.shape == (q.shape[0], q.shape[2], q.shape[1]) and s.dtype == torch.float32
        out, lse = (o, s) if out is None else merge_partials(out, lse, o, s)
    dq = 0
    dks, dvs = [], []
    for (kb, mb), (vb, _) in zip(_blocks(k, mask), _blocks(v, mask), strict=True):
        g = attention_block_backward(q, kb, vb, out, lse, dout, key_padding_mask=mb, scale=scale, backend=backend)
        dq = dq + g[0].double()
        dks.append(g[1])
        dvs.append(g[2])
    return out, lse, dq, torch.cat(dks, 1), torch.cat(dvs, 1)


def _whole(q, k, v, mask, dout, dtype, scale=None):
    """dit_fast.ops.attention over every key on the reference, with autograd: out, lse, dq, dk, dv."""
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = attention(*leaves, key_padding_mask=mask, scale=scale, return_lse=True, backend="torch")
    return (out, lse, *torch.autograd.grad(out, leaves, dout.to(dtype)))


@pytest.mark.parametrize("masked", [False, True, "per_head"], ids=["dense", "padding", "per_head"])
@pytest.mark.parametrize("backend,dtype", PARAMS, ids=[f"{b}-{str(d).split('.')[-1]}" for b, d in PARAMS])
def test_blocks_merged_equal_whole_attention(backend, dtype, masked):
    q, k, v, mask, dout = _inputs(dtype, masked)
    got = _by_blocks(q.to(dtype), k.to(dtype), v.to(dtype), mask, dout.to(dtype), backend)
    want64 = _whole(q, k, v, mask, dout, torch.float64)
    want_dtype = _whole(q, k, v, mask, dout, dtype)
    for name, g, w64, wd in zip(("out", "lse", "dq", "dk", "dv"), got, want64, want_dtype, strict=True):
        if name == "dq":
            g = g.to(dtype)
        assert g.dtype == (torch.float32 if name == "lse" else dtype), name
        if name == "lse":
            finite = w64.isfinite()
            assert torch.equal(g.isfinite(), finite), "lse: -inf exactly where no key is visible"
            g, w64, wd = g[finite], w64[finite], wd[finite]
        # lse is fp32 by contract, so float64 blocks merge with fp32 weights: float32's floor
        floor = torch.float32 if dtype == torch.float64 else dtype
        assert_close_to_reference(f"{backend} {name}", g, w64, wd, factor=4.0, dtype=floor)
    if masked:  # sample 1: no visible key anywhere
        for name, g in zip(("out", "dq", "dk", "dv"), (got[0], got[2], got[3], got[4]), strict=True):
            assert torch.equal(g[1], torch.zeros_like(g[1])), name
        assert (got[1][1] == float("-inf")).all()


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("triton", torch.float32)])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_masked_keys_never_leak(backend, dtype, poison):
    """NaN / inf in keys and values behind the padding mask change nothing: same outputs and gradients
    as with clean values, zero gradients for the hidden keys."""
    q, k, v, mask, dout = (t if t is None or t.dtype == torch.bool else t.to(dtype) for t in _inputs(dtype, True))
    k_bad, v_bad = k.clone(), v.clone()
    hidden = ~mask
    k_bad[hidden] = poison
    v_bad[:, :, 1][hidden] = poison
    clean = _by_blocks(q, k, v, mask, dout, backend)
    dirty = _by_blocks(q, k_bad, v_bad, mask, dout, backend)
    for name, c, d in zip(("out", "lse", "dq", "dk", "dv"), clean, dirty, strict=True):
        assert not d.isnan().any(), name
        assert torch.equal(c, d), name
    assert (dirty[3][hidden] == 0).all() and (dirty[4][hidden] == 0).all()


def test_custom_scale_on_the_kernels():
    q, k, v, mask, dout = (t if t is None or t.dtype == torch.bool else t.float() for t in _inputs(None, True, D=24))
    got = _by_blocks(q, k, v, mask, dout, "triton", scale=0.37)
    want = _by_blocks(q, k, v, mask, dout, "torch", scale=0.37)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-5, msg=name)


def test_merge_handles_empty_blocks_exactly():
    """lse -inf in one block: the other block's values, bit for bit; in both: out 0, lse -inf, never NaN."""
    B, S, heads, D = 2, 5, 3, 16
    out_a, out_b = torch.randn(B, S, heads, D), torch.randn(B, S, heads, D)
    lse_a, lse_b = torch.randn(B, heads, S), torch.randn(B, heads, S)
    lse_a[0] = float("-inf")
    out_a[0] = 0  # the contract: an empty block's rows are 0
    lse_a[1, :, 2] = lse_b[1, :, 2] = float("-inf")
    out_a[1, 2] = out_b[1, 2] = 0
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[0], out_b[0]) and torch.equal(lse[0], lse_b[0])
    assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2])) and (lse[1, :, 2] == float("-inf")).all()
    # symmetric, and the weights sum to one: merging a block with itself returns it, with lse + log 2
    out2, lse2 = merge_partials(out_b, lse_b, out_b, lse_b)
    torch.testing.assert_close(out2, out_b)
    torch.testing.assert_close(lse2, lse_b + torch.log(torch.tensor(2.0)))


def test_bad_input_raises_clear_errors():
    q, k, v = (torch.randn(1, 6, 2, 16) for _ in range(3))
    out, lse = attention_block_forward(q, k, v, backend="torch")
    with pytest.raises(ValueError, match=r"lse must be \(B, heads, Sq\) = \(1, 2, 6\)"):
        attention_block_backward(q, k, v, out, lse.transpose(1, 2), out, backend="torch")
    with pytest.raises(TypeError, match="lse must be float32"):
        attention_block_backward(q, k, v, out, lse.double(), out, backend="torch")
    with pytest.raises(ValueError, match="dout must have the shape of out"):
        attention_block_backward(q, k, v, out, lse, out[:, :3], backend="torch")
    with pytest.raises(ValueError, match=r"out_b must be \(B, Sq, heads, D\)"):
        merge_partials(out, lse, out[:, :3], lse)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        attention_block_forward(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool), backend="torch")
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        attention_block_forward(q, k, v, key_padding_mask=torch.ones(1, 6), backend="torch")
