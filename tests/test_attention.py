"""Attention kernels against the SDPA reference: every mode, every head dim, forward and dq/dk/dv.

On CPU the Triton kernels run in the interpreter (tests/conftest.py: one 16 x 16 tile configuration),
so the shapes are tiny and odd: a (2, 3, 5) grid (a full and a partial tile, frames of 15 tokens,
columns of 2), head dims 1 to 256 (72 = 64 + 16 with 8 masked, 80, 96, 40: two chunks of the head
dim; 1, 3, 8, 10, 12, 20 inside one 16-column chunk; 36, 100, 200 not multiples of 8), Sq != Sk,
padding masks with NaN behind them. Every kernel run is counted (tests/launches.py): the forward,
the backward's preprocess, dk/dv and dq kernels, or the one-pass backward's convert kernel, each
launched once, or the test fails. Each mode runs in a couple of head dims and
dtypes, each head dim in one mode and dtype (not the full cross product: the interpreter is slow),
and every mode runs both backwards: the deterministic two-kernel one and the one-pass one with dq by
atomic adds. The GPU tests at the end add large shapes, every head dim and offsets past 2^31 elements.
Windows: tests/test_attention_windows.py; masked NaN: tests/test_attention_masking.py; the TMA forward,
head-dim chunks, strided views, int64 offsets and the ALIGNED hint: tests/test_attention_layout.py; the
sm_90a compile checks: tests/test_attention_compile.py; the references alone: tests/test_attention_reference.py.
"""

import pytest
import torch

from dit_fast import nn as dnn
from dit_fast import ops
from dit_fast.ops.flash_attention import spacetime_attention_reference
from dit_fast.ops.rope import RoPE3D
from tests.conftest import HAS_GPU, kernel_devices
from tests.launches import count_launches
from tests.utils import ATOL_FLOOR, assert_close_to_reference

DEVICE = kernel_devices()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
F32, F16, BF16 = DTYPES


def _qkv(B, Sq, Sk, heads, D, dtype, device=DEVICE):
    return [torch.randn(B, S, heads, D, device=device, dtype=dtype) for S in (Sq, Sk, Sk)]


def _run(fn, inputs, dout, backend):
    """fn(q, k, v, backend) -> (out, lse); returns out, lse and the grads of q, k, v for dout."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = fn(*leaves, backend)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out, lse, *grads]


def attention_kernels(deterministic=None):
    """{kernel: launches} of one forward and one backward on the Triton kernels: the forward, the
    preprocess (delta), dk/dv, and dq (two-kernel backward) or the fp32 dq's convert kernel (one-pass)."""
    from dit_fast.triton_kernels.attention import deterministic_backward

    last = "_attn_bwd_dq_kernel" if deterministic_backward(deterministic) else "_attn_bwd_dq_convert_kernel"
    return {"_attn_fwd_kernel": 1, "_attn_bwd_preprocess_kernel": 1, "_attn_bwd_dkdv_kernel": 1, last: 1}


def attention_launches(launches):
    """The attention kernels among counted launches (others, e.g. a RoPE pass, left out)."""
    return {name: n for name, n in launches.items() if name.startswith("_attn")}


def assert_kernels_ran(launches, deterministic=None, backward=True, calls=1):
    """The attention kernels of `calls` forwards (and backwards) ran, each once per call: exactly that
    in the interpreter; on a GPU at least (a cold autotuner also launches each configuration it times)."""
    want = attention_kernels(deterministic) if backward else {"_attn_fwd_kernel": 1}
    want = {name: calls for name in want}
    got = attention_launches(launches)
    if HAS_GPU:
        assert all(got.get(name, 0) >= n for name, n in want.items()), dict(launches)
    else:
        assert got == want, dict(launches)


