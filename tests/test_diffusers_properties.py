"""Property-based tests (hypothesis) of the diffusers "dit_fast" backend's masks (tests/test_properties.py's style).

For any mask SDPA takes (bool or float, any shape that broadcasts to (B, heads, Sq, Sk), (B, Sk) read as a key
padding mask as diffusers' native backend reads it; key padding, per head, per query, additive biases, rows
with no visible key), the backend's result is SDPA's on that mask: on our kernel when the mask is a key padding
mask, on diffusers' native attention otherwise: never a silently different result. torch.compile gives the
eager result (a few examples: each traces anew). A mask no path takes raises TypeError / ValueError naming
attn_mask, never anything else.

Derandomized (the same examples on every run); tiny sizes, dit_fast's torch path: seconds.
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install -e '.[test]')")

import dit_fast  # noqa: E402
import dit_fast.integrations.diffusers as dd  # noqa: E402

PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
B, HEADS, D = 2, 2, 8


def _sdpa(q, k, v, mask):
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    return out.transpose(1, 2)


@st.composite
def masked_calls(draw):
    """(q, k, v, attn_mask, the mask as SDPA reads it): a mask of a broadcastable shape, bool or fp32 (0 / -10000 /
    -inf padding, 0 / -2: a bias that looks like padding, or biases), drawn by what it varies over: keys only
    ((B, Sk), (B | 1, 1, 1, Sk)), heads ((B, heads, 1, Sk)), queries ((B | 1, heads | 1, Sq, Sk), (Sq, Sk))."""
    structure = draw(st.sampled_from(["(B, Sk)", "keys", "heads", "queries", "(Sq, Sk)"]))
    sq = draw(st.integers(2 if structure in ("queries", "(Sq, Sk)") else 1, 6))
    sk = draw(st.integers(1, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    q, k, v = (torch.randn(B, s, HEADS, D, generator=g) for s in (sq, sk, sk))
    shape = {"(B, Sk)": (B, sk), "(Sq, Sk)": (sq, sk), "keys": (draw(st.sampled_from([1, B])), 1, 1, sk),
             "heads": (draw(st.sampled_from([1, B])), HEADS, 1, sk),
             "queries": (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, HEADS])), sq, sk)}[structure]
    keep = torch.rand(shape, generator=g) < draw(st.sampled_from([0.3, 0.7, 1.0]))
    kind = draw(st.sampled_from(["bool", "-10000", "-inf", "-2", "biases"]))
    if kind == "bool":
        mask = keep
    elif kind == "biases":
        mask = torch.randn(shape, generator=g)
    else:
        mask = torch.where(keep, 0.0, float(kind))
    # diffusers' rule: a 2-D mask of shape (B, Sk) is a key padding mask, also when it was drawn as (Sq, Sk), Sq = B
    sdpa_mask = mask[:, None, None, :] if tuple(mask.shape) == (B, sk) else mask
    return q, k, v, mask, sdpa_mask


def _quiet():
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)  # the native fallbacks' warnings: what runs is checked here
    return context


@settings(PROPERTY, max_examples=60)
@given(case=masked_calls())
def test_backend_is_sdpa_on_any_mask_sdpa_takes(case):
    q, k, v, mask, sdpa_mask = case
    context = _quiet()
    try:
        with dit_fast.use_backend("torch"):
            out = dd.dit_fast_attention(q, k, v, attn_mask=mask)
    finally:
        context.__exit__(None, None, None)
    want = _sdpa(q, k, v, sdpa_mask)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@settings(PROPERTY, max_examples=6, phases=[Phase.generate])  # no shrinking: each example traces anew (seconds)
@given(case=masked_calls())
def test_backend_compiled_is_eager(case):
    q, k, v, mask, _ = case
    context = _quiet()
    try:
        with dit_fast.use_backend("torch"):
            eager = dd.dit_fast_attention(q, k, v, attn_mask=mask)
            torch._dynamo.reset()
            compiled = torch.compile(dd.dit_fast_attention, fullgraph=True, backend="eager")(q, k, v, attn_mask=mask)
    finally:
        torch._dynamo.reset()
        context.__exit__(None, None, None)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0, equal_nan=True)


@st.composite
def bad_masks(draw):
    sq, sk = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    q, k, v = (torch.randn(B, s, HEADS, D) for s in (sq, sk, sk))
    bad = draw(st.sampled_from(["dtype", "float dtype", "shape", "rank"]))
    if bad == "dtype":
        mask = torch.ones(B, sk, dtype=draw(st.sampled_from([torch.int32, torch.int64, torch.uint8])))
    elif bad == "float dtype":
        mask = torch.zeros(B, sk, dtype=draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16])))
    elif bad == "shape":  # one dimension neither 1 nor full
        dims = [B, HEADS, sq, sk]
        i = draw(st.integers(0, 3))
        dims[i] += draw(st.integers(1, 3))
        mask = torch.ones(dims, dtype=torch.bool)
    else:
        mask = torch.ones(*([1] * draw(st.sampled_from([0, 5]))), sk, dtype=torch.bool)[..., :sk]
        mask = mask if mask.dim() != 2 else mask[0]  # 1-D (Sk,) or 6-D
    return q, k, v, mask


@settings(PROPERTY, max_examples=40)
@given(case=bad_masks())
def test_backend_refuses_what_no_path_takes_naming_attn_mask(case):
    q, k, v, mask = case
    with dit_fast.use_backend("torch"), pytest.raises((TypeError, ValueError), match="attn_mask"):
        dd.dit_fast_attention(q, k, v, attn_mask=mask)
