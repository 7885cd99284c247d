"""Standalone 3D RoPE: every kernel backend against the PyTorch reference, forward and gradient.

On CPU the Triton kernel runs in Triton's interpreter; the CUDA cases need a GPU and the extension.
"""

import math

import pytest
import torch

from dit_fast import ops
from dit_fast._backend import unavailable_reason
from dit_fast.ops import rope as R
from tests.conftest import HAS_GPU
from tests.utils import assert_close_to_reference

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRID = (3, 5, 7)  # S = 105: no token block is full


def kernel_backends():
    """Kernel backends with the reason each is skipped where it cannot run."""
    params = []
    for name in ("triton", "cuda"):
        reason = unavailable_reason(name, torch.device(DEVICE))
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


def check_rope(x, grid, backend, theta=10000.0, split=None):
    """Kernel vs the float64 reference, with PyTorch's own error in x.dtype (the reference run in
    that dtype: fp32 math, rounded once) as the yardstick; forward and the gradient of x."""
    dtype = x.dtype
    grad_out = torch.randn(x.shape, device=x.device, dtype=torch.float32)

    def run(fn, cast):
        leaf = x.detach().to(cast).requires_grad_(True)
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, grad_out.to(cast))
        return out, grad

    out_k, grad_k = run(lambda t: ops.apply_rope_3d(t, grid, theta=theta, split=split, backend=backend), dtype)
    out_n, grad_n = run(lambda t: R.apply_rope_3d_reference(t, grid, theta, split), dtype)
    out_r, grad_r = run(lambda t: R.apply_rope_3d_reference(t, grid, theta, split), torch.float64)
    assert out_k.dtype == dtype and grad_k.dtype == dtype
    assert out_k.is_contiguous()
    assert_close_to_reference("output", out_k, out_r, out_n)
    assert_close_to_reference("grad of x", grad_k, grad_r, grad_n)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B, heads, D, split", [
    (2, 3, 72, None),  # Open-Sora / Latte head dim, Wan split (24, 24, 24)
    (1, 2, 64, None),  # Wan split (24, 20, 20)
    (2, 1, 64, (16, 32, 16)),  # custom split
])
def test_matches_reference(backend, dtype, B, heads, D, split):
    x = torch.randn(B, math.prod(GRID), heads, D, device=DEVICE, dtype=dtype)
    check_rope(x, GRID, backend, split=split)


@pytest.mark.parametrize("backend", kernel_backends())
def test_theta_and_long_axes(backend):
    """Another base, and positions up to 40 (angles of tens of radians): the kernels' trig must be
    accurate there, not only near zero."""
    x = torch.randn(1, 2 * 3 * 41, 1, 24, device=DEVICE)
    check_rope(x, (2, 3, 41), backend, theta=500.0, split=(8, 8, 8))
    x = torch.randn(1, 41 * 2 * 2, 2, 24, device=DEVICE)
    check_rope(x, (41, 2, 2), backend, split=(8, 8, 8))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("layout", ["qkv_slice", "padded_head_dim", "odd_offset", "transposed_head_dim"])
