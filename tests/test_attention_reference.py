"""The attention references themselves (pure PyTorch, no kernels): the backward reference against
autograd, and masked keys that never leak, whatever their values."""

import pytest
import torch

from dit_fast.ops.flash_attention import attention_backward_reference, attention_reference, spacetime_mask


def _lse64(q, k, scale, mask):
    scores = scale * torch.einsum("bqhd,bkhd->bhqk", q, k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("masked", ["none", "padding", "per_head", "spatial"])
def test_backward_reference_matches_autograd(masked):
    """dq, dk, dv from (out, lse) equal autograd through attention_reference (float64, fresh inputs)."""
    B, heads, D, scale = 2, 3, 24, 0.3
    grid = (2, 3, 4)
    Sq = Sk = 24
    q, k, v = (torch.randn(B, S, heads, D, dtype=torch.float64, requires_grad=True) for S in (Sq, Sk, Sk))
    mask = None
    if masked == "padding":
        mask = (torch.rand(B, 1, 1, Sk) > 0.4)
        mask[1] = False  # sample 1: no visible key at all, zeros and zero gradients
    elif masked == "per_head":
        mask = (torch.rand(B, heads, 1, Sk) > 0.4)
        mask[1, 2] = False  # sample 1, head 2: no visible key
    elif masked == "spatial":
        mask = spacetime_mask(grid, "spatial")
    out = attention_reference(q, k, v, scale=scale, mask=mask)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), dout)
    lse = _lse64(q.detach(), k.detach(), scale, mask)
    got = attention_backward_reference(q.detach(), k.detach(), v.detach(), out.detach(), lse, dout, scale=scale,
                                       mask=mask)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"d{name}")
    if masked == "padding":
        assert all((g[1] == 0).all() for g in got)


@pytest.mark.parametrize("masked", ["padding", "spatial", "window"])
def test_backward_reference_blocks_rows_that_saw_garbage(masked):
    """NaN and inf in some keys and values, some queries seeing them: attention_backward_reference from
    attention_reference's (out, lse) is autograd through attention_reference. The rows that saw garbage
    (NaN out and lse) pass no gradient; no NaN reaches the keys hidden from them (issue 17: 0 * (dP - NaN)
    on their masked pairs did, in ring attention's backward), and every gradient is finite."""
    B, heads, D, grid = 2, 2, 12, (2, 3, 4)
    S = 24
    mask = {"padding": torch.rand(B, 1, 1, S) > 0.3, "spatial": spacetime_mask(grid, "spatial"),
            "window": spacetime_mask(grid, "full", (1, 2, 3))}[masked]
    q, k, v = (torch.randn(B, S, heads, D, dtype=torch.float64) for _ in range(3))
    k[0, 5, 0, 2] = float("nan")
    v[0, 17, 1] = float("inf")
    v[1, 9, 0, 3] = -float("inf")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = attention_reference(*leaves, mask=mask, return_lse=True)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, leaves, dout)
    lse = torch.where(lse.isnan(), lse.double(), _lse64(q, k, 1 / D ** 0.5, mask))  # float64 where finite
    got = attention_backward_reference(q, k, v, out.detach(), lse, dout, mask=mask)
    assert out.isnan().any() and lse.isnan().any()  # some queries see the garbage
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.isfinite().all(), f"d{name}"
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"d{name}")


def test_per_head_key_padding_mask_is_each_head_on_its_own():
    """ops.attention(backend="torch") with a per-head mask (B, heads, Sk) equals each head run alone with
    its own (B, Sk) mask: outputs, lse and gradients (float64)."""
    from dit_fast import ops

    B, Sq, Sk, heads, D = 2, 7, 11, 3, 16
    q, k, v = (torch.randn(B, S, heads, D, dtype=torch.float64, requires_grad=True) for S in (Sq, Sk, Sk))
    mask = torch.rand(B, heads, Sk) > 0.5
    mask[:, :, 0] = True
    mask[1, 1] = False  # no visible key in one head
    dout = torch.randn(B, Sq, heads, D, dtype=torch.float64)
    out, lse = ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend="torch")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for h in range(heads):
        one = [t[:, :, h:h + 1].detach().requires_grad_(True) for t in (q, k, v)]
        o, s = ops.attention(*one, key_padding_mask=mask[:, h], return_lse=True, backend="torch")
        torch.testing.assert_close(out[:, :, h:h + 1], o)
        torch.testing.assert_close(lse[:, h:h + 1], s)
        for g, w in zip(grads, torch.autograd.grad(o, one, dout[:, :, h:h + 1]), strict=True):
            torch.testing.assert_close(g[:, :, h:h + 1], w)
    assert (out[1, :, 1] == 0).all() and torch.isneginf(lse[1, 1]).all()


def test_backward_reference_merged_over_key_shards():
    """Ring attention's use: with the merged (out, lse) of two key shards, each shard's dk, dv are the full
    ones' slices and the shards' dq add up to the full dq."""
    q, k, v = (torch.randn(1, S, 2, 16, dtype=torch.float64) for S in (9, 13, 13))
    out, lse = attention_reference(q, k, v, return_lse=True)
    lse = _lse64(q, k, 0.25, None)
    dout = torch.randn_like(out)
    full = attention_backward_reference(q, k, v, out, lse, dout)
    parts = [attention_backward_reference(q, k[:, s], v[:, s], out, lse, dout) for s in (slice(0, 6), slice(6, 13))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full[0])
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]], 1), full[1])
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]], 1), full[2])


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_reference_masked_keys_never_leak(poison):
    """Non-finite keys and values behind the mask change nothing: outputs, lse and the gradients of every
    input equal the clean run's exactly; the masked keys' gradients are zero; a query that can see a
    poisoned key returns NaN."""
    grid = (2, 3, 4)
    S, heads, D = 24, 2, 16
    mask = spacetime_mask(grid, "spatial")  # (S, S): frame 1's keys are hidden from frame 0's queries
    q, k, v = (torch.randn(1, S, heads, D, dtype=torch.float64) for _ in range(3))
    dout = torch.randn_like(q)
    frame0, frame1 = slice(0, 12), slice(12, 24)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, 14, 1, 3] = poison
    v_bad[:, 20, 0] = poison

    def run(k, v):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = attention_reference(*leaves, mask=mask, return_lse=True)
        return (out, lse, *torch.autograd.grad(out[:, frame0], leaves, dout[:, frame0]))

    clean, dirty = run(k, v), run(k_bad, v_bad)
    for name, c, d in zip(("out", "lse", "dq", "dk", "dv"), clean, dirty, strict=True):
        part = (slice(None), slice(None), frame0) if name == "lse" else (slice(None), frame0)
        assert torch.equal(c[part], d[part]), name
    assert torch.equal(dirty[3][:, frame1], torch.zeros_like(dirty[3][:, frame1]))  # dk of hidden keys
    assert torch.equal(dirty[4][:, frame1], torch.zeros_like(dirty[4][:, frame1]))
    # frame 1's queries see the poison: NaN rows (head 1 for the key, head 0 for the value)
    assert dirty[0][:, frame1].isnan().all() and dirty[1][:, :, frame1].isnan().all()