def _check_against_reference(fn, inputs, dtype, factor=2.0, deterministic=None):
    """Kernel in `dtype` vs the reference in fp64, with the reference in `dtype` as PyTorch's own error.
    The kernel run must launch exactly the forward and the backward that `deterministic` names."""
    inputs = [t.to(dtype) for t in inputs]
    dout = torch.randn_like(inputs[0], dtype=torch.float32)
    ref64 = _run(fn, [t.double() for t in inputs], dout.double(), "torch")
    ref_dtype = _run(fn, inputs, dout, "torch")
    with count_launches() as launches:
        got = _run(fn, inputs, dout, "triton")
    assert_kernels_ran(launches, deterministic)
    for name, g, r64, rd in zip(("out", "lse", "dq", "dk", "dv"), got, ref64, ref_dtype, strict=True):
        if name == "lse":
            # rows with no visible key: -inf in both; the rest compared as fp32 values
            empty = r64.isinf()
            assert torch.equal(g.isinf() & (g < 0), empty), "lse: -inf rows differ from the reference"
            g, r64, rd = g[~empty], r64[~empty], rd[~empty]
            assert_close_to_reference(name, g, r64, rd, factor, dtype=torch.float32)
        else:
            assert_close_to_reference(name, g, r64, rd, factor, dtype=dtype)
    return got


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


# ---- every mode, every head dim --------------------------------------------------------------------

GRID = (2, 3, 5)  # S = 30: a full and a partial 16-token tile; frames of 15 tokens, columns of 2
MODES = {  # name -> (grid, spacetime_attention kwargs); "cross": attention() with Sq != Sk and padding
    "full": (GRID, {}),
    "spatial": (GRID, dict(mode="spatial")),
    "temporal": ((5, 2, 2), dict(mode="temporal")),  # columns of 5 frames
    "window": (GRID, dict(window=(2, 2, 3))),
    # (2, 5, 6) in (1, 4, 4) tiles: a 2 x 2 x 2 tile grid with partial edge tiles; the window is 1 x 1 x 2 tiles
    "window_tile": ((2, 5, 6), dict(window=(1, 4, 8), window_tile=(1, 4, 4))),
    # 32-token tiles, two blocks each: (2, 5, 4) in (2, 4, 4) is 1 x 2 x 1 tiles, window 1 x 1 x 1 tiles
    "window_tile_32": ((2, 5, 4), dict(window=(2, 4, 4), window_tile=(2, 4, 4))),
    "rope": (GRID, dict(rope="3d")),  # one rotation pass over q and k (apply_rope_3d), then the kernels
    "rope_in_kernel": (GRID, dict(rope="3d", rope_in_kernel=True)),
    "rope_temporal_in_kernel": ((5, 2, 2), dict(mode="temporal", rope=RoPE3D(theta=500.0, split=(8, 32, 32)),
                                                rope_in_kernel=True)),
    "rope_window_in_kernel": (GRID, dict(window=(2, 3, 3), rope=RoPE3D(theta=100.0), rope_in_kernel=True)),
    "rope_tile_in_kernel": ((2, 5, 6), dict(window=(1, 4, 8), window_tile=(1, 4, 4), rope="3d", rope_in_kernel=True)),
    "cross": None,
}

# (mode, D, dtype, deterministic backward). Each head dim in one mode and dtype, each mode in a couple of
# head dims and dtypes, each with both backwards somewhere: not the full cross product.
CASES = [
    ("full", 40, F16, True), ("full", 64, F32, False), ("full", 72, BF16, True), ("full", 80, F32, True),
    ("full", 96, BF16, False), ("full", 128, F16, False), ("full", 256, F32, True),
    ("spatial", 72, BF16, True), ("spatial", 40, F32, False),
    ("temporal", 72, F16, False), ("temporal", 96, F32, True),
    ("window", 72, F32, True), ("window", 40, BF16, False),
    ("window_tile", 72, BF16, True), ("window_tile", 80, F32, False), ("window_tile_32", 64, F16, True),
    ("rope", 64, BF16, True),
    ("rope_in_kernel", 72, F32, False), ("rope_in_kernel", 40, BF16, True),
    ("rope_temporal_in_kernel", 72, BF16, False), ("rope_window_in_kernel", 64, F16, True),
    ("rope_tile_in_kernel", 72, F32, True),
    ("cross", 72, BF16, True), ("cross", 40, F32, False), ("cross", 96, F16, True), ("cross", 256, BF16, False),
    # any head dim 1..256: below 16 inside one 16-column chunk, and not multiples of 8 (rows not 16-byte
    # aligned in 16-bit dtypes: no ALIGNED hint); every dtype at D = 10, both backwards, every mode
    ("full", 1, F32, True), ("full", 3, F16, False), ("spatial", 8, BF16, False), ("temporal", 10, F16, True),
    ("window", 10, BF16, False), ("window_tile", 12, F16, True), ("rope_in_kernel", 10, F32, False),
    ("cross", 10, BF16, True), ("cross", 3, F32, False), ("full", 20, BF16, False), ("spatial", 36, F16, False),
    ("temporal", 100, BF16, True), ("full", 200, F16, False),
]


