"""3D patchify / unpatchify: every kernel backend against the PyTorch reference, forward and gradient.

Both ops are permutations, so kernels must match the reference bit for bit in every dtype. On CPU
the Triton kernel runs in Triton's interpreter; the CUDA cases need a GPU and the extension.
"""

import pytest
import torch
import torch.nn.functional as F

from dit_fast import ops
from dit_fast._backend import unavailable_reason
from dit_fast.ops import patchify as P
from tests.conftest import HAS_GPU

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (video shape (B, C, T, H, W), patch): token grids (3, 5, 7), K = 12 and 40, no block full
CASES = [((2, 3, 3, 10, 14), (1, 2, 2)), ((1, 5, 6, 10, 14), (2, 2, 2))]
CASE_IDS = ["patch122", "patch222"]


def kernel_backends():
    """Kernel backends with the reason each is skipped where it cannot run."""
    params = []
    for name in ("triton", "cuda"):
        reason = unavailable_reason(name, torch.device(DEVICE))
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


def token_grid(shape, patch):
    return tuple(d // p for d, p in zip(shape[2:], patch))


def assert_same(name, got, want):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    assert torch.equal(got, want), f"{name}: {int((got != want).sum())}/{got.numel()} elements differ"


def check_patchify(video, patch, order, backend):
    grad_tokens = torch.randn(P._patchify_3d_fake(video, patch, order, backend).shape, device=video.device).to(video.dtype)
    leaf_k, leaf_r = (video.detach().clone().requires_grad_(True) for _ in range(2))
    out_k = ops.patchify_3d(leaf_k, patch, order=order, backend=backend)
    out_r = P.patchify_3d_reference(leaf_r, patch, order)
    assert_same("tokens", out_k, out_r)
    assert out_k.is_contiguous()
    (g_k,), (g_r,) = torch.autograd.grad(out_k, leaf_k, grad_tokens), torch.autograd.grad(out_r, leaf_r, grad_tokens)
    assert_same("grad of video", g_k, g_r)


def check_unpatchify(tokens, patch, grid, order, backend):
    leaf_k, leaf_r = (tokens.detach().clone().requires_grad_(True) for _ in range(2))
    out_k = ops.unpatchify_3d(leaf_k, patch, grid, order=order, backend=backend)
    out_r = P.unpatchify_3d_reference(leaf_r, patch, grid, order)
    assert_same("video", out_k, out_r)
    grad_video = torch.randn(out_r.shape, device=tokens.device).to(tokens.dtype)
    (g_k,), (g_r,) = torch.autograd.grad(out_k, leaf_k, grad_video), torch.autograd.grad(out_r, leaf_r, grad_video)
    assert_same("grad of tokens", g_k, g_r)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("order", P.ORDERS)
@pytest.mark.parametrize("shape, patch", CASES, ids=CASE_IDS)
def test_patchify_matches_reference(backend, dtype, order, shape, patch):
    video = torch.randn(shape, device=DEVICE, dtype=dtype)
    check_patchify(video, patch, order, backend)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("order", P.ORDERS)
@pytest.mark.parametrize("shape, patch", CASES, ids=CASE_IDS)
def test_unpatchify_matches_reference(backend, dtype, order, shape, patch):
    grid = token_grid(shape, patch)
    K = shape[1] * patch[0] * patch[1] * patch[2]
    tokens = torch.randn(shape[0], grid[0] * grid[1] * grid[2], K, device=DEVICE, dtype=dtype)
    check_unpatchify(tokens, patch, grid, order, backend)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("order", P.ORDERS)
def test_round_trip(backend, order):
    shape, patch = CASES[1]
    video = torch.randn(shape, device=DEVICE)
    tokens = ops.patchify_3d(video, patch, order=order, backend=backend)
    assert_same("round trip", ops.unpatchify_3d(tokens, patch, video_shape=video.shape, order=order, backend=backend), video)
    assert_same("round trip (T, H, W)", ops.unpatchify_3d(tokens, patch, video_shape=shape[2:], order=order, backend=backend), video)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_defaults_are_each_others_inverse(backend):
    """unpatchify_3d(patchify_3d(v, p), p, grid) == v with both orders left at their defaults (issue 11), and
    patchify_3d(unpatchify_3d(t, p, grid), p) == t."""
    shape, patch = CASES[1]
    grid = token_grid(shape, patch)
    video = torch.randn(shape, device=DEVICE)
    tokens = ops.patchify_3d(video, patch, backend=backend)
    assert_same("video -> tokens -> video", ops.unpatchify_3d(tokens, patch, grid, backend=backend), video)
    tokens = torch.randn_like(tokens)
    back = ops.patchify_3d(ops.unpatchify_3d(tokens, patch, grid, backend=backend), patch, backend=backend)
    assert_same("tokens -> video -> tokens", back, tokens)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("shape, patch", CASES, ids=CASE_IDS)
def test_cthw_tokens_times_weight_is_conv3d(backend, shape, patch):
    """tokens @ weight.reshape(D, -1).T + bias == Conv3d(kernel=patch, stride=patch), as tokens."""
    torch.manual_seed(1)
    C, D = shape[1], 16
    conv = torch.nn.Conv3d(C, D, kernel_size=patch, stride=patch).to(DEVICE).double()
    video = torch.randn(shape, device=DEVICE)
    tokens = ops.patchify_3d(video, patch, backend=backend).double()  # default order "cthw"
    embedded = tokens @ conv.weight.reshape(D, -1).T + conv.bias  # (B, S, D)
    expected = conv(video.double()).flatten(2).transpose(1, 2)  # (B, D, T', H', W') -> (B, S, D)
    torch.testing.assert_close(embedded, expected, rtol=1e-12, atol=1e-12)


def dit_unpatchify(x, c, p):
    """facebookresearch/DiT models.py's final-layer unpatchify, verbatim: (N, T, p*p*c) -> (N, c, H, W)."""
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1]
    x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(shape=(x.shape[0], c, h * p, h * p))


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_thwc_unpatchify_is_dits(backend):
    """With one frame and patch (1, p, p), order="thwc" is DiT's final-layer unpatchify."""
    B, C, p, side = 2, 3, 2, 5
    tokens = torch.randn(B, side * side, p * p * C, device=DEVICE)
    video = ops.unpatchify_3d(tokens, (1, p, p), (1, side, side), order="thwc", backend=backend)
    assert_same("DiT unpatchify", video[:, :, 0], dit_unpatchify(tokens, C, p))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("layout", ["channels_last_3d", "sliced_width", "odd_offset"])