def test_strided_inputs(backend, layout):
    """x read in place through its strides (a slice of a packed qkv, a padded head dim, a pointer
    one element off alignment), or copied when D itself is strided."""
    B, S, heads, D = 2, math.prod(GRID), 2, 72
    if layout == "qkv_slice":
        x = torch.randn(B, S, 3, heads, D, device=DEVICE)[:, :, 1]  # strides (S*3*h*D, 3*h*D, D, 1)
    elif layout == "padded_head_dim":
        x = torch.randn(B, S, heads, D + 2, device=DEVICE)[..., :D]  # even strides, not 16-byte multiples
    elif layout == "odd_offset":
        x = torch.randn(B * S * heads * D + 1, device=DEVICE)[1:].view(B, S, heads, D)
    else:
        x = torch.randn(B, S, heads, D, device=DEVICE).transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous() or layout == "odd_offset"
    check_rope(x, GRID, backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_is_inverse_rotation(backend):
    """R(-angle) R(angle) x == x: the backward op undoes the forward."""
    x = torch.randn(1, math.prod(GRID), 2, 72, device=DEVICE)
    out = torch.ops.dit_fast.rope_3d(x, list(GRID), 10000.0, [24, 24, 24], False, backend)
    back = torch.ops.dit_fast.rope_3d(out, list(GRID), 10000.0, [24, 24, 24], True, backend)
    torch.testing.assert_close(back, x, rtol=0, atol=2e-6)
    assert (out - x).abs().max() > 0.1  # it did rotate


def test_reference_convention():
    """The reference against the convention written out by hand for one token and pair per axis."""
    T, H, W = GRID
    D, theta = 72, 10000.0
    x = torch.randn(1, T * H * W, 1, D, dtype=torch.float64)
    out = R.apply_rope_3d_reference(x, GRID, theta)
    t, h, w = 2, 3, 6
    s = (t * H + h) * W + w
    for axis_start, pos, d_axis, i in ((0, t, 24, 5), (24, h, 24, 2), (48, w, 24, 11)):
        angle = pos * theta ** (-2 * i / d_axis)
        a, b = x[0, s, 0, axis_start + 2 * i], x[0, s, 0, axis_start + 2 * i + 1]
        torch.testing.assert_close(out[0, s, 0, axis_start + 2 * i], a * math.cos(angle) - b * math.sin(angle))
        torch.testing.assert_close(out[0, s, 0, axis_start + 2 * i + 1], a * math.sin(angle) + b * math.cos(angle))


def test_inv_freq_table_matches_angles():
    angles = R.rope_3d_angles(GRID, 72, 10000.0, None, dtype=torch.float64)
    positions = R.grid_positions(GRID).double()
    table = R.rope_inv_freq_reference(72, 10000.0).double()
    axis = torch.tensor([0] * 12 + [1] * 12 + [2] * 12)
    torch.testing.assert_close(positions[:, axis] * table, angles, rtol=1e-7, atol=0)


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    """torch.library's checks of the schema, fake kernel, autograd registration and dispatch."""
    x = torch.randn(2, math.prod(GRID), 2, 64, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.dit_fast.rope_3d.default, (x, list(GRID), 10000.0, [24, 20, 20], False, backend))


@pytest.mark.parametrize("backend", kernel_backends())
def test_torch_compile_fullgraph(backend):
    def f(q, k):
        return (ops.apply_rope_3d(q, GRID, backend=backend) * ops.apply_rope_3d(k, GRID, backend=backend)).sum(-1)

    torch._dynamo.reset()
    q, k = (torch.randn(1, math.prod(GRID), 2, 24, device=DEVICE, requires_grad=True) for _ in range(2))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out, expected = compiled(q, k), f(q, k)
    torch.testing.assert_close(out, expected)
    g = torch.autograd.grad(out.sum(), (q, k))
    g_ref = torch.autograd.grad(expected.sum(), (q, k))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_torch_backend_and_auto_on_cpu_are_the_reference():
    x = torch.randn(2, math.prod(GRID), 2, 72)
    ref = R.apply_rope_3d_reference(x, GRID)
    torch.testing.assert_close(ops.apply_rope_3d(x, GRID, backend="torch"), ref, rtol=0, atol=0)
    torch.testing.assert_close(ops.apply_rope_3d(x, GRID), ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_path_is_the_reference(dtype):
    """What "auto" runs on CPU (cached tables, blocks of 3 tokens here: the last one partial) equals the
    reference bitwise, forward and with autograd; its gradient is the reference's."""
    grid, D = (2, 3, 5), 24
    x = torch.randn(2, math.prod(grid), 3, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    block = 4 * 3 * D * 3
    with torch.no_grad():
        assert torch.equal(R.apply_rope_3d_cpu(x, grid, block_bytes=block), R.apply_rope_3d_reference(x, grid))
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = R.apply_rope_3d_cpu(a, grid, theta=500.0, block_bytes=block), R.apply_rope_3d_reference(b, grid, 500.0)
    assert torch.equal(out, ref)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert torch.equal(torch.autograd.grad(out, a, w)[0], torch.autograd.grad(ref, b, w)[0])


def test_cpu_path_tables_follow_every_argument():
    """The CPU path's cached cos / sin tables are keyed by grid, head dim, theta and split: the same grid and
    head dim with another theta or split (called back to back, so a stale table would be reused) is still
    the reference's rotation."""
    grid, D = (2, 3, 4), 24
    x = torch.randn(1, math.prod(grid), 2, D, generator=torch.Generator().manual_seed(6))
    for theta, split in ((10000.0, None), (10000.0, (12, 6, 6)), (10000.0, (4, 10, 10)), (50.0, (4, 10, 10)),
                         (50.0, None)):
        got = ops.apply_rope_3d(x, grid, theta=theta, split=split)
        assert torch.equal(got, R.apply_rope_3d_reference(x, grid, theta, split)), (theta, split)


# ---- bad input: clear errors naming the argument and the shapes ----


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_bad_inputs(backend):
    x = torch.randn(2, 105, 3, 72, device=DEVICE)

    def call(t=x, grid=GRID, **kw):
        return ops.apply_rope_3d(t, grid, backend=backend, **kw)

    cases = [
        (ValueError, r"x must be \(B, S, heads, D\).*\(105, 3, 72\)", lambda: call(x[0])),
        (ValueError, r"grid \(3, 5, 8\) has T \* H \* W = 120 tokens but x \(2, 105, 3, 72\) has S = 105", lambda: call(grid=(3, 5, 8))),
        (ValueError, r"grid must be a \(T, H, W\)", lambda: call(grid=(105,))),
        (ValueError, r"grid must be a \(T, H, W\)", lambda: call(grid=(3.0, 5, 7))),
        (ValueError, r"grid must be a \(T, H, W\)", lambda: call(grid=None)),
        (ValueError, r"odd head dim D = 71", lambda: call(x[..., :71])),
        (ValueError, r"rope split must be three even sizes summing to head_dim=72, got \(24, 24, 20\)", lambda: call(split=(24, 24, 20))),
        (ValueError, r"rope split .* got \(25, 23, 24\)", lambda: call(split=(25, 23, 24))),
        (ValueError, r"theta must be a positive", lambda: call(theta=0.0)),
        (TypeError, r"x must be float32, float16 or bfloat16, got torch.float64", lambda: call(x.double())),
        (TypeError, r"x must be a torch.Tensor", lambda: call([1.0])),
        (ValueError, r"unknown backend", lambda: ops.apply_rope_3d(x, GRID, backend="fast")),
    ]
    for exc, pattern, fn in cases:
        with pytest.raises(exc, match=pattern):
            fn()


@pytest.mark.parametrize("backend", kernel_backends())
def test_too_wide_head_dim_rejected_by_kernels(backend):
    D = R.MAX_HEAD_DIM + 2
    x = torch.randn(1, 1, 1, D, device=DEVICE)
    with pytest.raises(ValueError, match=f"head dim D = {D}"):
        ops.apply_rope_3d(x, (1, 1, 1), backend=backend)
    ops.apply_rope_3d(x, (1, 1, 1), backend="torch")  # the reference has no such limit


# ---- GPU only: large shapes and 64-bit offsets ----


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_video_shape(backend, dtype):
    """CogVideoX-like: 13 x 30 x 45 tokens, 48 heads of 64; Wan-like D = 128."""
    for grid, heads, D in (((13, 30, 45), 48, 64), ((21, 30, 52), 12, 128)):
        x = torch.randn(1, math.prod(grid), heads, D, device="cuda", dtype=dtype)
        check_rope(x, grid, backend)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", kernel_backends())
def test_offsets_past_2_31_elements(backend):
    """B * S * heads * D > 2^31: the last tokens are rotated like the first (64-bit indexing)."""
    grid, heads, D = (16, 64, 128), 136, 128
    S = math.prod(grid)
    assert S * heads * D > 2**31
    x = torch.randn(1, S, heads, D, device="cuda", dtype=torch.float16)
    out = ops.apply_rope_3d(x, grid, backend=backend)
    angles = R.rope_3d_angles(grid, D, device="cuda")  # (S, D / 2)
    for tokens in (slice(0, 64), slice(S - 64, S)):
        cos, sin = angles[tokens].cos()[:, None], angles[tokens].sin()[:, None]
        pairs = x[0, tokens].float().reshape(-1, heads, D // 2, 2)
        want = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos], -1)
        torch.testing.assert_close(out[0, tokens].float(), want.reshape(-1, heads, D), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(HAS_GPU, reason="on a GPU every test above compiles and runs the kernel for real")
def test_triton_kernel_compiles_for_sm90():
    """The interpreter never takes the GPU branch (libdevice sin/cos): compile it for an H100 here."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dit_fast.triton_kernels import rope as kernels

    fn = kernels._rope_3d_kernel
    fn = triton.JITFunction(getattr(fn, "fn", fn))  # under TRITON_INTERPRET the decorator wrapped it
    signature = {"X_ptr": "*bf16", "OUT_ptr": "*bf16", "INV_FREQ_ptr": "*fp32", "S": "i32", "HEADS": "i32",
                 "D": "constexpr", "H": "i32", "W": "i32", "stride_xb": "i64", "stride_xs": "i32",
                 "stride_xh": "i32", "PAIRS_T": "i32", "PAIRS_TH": "i32", "HEADS_PER_PROGRAM": "i32",
                 "INVERSE": "constexpr", "ACCURATE_TRIG": "constexpr", "BLOCK_S": "constexpr",
                 "BLOCK_D": "constexpr", "ALIGNED": "constexpr"}
    # D = 72 (Open-Sora, Latte): a head stride of 72 is not a multiple of 16 elements, so only the
    # launcher's ALIGNED hint lets Triton use 16-byte vectors; pointers as a launch marks them
    constexprs = {"D": 72, "INVERSE": True, "ACCURATE_TRIG": True, "BLOCK_S": 32, "BLOCK_D": 128, "ALIGNED": True}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in ("X_ptr", "OUT_ptr", "INV_FREQ_ptr")}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"]
    assert "sin.approx" not in ptx and "cos.approx" not in ptx  # accurate trig: angles reach hundreds of radians
    # x read and written in 16-byte vectors: the pairs are swapped in registers, not reloaded one by one
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx
    assert "ld.global.b16" not in ptx and "ld.global.u16" not in ptx, "2-byte loads of x"


def test_aligned_hint_only_when_checked():
    """The Triton kernel promises 16-byte alignment (ALIGNED) only for what the launcher checked."""
    from dit_fast.triton_kernels._layout import aligned_16

    def _aligned_16(x, head_dim):  # what the RoPE launcher asks for its one input
        return aligned_16([x], head_dim)

    packed = torch.randn(2, 6, 3, 5, 72, dtype=torch.bfloat16)  # a fused qkv projection's output
    assert _aligned_16(packed[:, :, 1], 72)  # strides 3*5*72, 72: multiples of 16 bytes
    assert not _aligned_16(torch.randn(2 * 6 * 5 * 72 + 1, dtype=torch.bfloat16)[1:].view(2, 6, 5, 72), 72)
    assert not _aligned_16(torch.randn(2, 6, 5, 76, dtype=torch.bfloat16)[..., :36], 36)  # 72-byte rows