def _case_id(case):
    mode, D, dtype, deterministic = case
    return f"{mode}-D{D}-{str(dtype).split('.')[-1]}-{'det' if deterministic else 'atomic'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attention_matches_reference(case):
    mode, D, dtype, deterministic = case
    if MODES[mode] is None:  # cross attention, Sq != Sk, a padding mask with NaN behind it, an empty sample
        B, Sq, Sk = 2, 20, 29
        mask = torch.rand(B, Sk, device=DEVICE) > 0.4
        mask[0, :3] = True
        mask[1] = False  # sample 1 has no text at all: its queries return zeros, never NaN
        q, k, v = _qkv(B, Sq, Sk, 1, D, torch.float32)
        k[~mask], v[~mask] = float("nan"), float("inf")  # masked keys must not reach anything

        def fn(q, k, v, backend):
            return ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend=backend,
                                 deterministic=deterministic)

        out, lse, dq, dk, dv = _check_against_reference(fn, (q, k, v), dtype, deterministic=deterministic)
        assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
        assert (dk[~mask] == 0).all() and (dv[~mask] == 0).all()
        assert torch.isneginf(lse[1]).all()
        return
    grid, kwargs = MODES[mode]
    S = grid[0] * grid[1] * grid[2]
    heads = 2 if (mode, D) == ("full", 72) else 1  # one case with two heads: the head stride

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, grid, return_lse=True, backend=backend, deterministic=deterministic,
                                       **kwargs)

    _check_against_reference(fn, _qkv(1, S, S, heads, D, torch.float32), dtype, deterministic=deterministic)


def test_cross_attention_without_mask_and_custom_scale():
    inputs = _qkv(1, 20, 45, 1, 128, torch.float32)

    def fn(q, k, v, backend):
        return ops.attention(q, k, v, scale=0.3, return_lse=True, backend=backend)

    _check_against_reference(fn, inputs, torch.float32)


# ---- per-head key padding masks (B, heads, Sk): the same kernels, the mask's head stride ------------

PER_HEAD_CASES = [(72, F32, True), (72, BF16, False), (64, BF16, True), (64, F32, False)]


@pytest.mark.parametrize("D,dtype,deterministic", PER_HEAD_CASES,
                         ids=lambda x: {True: "det", False: "atomic"}.get(x, str(x).split(".")[-1]))