def test_strided_video(backend, layout):
    """Video read in place through any strides: channels-last memory, a crop, a misaligned pointer."""
    shape, patch = CASES[0]
    if layout == "channels_last_3d":
        video = torch.randn(shape, device=DEVICE).to(memory_format=torch.channels_last_3d)
    elif layout == "sliced_width":
        video = torch.randn(*shape[:4], shape[4] + 3, device=DEVICE)[..., 1:-2]
    else:
        n = torch.Size(shape).numel()
        video = torch.randn(n + 1, device=DEVICE, dtype=torch.float16)[1:].view(shape)
    check_patchify(video, patch, "cthw", backend)
    check_patchify(video, patch, "thwc", backend)
    # unpatchify writes into a fresh video; its tokens may be strided too
    grid = token_grid(shape, patch)
    K = shape[1] * 4
    tokens = torch.randn(shape[0], 105, K + 5, device=DEVICE)[..., 2:-3]
    check_unpatchify(tokens, patch, grid, "thwc", backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    """torch.library's checks of the schema, fake kernel, autograd registration and dispatch."""
    shape, patch = CASES[1]
    video = torch.randn(shape, device=DEVICE, requires_grad=True)
    tokens = torch.randn(shape[0], 105, 40, device=DEVICE, requires_grad=True)
    for order in P.ORDERS:
        torch.library.opcheck(torch.ops.dit_fast.patchify_3d.default, (video, list(patch), order, backend))
        torch.library.opcheck(torch.ops.dit_fast.unpatchify_3d.default, (tokens, list(patch), [3, 5, 7], order, backend))


@pytest.mark.parametrize("backend", kernel_backends())
def test_torch_compile_fullgraph(backend):
    """Patch embedding -> token mixing -> final-layer unpatchify compiles without graph breaks."""
    shape, patch = CASES[0]
    embed = torch.nn.Linear(12, 8).to(DEVICE)
    final = torch.nn.Linear(8, 12).to(DEVICE)

    def f(video):
        tokens = ops.patchify_3d(video, patch, backend=backend)  # (B, S, C pt ph pw)
        return ops.unpatchify_3d(final(torch.tanh(embed(tokens))), patch, (3, 5, 7), order="thwc", backend=backend)

    torch._dynamo.reset()
    video = torch.randn(shape, device=DEVICE, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out, expected = compiled(video), f(video)
    torch.testing.assert_close(out, expected)
    g, g_ref = torch.autograd.grad(out.sum(), video), torch.autograd.grad(expected.sum(), video)
    torch.testing.assert_close(g, g_ref)


def test_torch_backend_and_auto_on_cpu_are_the_reference():
    shape, patch = CASES[0]
    video = torch.randn(shape)
    assert_same("torch", ops.patchify_3d(video, patch, backend="torch"), P.patchify_3d_reference(video, patch))
    assert_same("auto", ops.patchify_3d(video, patch), P.patchify_3d_reference(video, patch))


def test_int_patch_means_cube():
    video = torch.randn(1, 2, 4, 4, 6)
    assert_same("int patch", ops.patchify_3d(video, 2), P.patchify_3d_reference(video, (2, 2, 2)))


# ---- bad input: clear errors naming the argument and the shapes ----


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_bad_inputs(backend):
    video = torch.randn(2, 3, 3, 10, 14, device=DEVICE)
    tokens = torch.randn(2, 105, 12, device=DEVICE)
    patch = (1, 2, 2)
    cases = [
        (ValueError, r"video must be \(B, C, T, H, W\), got shape \(3, 3, 10, 14\)", lambda: ops.patchify_3d(video[0], patch, backend=backend)),
        (ValueError, r"\(T, H, W\) = \(3, 10, 14\) .* not divisible by patch \(2, 2, 2\)", lambda: ops.patchify_3d(video, (2, 2, 2), backend=backend)),
        (ValueError, r"\(T, H, W\) = \(3, 10, 13\)", lambda: ops.patchify_3d(video[..., :13], patch, backend=backend)),
        (ValueError, r"patch must be three positive ints", lambda: ops.patchify_3d(video, (1, 2), backend=backend)),
        (ValueError, r"patch must be three positive ints", lambda: ops.patchify_3d(video, (1, 0, 2), backend=backend)),
        (ValueError, r"order must be 'cthw'.* got 'chw'", lambda: ops.patchify_3d(video, patch, order="chw", backend=backend)),
        (TypeError, r"video must be float32, float16 or bfloat16, got torch.int64", lambda: ops.patchify_3d(video.long(), patch, backend=backend)),
        (TypeError, r"video must be a torch.Tensor", lambda: ops.patchify_3d(video.tolist(), patch, backend=backend)),
        (ValueError, r"tokens must be \(B, S, K\), got shape \(105, 12\)", lambda: ops.unpatchify_3d(tokens[0], patch, (3, 5, 7), backend=backend)),
        (ValueError, r"grid \(3, 5, 6\) has 90 tokens but tokens \(2, 105, 12\) has S = 105", lambda: ops.unpatchify_3d(tokens, patch, (3, 5, 6), backend=backend)),
        (ValueError, r"K = 10 features .* patch volume pt \* ph \* pw = 4", lambda: ops.unpatchify_3d(tokens[..., :10], patch, (3, 5, 7), backend=backend)),
        (ValueError, r"exactly one of grid", lambda: ops.unpatchify_3d(tokens, patch, backend=backend)),
        (ValueError, r"exactly one of grid", lambda: ops.unpatchify_3d(tokens, patch, (3, 5, 7), video_shape=(3, 10, 14), backend=backend)),
        (ValueError, r"video_shape \(T, H, W\) = \(3, 10, 15\) is not divisible", lambda: ops.unpatchify_3d(tokens, patch, video_shape=(3, 10, 15), backend=backend)),
        (ValueError, r"video_shape \(2, 4, 3, 10, 14\) needs tokens .*\(2, S, 16\)", lambda: ops.unpatchify_3d(tokens, patch, video_shape=(2, 4, 3, 10, 14), backend=backend)),
        (ValueError, r"video_shape must be \(T, H, W\) or \(B, C, T, H, W\)", lambda: ops.unpatchify_3d(tokens, patch, video_shape=(10, 14), backend=backend)),
        (ValueError, r"grid must be three positive ints", lambda: ops.unpatchify_3d(tokens, patch, (105,), backend=backend)),
        (TypeError, r"tokens must be float32", lambda: ops.unpatchify_3d(tokens.int(), patch, (3, 5, 7), backend=backend)),
        (ValueError, r"unknown backend", lambda: ops.patchify_3d(video, patch, backend="fast")),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()


# ---- GPU only: large shapes and 64-bit offsets ----


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_large_video_shapes(backend, dtype):
    """Wan-like latent (16 channels, 21 x 60 x 104, patch (1, 2, 2)) and a pixel-space patch (3, 2x16x16)."""
    for shape, patch in (((1, 16, 21, 60, 104), (1, 2, 2)), ((2, 3, 8, 64, 96), (2, 16, 16))):
        video = torch.randn(shape, device="cuda", dtype=dtype)
        for order in P.ORDERS:
            check_patchify(video, patch, order, backend)
            tokens = P.patchify_3d_reference(video, patch, order)
            check_unpatchify(tokens, patch, token_grid(shape, patch), order, backend)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", kernel_backends())
def test_offsets_past_2_31_elements(backend):
    """A video of more than 2^31 elements: its last patches land in the last tokens (64-bit indexing)."""
    shape, patch = (1, 16, 66, 1024, 2048), (1, 2, 2)  # 2.2e9 fp16 elements, 4.4 GB
    assert torch.Size(shape).numel() > 2**31
    grid = token_grid(shape, patch)  # (66, 512, 1024)
    video = torch.randn(shape, device="cuda", dtype=torch.float16)
    tokens = ops.patchify_3d(video, patch, backend=backend)
    tail = video[:, :, -1:, -4:]  # the last frame's last two token rows
    assert_same("last tokens", tokens[:, -2 * grid[2]:], P.patchify_3d_reference(tail, patch))
    del tokens
    tokens = P.patchify_3d_reference(video, patch, "thwc")
    del video
    back = ops.unpatchify_3d(tokens, patch, grid, backend=backend)
    assert_same("last frames", back[:, :, -1:, -4:],
                P.unpatchify_3d_reference(tokens[:, -2 * grid[2]:], patch, (1, 2, grid[2])))


@pytest.mark.skipif(HAS_GPU, reason="on a GPU every test above compiles and runs the kernel for real")
@pytest.mark.parametrize("channels_last, to_tokens", [(False, True), (True, False)])
def test_triton_kernel_compiles_for_sm90(channels_last, to_tokens):
    """The interpreter does not compile: check that the kernel builds for an H100 here."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dit_fast.triton_kernels import patchify as kernels

    fn = kernels._patchify_3d_kernel
    fn = triton.JITFunction(getattr(fn, "fn", fn))  # under TRITON_INTERPRET the decorator wrapped it
    ints = ("C", "T_TOK", "H_TOK", "W_TOK", "K", "stride_vc", "stride_vt", "stride_vh", "stride_vw",
            "stride_tb", "stride_ts", "stride_tk")
    signature = {"V_ptr": "*bf16", "TOK_ptr": "*bf16", "stride_vb": "i64", **{n: "i32" for n in ints}}
    constexprs = {"PT": 2, "PH": 2, "PW": 2, "CHANNELS_LAST": channels_last, "TO_TOKENS": to_tokens,
                  "BLOCK_W": 64, "BLOCK_F": 64}
    signature.update({n: "constexpr" for n in constexprs})
    signature = {name: signature[name] for name in fn.arg_names}  # in the kernel's argument order
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