def test_per_head_key_padding_mask_matches_reference(D, dtype, deterministic):
    """A different mask in each of 3 heads, Sq = 20 != Sk = 29 (partial 16-token tiles), NaN / inf in
    every key and value row its own head masks, sample 0's head 1 with no visible key: forward, lse and
    dq / dk / dv against the reference, both backwards."""
    B, Sq, Sk, heads = 2, 20, 29, 3
    mask = torch.rand(B, heads, Sk, device=DEVICE) > 0.5
    mask[:, :, 0] = True
    mask[1, 2] = ~mask[1, 0]  # sample 1: head 2 sees exactly the keys head 0 does not
    mask[1, 2, Sk - 1] = True
    mask[0, 1] = False  # sample 0, head 1: no visible key: zeros, lse -inf, zero gradients
    hidden = ~mask.transpose(1, 2)  # (B, Sk, heads)
    q, k, v = _qkv(B, Sq, Sk, heads, D, torch.float32)
    k[hidden], v[hidden] = float("nan"), float("inf")  # each head's masked keys must not reach anything

    def fn(q, k, v, backend):
        return ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend=backend,
                             deterministic=deterministic)

    out, lse, dq, dk, dv = _check_against_reference(fn, (q, k, v), dtype, deterministic=deterministic)
    assert (out[0, :, 1] == 0).all() and (dq[0, :, 1] == 0).all() and torch.isneginf(lse[0, 1]).all()
    assert (dk[hidden] == 0).all() and (dv[hidden] == 0).all()
    assert lse[0, 0].isfinite().all() and lse[0, 2].isfinite().all()


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_backward_reproducibility(deterministic):
    """The deterministic backward gives bitwise the same gradients on every run (the trainer's exact
    resume relies on it); the one-pass one matches it within fp32 rounding (on a GPU the order of its
    atomic adds varies; the interpreter runs programs in order)."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 30, 30, 1, 72, torch.float32))
    dout = torch.randn_like(q)

    def grads(det):
        with count_launches() as launches:
            out = ops.spacetime_attention(q, k, v, GRID, mode="spatial", backend="triton", deterministic=det)
            result = torch.autograd.grad(out, (q, k, v), dout)
        assert_kernels_ran(launches, det)
        return result

    first = grads(deterministic)
    again = grads(deterministic) if deterministic else grads(True)
    for a, b in zip(first, again, strict=True):
        if deterministic:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backward_choice_from_the_environment(monkeypatch):
    """$DIT_FAST_ATTENTION_BWD picks the backward when the call does not; a bad value is a clear error."""
    from dit_fast.triton_kernels.attention import deterministic_backward

    monkeypatch.delenv("DIT_FAST_ATTENTION_BWD", raising=False)
    assert deterministic_backward(None) is True  # opt-in until a GPU run passes
    monkeypatch.setenv("DIT_FAST_ATTENTION_BWD", "atomic")
    assert deterministic_backward(None) is False and deterministic_backward(True) is True
    monkeypatch.setenv("DIT_FAST_ATTENTION_BWD", "fast")
    with pytest.raises(ValueError, match="DIT_FAST_ATTENTION_BWD must be 'atomic' or 'deterministic'"):
        deterministic_backward(None)


# ---- modules ------------------------------------------------------------------------------------


def test_spacetime_attention_module_matches_reference_backend():
    torch.manual_seed(1)
    module = dnn.SpacetimeAttention(128, 2, qk_norm=True, mode="spatial", rope="3d", backend="triton").to(DEVICE)
    x = torch.randn(1, 30, 128, device=DEVICE, requires_grad=True)
    with count_launches() as launches:
        y = module(x, GRID)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
    assert_kernels_ran(launches)
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
    with count_launches() as launches:
        got = module(x.to(DEVICE), (2, 2, 3)).cpu()
    assert_kernels_ran(launches, backward=False)
    assert_close_to_reference("timm attention", got, want.double(), want, dtype=torch.float32)


def test_cross_attention_module_with_context_mask():
    module = dnn.CrossAttention(128, 48, 2, backend="triton").to(DEVICE)
    x, ctx = torch.randn(2, 21, 128, device=DEVICE), torch.randn(2, 13, 48, device=DEVICE)
    mask = torch.ones(2, 13, dtype=torch.bool, device=DEVICE)
    mask[1, 5:] = False
    with count_launches() as launches:
        got = module(x, ctx, mask)
    assert_kernels_ran(launches, backward=False)
    module.backend = "torch"
    want = module(x, ctx, mask)
    # the padded context rows must not matter: truncating them gives the same output for sample 1
    trunc = module(x[1:], ctx[1:, :5])
    assert_close_to_reference("cross module", got, want.double(), want, dtype=torch.float32)
    assert_close_to_reference("cross module truncated", got[1:], trunc.double(), trunc, dtype=torch.float32)


# ---- registration, compile ----------------------------------------------------------------------


def test_opcheck_forward_and_backward():
    with count_launches() as launches:
        _opcheck_attention_ops()
    got = attention_launches(launches)  # opcheck runs each op several times: every kernel at least once
    assert set(got) == set(attention_kernels(True)) | set(attention_kernels(False)), dict(launches)


def _opcheck_attention_ops():
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
    # the kernel options: the one-pass backward, through the forward op's autograd and the backward op
    torch.library.opcheck(torch.ops.dit_fast.attention_fwd.default, fwd_args + (False, None))
    torch.library.opcheck(torch.ops.dit_fast.attention_bwd.default, bwd_args + (False,))
    # a per-head key padding mask (B, heads, Sk), cross attention
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 9, 12, 2, 16, torch.float32))
    head_mask = torch.tensor([[[True] * 10 + [False] * 2, [False] * 3 + [True] * 9]], device=DEVICE)
    head_args = (q, k, v, head_mask, [], "full", [], [], 0.0, [], 0.25, "triton")
    torch.library.opcheck(torch.ops.dit_fast.attention_fwd.default, head_args)
    out, lse = torch.ops.dit_fast.attention_fwd(*head_args)
    torch.library.opcheck(torch.ops.dit_fast.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, head_mask,
                           [], "full", [], [], 0.0, [], 0.25, "triton"))


def test_torch_compile_fullgraph_module():
    module = dnn.SpacetimeAttention(32, 2, mode="temporal", rope="3d", backend="triton").to(DEVICE)
    x = torch.randn(1, 12, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with count_launches() as launches:
        y = compiled(x, (3, 2, 2))
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert_kernels_ran(launches)  # the compiled graph runs our kernels, not a traced-out fallback
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
    grid = (3, 5, 7)
    st = ops.spacetime_attention
    _bad(ValueError, r"grid \(3, 5, 6\) has 90 tokens .* S = 105", lambda: st(q, k, v, (3, 5, 6)))
    _bad(ValueError, "grid must be three positive ints", lambda: st(q, k, v, (105,)))
    _bad(ValueError, r"window \(4, 1, 1\) is larger than the grid \(3, 5, 7\)",
         lambda: st(q, k, v, grid, window=(4, 1, 1)))
    _bad(ValueError, "window needs mode='full'", lambda: st(q, k, v, grid, mode="spatial", window=(1, 3, 3)))
    _bad(ValueError, "mode must be one of", lambda: st(q, k, v, grid, mode="diagonal"))
    _bad(ValueError, "rope must be None", lambda: st(q, k, v, grid, rope="2d"))
    _bad(TypeError, "rope_in_kernel must be True or False", lambda: st(q, k, v, grid, rope="3d", rope_in_kernel="yes"))
    _bad(ValueError, "rope split", lambda: st(q, k, v, grid, rope=RoPE3D(split=(10, 30, 30))))
    _bad(ValueError, "self-attention", lambda: st(q, k[:, :50], v[:, :50], grid))
    _bad(ValueError, "mismatched batch, heads or head dim",
         lambda: ops.attention(q, k[:, :, :1], v[:, :, :1]))
    _bad(ValueError, "v must have the shape of k", lambda: ops.attention(q, k, v[:, :100]))
    _bad(TypeError, "k has dtype torch.float16 but q has torch.float32", lambda: ops.attention(q, k.half(), v))
    _bad(TypeError, "must be float32, float16 or bfloat16",
         lambda: ops.attention(q.double(), k.double(), v.double(), backend="triton"))
    _bad(TypeError, "must be float32, float16 or bfloat16", lambda: ops.attention(q.int(), k, v))
    _bad(ValueError, r"must be \(B, S, heads, D\)", lambda: ops.attention(q[0], k, v))
    _bad(ValueError, "scale must be a positive", lambda: ops.attention(q, k, v, scale=-1.0))
    for D in (0, 257, 264):
        qd, kd, vd = _qkv(1, 8, 8, 1, D, torch.float32)
        _bad(ValueError, rf"head dim D = {D} .* is not supported: D must be in \[1, 256\]",
             lambda qd=qd, kd=kd, vd=vd: ops.attention(qd, kd, vd))
    qd, kd, vd = _qkv(1, 105, 105, 1, 9, torch.float32)  # RoPE rotates pairs: an odd head dim cannot take it
    _bad(ValueError, "the head dim must be even, got D = 9", lambda: st(qd, kd, vd, grid, rope="3d"))
    _bad(ValueError, "the head dim must be even, got D = 9",
         lambda: st(qd, kd, vd, grid, rope="3d", rope_in_kernel=True, backend="triton"))
    mask = torch.ones(1, 105, dtype=torch.bool, device=DEVICE)
    _bad(ValueError, r"key_padding_mask must be \(B, Sk\) = \(1, 105\)",
         lambda: ops.attention(q, k, v, key_padding_mask=mask[:, :50]))
    _bad(TypeError, "key_padding_mask must be a bool tensor",
         lambda: ops.attention(q, k, v, key_padding_mask=mask.float()))
    _bad(ValueError, r"or per head \(B, heads, Sk\) = \(1, 2, 105\) .* got \(1, 3, 105\)",
         lambda: ops.attention(q, k, v, key_padding_mask=mask[:, None].expand(1, 3, 105)))
    _bad(ValueError, "unknown backend", lambda: ops.attention(q, k, v, backend="cudnn"))
    _bad(TypeError, "deterministic must be True, False or None", lambda: ops.attention(q, k, v, deterministic=1))
    _bad(TypeError, "tma must be True, False or None", lambda: st(q, k, v, grid, tma="yes"))


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v = _qkv(1, 12, 12, 1, 16, torch.float32, device="cpu")
    got = ops.spacetime_attention(q, k, v, (1, 3, 4), mode="spatial")
    want = spacetime_attention_reference(q, k, v, (1, 3, 4), mode="spatial")
    assert torch.equal(got, want)


# ---- GPU: large shapes, every head dim, bf16, 64-bit offsets ------------------------------------

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


# (mode, D, kernel variant): "" the defaults, "atomic" the one-pass backward, "tma" the Hopper forward
GPU_CASES = [("full", 40, ""), ("full", 64, ""), ("full", 72, ""), ("full", 80, ""), ("full", 96, ""),
             ("full", 128, ""), ("full", 256, ""), ("spatial", 72, ""), ("temporal", 72, ""), ("window", 128, ""),
             ("rope", 72, ""), ("rope", 128, ""), ("rope_window", 64, ""), ("rope_in_kernel", 128, ""),
             ("rope_window_in_kernel", 64, ""), ("tile_window", 128, ""), ("tile_window", 72, ""),
             ("rope_tile_window", 64, ""),
             ("full", 128, "atomic"), ("full", 72, "atomic"), ("spatial", 72, "atomic"), ("temporal", 72, "atomic"),
             ("window", 128, "atomic"), ("tile_window", 72, "atomic"), ("rope_in_kernel", 128, "atomic"),
             ("full", 128, "tma"), ("full", 72, "tma"), ("spatial", 72, "tma"), ("temporal", 72, "tma"),
             ("window", 128, "tma"),
             # head dims below 16 and not multiples of 8: 10 and 12 without the ALIGNED hint, 8 and 24 with
             # it (and TMA); the compiled kernels load no misaligned vector
             ("full", 10, ""), ("window", 10, ""), ("full", 12, "atomic"), ("temporal", 24, ""),
             ("spatial", 8, "tma"), ("full", 24, "tma"), ("rope_in_kernel", 10, "atomic"), ("full", 200, "")]


@gpu
@pytest.mark.parametrize("case,D,variant", GPU_CASES)
def test_gpu_large_shapes(case, D, variant):
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

    options = {"atomic": dict(deterministic=False), "tma": dict(tma=True)}.get(variant, {})

    def fn(q, k, v, backend):
        return ops.spacetime_attention(q, k, v, grid, return_lse=True, backend=backend, **options, **kwargs)

    _check_against_reference(fn, inputs, torch.bfloat16, deterministic=options.get("deterministic"))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_gpu_cross_attention_text_lengths(dtype, deterministic):
    inputs = _qkv(3, 4096, 512, 8, 128, torch.float32)
    mask = torch.arange(512, device=DEVICE)[None, :] < torch.tensor([512, 77, 0], device=DEVICE)[:, None]

    def fn(q, k, v, backend):
        return ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend=backend,
                             deterministic=deterministic)

    _check_against_reference(fn, inputs, dtype, deterministic=deterministic)


@gpu
def test_gpu_offsets_past_2_31_elements():
    """Token offsets * strides pass 2^31 elements: the last frames must still be indexed correctly."""
    T, H, W, heads, D = 16400, 8, 16, 16, 64  # B * S * heads * D = 2.15e9 > 2^31
    S = T * H * W
    q, k, v = (torch.randn(1, S, heads, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with count_launches() as launches:
        out = ops.spacetime_attention(q, k, v, (T, H, W), mode="spatial", backend="triton")
    assert_kernels_ran(launches, backward=False)
    tail = slice((T - 3) * H * W, S)  # spatial attention: the last three frames are independent
    want = ops.spacetime_attention(q[:, tail].double(), k[:, tail].double(), v[:, tail].double(), (3, H, W),
                                   mode="spatial", backend="torch")
    got = out[:, tail]
    err = (got.double() - want).abs().max().item()
    assert err <= ATOL_FLOOR[torch.bfloat16] * max(1.0, want.abs().max().item()), f"max err {err}"
