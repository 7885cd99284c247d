"""adaLN ops: every kernel backend against the PyTorch reference, forward and every gradient.

On CPU the Triton kernels run in Triton's interpreter; the CUDA backend's cases need a GPU and the
extension (tests/test_cuda_extension.py covers it on GPU too).
"""

import os

import pytest
import torch
import torch.nn.functional as F

import dit_fast
from dit_fast import ops
from dit_fast._backend import BackendUnavailableError, unavailable_reason
from dit_fast.ops import adaln as A
from tests.conftest import HAS_GPU
from tests.launches import count_launches
from tests.utils import assert_close_to_reference

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kernel_backends():
    """Kernel backends with the reason each is skipped where it cannot run."""
    params = []
    for name in ("triton", "cuda"):
        reason = unavailable_reason(name, torch.device(DEVICE))
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


def rand(*shape, dtype, requires_grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def modulation(B, G, C, dtype, per_group):
    # (B, G, C) per group of tokens, or DiT's (B, C); scaled to the magnitudes adaLN produces
    shape = (B, G, C) if per_group else (B, C)
    return (0.5 * torch.randn(*shape, device=DEVICE, dtype=dtype)).requires_grad_(True)


def check_against_reference(fn_kernel, fn_naive, fn_ref, inputs, names, dtype, grad_seed=1):
    """Runs the kernel, the naive torch math in ``dtype`` and the float64 reference; compares
    outputs and gradients of every input with the tolerance rule of tests/utils.py."""
    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_(True) if t is not None else None for t in inputs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator(device=DEVICE).manual_seed(grad_seed)
        grads_out = [torch.randn(o.shape, device=DEVICE, generator=gen, dtype=torch.float32).to(cast) for o in outs]
        diff = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(outs, diff, grads_out)
        return outs, grads

    out_k, grad_k = run(fn_kernel, dtype)
    out_n, grad_n = run(fn_naive, dtype)
    out_r, grad_r = run(fn_ref, torch.float64)
    for i, (k, n, r) in enumerate(zip(out_k, out_n, out_r)):
        assert k.dtype == dtype
        assert_close_to_reference(f"output {i}", k, r, n)
    present = [n for n, t in zip(names, inputs) if t is not None]
    for name, k, n, r in zip(present, grad_k, grad_n, grad_r):
        assert k.dtype == dtype, f"grad of {name} has dtype {k.dtype}"
        assert_close_to_reference(f"grad of {name}", k, r, n)


# the naive math a user writes, in the input dtype: PyTorch's own error in that dtype
def naive_layernorm_modulate(x, shift, scale, weight=None, bias=None, eps=1e-6):
    N = x.shape[1]
    normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return normed * (1 + A.expand_modulation(scale, N)) + A.expand_modulation(shift, N)


def naive_gated_residual(x, gate, y):
    return x + A.expand_modulation(gate, x.shape[1]) * y


def naive_residual_layernorm_modulate(x, gate, y, shift, scale, eps=1e-6):
    h = naive_gated_residual(x, gate, y)
    return h, naive_layernorm_modulate(h, shift, scale, eps=eps)


# sizes that do not fill a block (37, 100), a DiT width (1152 on GPU) and several groups
SHAPES = [(2, 6, 37, 3), (1, 5, 100, 1), (3, 4, 64, 2)]
if HAS_GPU:
    SHAPES += [(2, 257, 1152, 1), (2, 64, 3072, 16), (1, 8, 8192, 2)]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C,G", SHAPES)
@pytest.mark.parametrize("per_group", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_layernorm_modulate(backend, dtype, B, N, C, G, per_group, affine):
    x = rand(B, N, C, dtype=dtype)
    shift, scale = modulation(B, G, C, dtype, per_group), modulation(B, G, C, dtype, per_group)
    weight = (1 + 0.1 * rand(C, dtype=dtype)) if affine else None
    bias = 0.1 * rand(C, dtype=dtype) if affine else None
    check_against_reference(
        lambda *a: ops.layernorm_modulate(*a[:3], weight=a[3], bias=a[4], backend=backend),
        naive_layernorm_modulate,
        A.layernorm_modulate_reference,
        [x, shift, scale, weight, bias], ["x", "shift", "scale", "weight", "bias"], dtype)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C,G", SHAPES)
@pytest.mark.parametrize("per_group", [False, True])
def test_gated_residual(backend, dtype, B, N, C, G, per_group):
    x, y = rand(B, N, C, dtype=dtype), rand(B, N, C, dtype=dtype)
    gate = modulation(B, G, C, dtype, per_group)
    check_against_reference(
        lambda *a: ops.gated_residual(*a, backend=backend),
        naive_gated_residual, A.gated_residual_reference,
        [x, gate, y], ["x", "gate", "y"], dtype)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C,G", SHAPES)
@pytest.mark.parametrize("per_group", [False, True])
def test_residual_layernorm_modulate(backend, dtype, B, N, C, G, per_group):
    x, y = rand(B, N, C, dtype=dtype), rand(B, N, C, dtype=dtype)
    gate, shift, scale = (modulation(B, G, C, dtype, per_group) for _ in range(3))
    check_against_reference(
        lambda *a: ops.residual_layernorm_modulate(*a, backend=backend),
        naive_residual_layernorm_modulate, A.residual_layernorm_modulate_reference,
        [x, gate, y, shift, scale], ["x", "gate", "y", "shift", "scale"], dtype)


@pytest.mark.parametrize("backend", kernel_backends())
def test_only_one_output_used(backend):
    """Backward when only h, or only the modulated output, reaches the loss."""
    B, N, C = 2, 4, 37
    x, y = rand(B, N, C, dtype=torch.float32), rand(B, N, C, dtype=torch.float32)
    gate, shift, scale = (modulation(B, 1, C, torch.float32, False) for _ in range(3))
    for pick in (0, 1):
        got = torch.autograd.grad(ops.residual_layernorm_modulate(x, gate, y, shift, scale, backend=backend)[pick].sum(),
                                  (x, gate, y, shift, scale), allow_unused=True)
        want = torch.autograd.grad(A.residual_layernorm_modulate_reference(x, gate, y, shift, scale)[pick].sum(),
                                   (x, gate, y, shift, scale), allow_unused=True)
        for g, w in zip(got, want):
            if w is None:
                assert g is None or g.abs().max() == 0
            else:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", kernel_backends())
def test_non_contiguous_inputs(backend):
    """DiT's modulations are chunks of one (B, 6C) tensor: strided views must give the same result."""
    B, N, C = 2, 5, 40
    x_big = rand(B, N, 2 * C, dtype=torch.float32)
    x = x_big[..., ::2]  # strided last dim
    mods = rand(B, 6 * C, dtype=torch.float32)
    shift, scale, gate = mods.chunk(6, dim=1)[:3]
    y = rand(N, B, C, dtype=torch.float32).transpose(0, 1)
    got = ops.residual_layernorm_modulate(x, gate, y, shift, scale, backend=backend)
    want = A.residual_layernorm_modulate_reference(x, gate, y, shift, scale)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(sum(o.square().sum() for o in got), (x_big, mods, y))
    g_want = torch.autograd.grad(sum(o.square().sum() for o in want), (x_big, mods, y))
    for g, w in zip(g_got, g_want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    """torch.library's checks of the schema, fake kernel, autograd registration and dispatch."""
    B, N, C = 2, 4, 24
    x, y = rand(B, N, C, dtype=torch.float32), rand(B, N, C, dtype=torch.float32)
    gate, shift, scale = (modulation(B, 2, C, torch.float32, True) for _ in range(3))
    w, b = rand(C, dtype=torch.float32), rand(C, dtype=torch.float32)
    cases = [
        (x, None, None, shift, scale, w, b, 1e-6, backend),  # layernorm_modulate with affine
        (x, gate, y, None, None, None, None, 1e-6, backend),  # gated_residual
        (x, gate, y, shift, scale, None, None, 1e-6, backend),  # residual_layernorm_modulate
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.dit_fast.adaln_fwd.default, args)


@pytest.mark.parametrize("backend", kernel_backends())
def test_torch_compile_fullgraph(backend):
    """A DiT-style block fragment using all three ops compiles without graph breaks."""

    class Fragment(torch.nn.Module):
        def __init__(self, C):
            super().__init__()
            self.mod = torch.nn.Linear(C, 5 * C)
            self.mlp = torch.nn.Linear(C, C)

        def forward(self, x, c):
            shift1, scale1, gate1, shift2, scale2 = self.mod(c).chunk(5, dim=1)
            h1 = ops.layernorm_modulate(x, shift1, scale1, backend=backend)
            x, h2 = ops.residual_layernorm_modulate(x, gate1, self.mlp(h1), shift2, scale2, backend=backend)
            return ops.gated_residual(x, gate1, self.mlp(h2), backend=backend)

    torch._dynamo.reset()
    model = Fragment(32).to(DEVICE)
    x, c = rand(2, 6, 32, dtype=torch.float32), rand(2, 32, dtype=torch.float32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out = compiled(x, c)
    expected = model(x, c)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (x, c, model.mod.weight))
    grads_ref = torch.autograd.grad(expected.sum(), (x, c, model.mod.weight))
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# ---- the CPU path (dit_fast/ops/adaln_cpu.py): one LayerNorm pass per modulation group ----


# (B, N, C, G): per-sample modulation, per-group, a prime width, one group per token (G = N)
CPU_SHAPES = [(2, 60, 13, 1), (2, 60, 13, 4), (3, 35, 7, 7), (1, 37, 24, 37)]


def _cpu_cases(P, inputs, per_group):
    x, gate, y, shift, scale, weight, bias = inputs
    return {
        "layernorm_modulate": (lambda *t: P.layernorm_modulate_cpu(*t, per_group=per_group),
                               A.layernorm_modulate_reference, (x, shift, scale, weight, bias)),
        "gated_residual": (P.gated_residual_cpu, A.gated_residual_reference, (x, gate, y)),
        "residual_layernorm_modulate": (lambda *t: P.residual_layernorm_modulate_cpu(*t, per_group=per_group),
                                        A.residual_layernorm_modulate_reference, (x, gate, y, shift, scale)),
    }


def _cpu_inputs(B, N, C, G, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    mod = (B, C) if G == 1 else (B, G, C)
    return (make(B, N, C), make(*mod, scale=0.5), make(B, N, C), make(*mod, scale=0.5), make(*mod, scale=0.5),
            1 + make(C, scale=0.1), make(C, scale=0.1))


def _run(fn, inputs, cast):
    leaves = [t.detach().to(cast).requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(cast)
               for o in outs]
    return outs, torch.autograd.grad(outs, leaves, weights)


@pytest.mark.parametrize("per_group", [True, False], ids=["per-group", "eager-form"])
@pytest.mark.parametrize("B,N,C,G", CPU_SHAPES)
def test_cpu_path_algebra_in_float64(B, N, C, G, per_group):
    """The folded LayerNorm (w' = weight (1 + scale), b' = bias (1 + scale) + shift) and the backward's
    sums (dscale = weight * sum dout xhat + bias * sum dout, dweight, dbias) are the reference's math: in
    float64 both forms equal the reference, output and every gradient, to 1e-12."""
    from dit_fast.ops import adaln_cpu as P
    inputs = _cpu_inputs(B, N, C, G, torch.float64)
    for name, (cpu, ref, args) in _cpu_cases(P, inputs, per_group).items():
        (got, grads), (want, grads_ref) = _run(cpu, args, torch.float64), _run(ref, args, torch.float64)
        for i, (a, b) in enumerate(zip(got + grads, want + grads_ref)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name} tensor {i}: {m}")


@pytest.mark.parametrize("per_group", [True, False], ids=["per-group", "eager-form"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C,G", CPU_SHAPES)
def test_cpu_path_matches_reference(dtype, B, N, C, G, per_group):
    """What backend "auto" runs on CPU against the reference in float64, output and every gradient, within
    twice the reference's own error in the dtype (tests/utils.py). gated_residual (one addcmul) rounds once
    from fp32 as the reference does: bitwise its output in fp16 / bf16; the per-group forward too, up to the
    fp32 rounding order: within one ulp of it."""
    from dit_fast.ops import adaln_cpu as P
    inputs = _cpu_inputs(B, N, C, G, dtype)
    for name, (cpu, ref, args) in _cpu_cases(P, inputs, per_group).items():
        (got, grads), (want, grads_dtype), (want64, grads_64) = (_run(cpu, args, dtype), _run(ref, args, dtype),
                                                                 _run(ref, args, torch.float64))
        for i, (a, b, c) in enumerate(zip(got + grads, want64 + grads_64, want + grads_dtype)):
            assert a.dtype == dtype and a.shape == b.shape, f"{name} tensor {i}: {a.dtype} {tuple(a.shape)}"
            assert_close_to_reference(f"{name} tensor {i}", a, b, c)
        if dtype != torch.float32 and name == "gated_residual":
            assert torch.equal(got[0], want[0]), f"max diff {(got[0].float() - want[0].float()).abs().max()}"
        elif dtype != torch.float32 and per_group:  # fp32 rounding order apart, one rounding: within one ulp
            eps = torch.finfo(dtype).eps
            for i, (a, b) in enumerate(zip(got, want)):
                torch.testing.assert_close(a.float(), b.float(), rtol=eps, atol=eps * 2 ** -10,
                                           msg=lambda m: f"{name} output {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_path_modulation_grads_over_many_rows(dtype):
    """dshift and dscale are sums over a group's rows. ATen's CPU LayerNorm backward sums its own affine
    gradients of a half-precision input to ~5% error over 4k rows. The CPU path sums them itself in fp32:
    at 4096 rows they stay within twice the reference's error."""
    from dit_fast.ops import adaln_cpu as P
    x, _, _, shift, scale, _, _ = _cpu_inputs(1, 4096, 32, 1, dtype, seed=5)
    cpu = lambda *t: P.layernorm_modulate_cpu(*t, per_group=True)  # noqa: E731
    (_, grads), (_, grads_dtype), (_, grads_64) = (_run(cpu, (x, shift, scale), dtype),
                                                   _run(A.layernorm_modulate_reference, (x, shift, scale), dtype),
                                                   _run(A.layernorm_modulate_reference, (x, shift, scale), torch.float64))
    for name, i in (("dshift", 1), ("dscale", 2)):
        assert_close_to_reference(name, grads[i], grads_64[i], grads_dtype[i])


def test_cpu_path_form_decision():
    """A call per (sample, group) while those calls are few or each is large; the whole-tensor form for many
    small groups (one per frame at a small N, one per token), and for empty inputs."""
    from dit_fast.ops.adaln_cpu import MAX_SMALL_GROUPS, MIN_GROUP_ELEMENTS, per_group_calls
    x = torch.empty(2, 4095, 1152)
    assert per_group_calls(x, 1) and per_group_calls(x, MAX_SMALL_GROUPS // 2)  # B G calls: few
    assert not per_group_calls(x, 13)  # 26 calls of 315 rows
    assert per_group_calls(torch.empty(2, 32760, 1152), 13)  # 26 calls of 2520 rows: each large
    assert not per_group_calls(x, 4095)  # one row per group
    assert not per_group_calls(torch.empty(2, 0, 8), 1)
    rows = MIN_GROUP_ELEMENTS // 8
    assert per_group_calls(torch.empty(4, 16 * rows, 8), 16) and not per_group_calls(torch.empty(4, 16 * rows - 16, 8), 16)


def test_cpu_path_edge_cases():
    """The CPU path with strided inputs, shift (B, C) beside scale (B, 1, C), gradients wanted for some inputs
    only, only one of residual_layernorm_modulate's outputs used, and empty inputs: the reference's results."""
    from dit_fast.ops import adaln_cpu as P
    g = torch.Generator().manual_seed(11)
    B, N, C = 2, 9, 16
    wide = torch.randn(B, 2 * N, C + 3, generator=g)
    x, y = wide[:, ::2, :C], wide[:, 1::2, 3:]  # neither contiguous
    for per_group in (True, False):
        gate, shift, scale = (0.5 * torch.randn(B, 3, C, generator=g) for _ in range(3))
        with torch.no_grad():
            torch.testing.assert_close(P.layernorm_modulate_cpu(x, shift, scale, per_group=per_group),
                                       A.layernorm_modulate_reference(x, shift, scale))
        for pick in (0, 1):
            leaves = [t.clone().requires_grad_(i != 1) for i, t in enumerate((x, gate, y, shift, scale))]  # not gate
            refs = [t.clone().requires_grad_(i != 1) for i, t in enumerate((x, gate, y, shift, scale))]
            got = P.residual_layernorm_modulate_cpu(*leaves, per_group=per_group)[pick]
            want = A.residual_layernorm_modulate_reference(*refs)[pick]
            torch.testing.assert_close(got, want)
            w = torch.randn(got.shape, generator=g)
            want_leaves = [t for t in refs if t.requires_grad]
            got_grads = torch.autograd.grad(got, [t for t in leaves if t.requires_grad], w, allow_unused=True)
            want_grads = torch.autograd.grad(want, want_leaves, w, allow_unused=True)  # h alone: shift, scale unused
            for a, b, leaf in zip(got_grads, want_grads, want_leaves):
                zero = torch.zeros_like(leaf)
                torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-5, atol=1e-5)
        # shift (B, C) and scale (B, 1, C): one group each, the gradients in their own shapes
        shift2, scale2 = (0.5 * torch.randn(B, C, generator=g)).requires_grad_(), \
            (0.5 * torch.randn(B, 1, C, generator=g)).requires_grad_()
        out = P.layernorm_modulate_cpu(x, shift2, scale2, per_group=per_group)
        ds, dc = torch.autograd.grad(out, (shift2, scale2), torch.ones_like(out))
        rs, rc = torch.autograd.grad(A.layernorm_modulate_reference(x, shift2, scale2), (shift2, scale2),
                                     torch.ones_like(out))
        assert ds.shape == (B, C) and dc.shape == (B, 1, C)
        torch.testing.assert_close((ds, dc), (rs, rc), rtol=1e-5, atol=1e-5)
    empty = torch.randn(2, 0, 8, requires_grad=True)
    mod = torch.randn(2, 8, requires_grad=True)
    out = P.layernorm_modulate_cpu(empty, mod, mod)
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert torch.equal(mod.grad, torch.zeros(2, 8))


# ---- backend selection ----


def test_auto_on_cpu_is_reference():
    assert dit_fast._backend.resolve_backend("auto", torch.device("cpu"), "adaln") == "torch"


def test_default_arguments_on_cpu_run_the_cpu_path():
    """The public ops with their default backend, as a user calls them on CPU, run dit_fast/ops/adaln_cpu.py:
    the per-group form for per-sample modulation (its autograd node), the whole-tensor form for one row per
    token, and gated_residual's addcmul; results within the reference's tolerance."""
    g = torch.Generator().manual_seed(13)
    x, y = (torch.randn(2, 64, 32, generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    gate, shift, scale = (0.5 * torch.randn(2, 32, generator=g, dtype=torch.bfloat16) for _ in range(3))
    out = ops.layernorm_modulate(x, shift, scale)
    assert type(out.grad_fn).__name__ == "_LayerNormModulateBackward"
    torch.testing.assert_close(out, A.layernorm_modulate_reference(x, shift, scale), rtol=1.6e-2, atol=1.6e-2)
    per_token = 0.5 * torch.randn(2, 64, 32, generator=g, dtype=torch.bfloat16)
    out = ops.layernorm_modulate(x, per_token, per_token)
    assert type(out.grad_fn).__name__ == "ViewBackward0"  # the addcmul of the whole-tensor form, viewed back
    torch.testing.assert_close(out, A.layernorm_modulate_reference(x, per_token, per_token), rtol=1.6e-2,
                               atol=1.6e-2)
    h = ops.gated_residual(x, gate, y)
    assert torch.equal(h, A.gated_residual_reference(x, gate, y))


def test_backend_precedence(monkeypatch):
    from dit_fast._backend import requested_backend

    monkeypatch.setenv("DIT_FAST_BACKEND", "torch")
    assert requested_backend("auto") == "torch"
    with dit_fast.use_backend("triton"):
        assert requested_backend("auto") == "triton"  # the block beats the environment
        assert requested_backend("cuda") == "cuda"  # the call beats the block
    monkeypatch.setenv("DIT_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DIT_FAST_BACKEND"):
        requested_backend("auto")
    with pytest.raises(ValueError, match="unknown backend"):
        dit_fast.use_backend("fastest").__enter__()


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only error messages")
def test_unavailable_backends_say_why(monkeypatch):
    x = torch.randn(2, 3, 8)
    s = torch.randn(2, 8)
    with pytest.raises(BackendUnavailableError, match="CUDA device"):
        ops.layernorm_modulate(x, s, s, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.layernorm_modulate(x, s, s, backend="triton")


def test_use_backend_block_reaches_the_op():
    x = torch.randn(2, 3, 8)
    s = torch.randn(2, 8)
    with dit_fast.use_backend("torch"):
        out = ops.layernorm_modulate(x, s, s)
    torch.testing.assert_close(out, A.layernorm_modulate_reference(x, s, s))


# ---- bad input: clear errors naming the argument and the shapes ----


def _good(dtype=torch.float32):
    return torch.randn(2, 6, 8, dtype=dtype), torch.randn(2, 8, dtype=dtype), torch.randn(2, 8, dtype=dtype)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_bad_inputs(backend):
    x, shift, scale = _good()
    cases = [
        (ValueError, r"x must be \(B, N, C\).*\(6, 8\)", lambda: ops.layernorm_modulate(x[0], shift, scale, backend=backend)),
        (ValueError, r"shift must be \(B, C\).*\(2, 7\)", lambda: ops.layernorm_modulate(x, shift[:, :7], scale, backend=backend)),
        (ValueError, r"scale must be.*\(3, 8\)", lambda: ops.layernorm_modulate(x, shift, torch.randn(3, 8), backend=backend)),
        (ValueError, r"G = 4 groups.*N = 6", lambda: ops.layernorm_modulate(x, torch.randn(2, 4, 8), torch.randn(2, 4, 8), backend=backend)),
        (ValueError, r"share one group count", lambda: ops.layernorm_modulate(x, torch.randn(2, 2, 8), torch.randn(2, 3, 8), backend=backend)),
        (TypeError, r"scale has dtype torch.float16", lambda: ops.layernorm_modulate(x, shift, scale.half(), backend=backend)),
        (TypeError, r"x must be float32, float16 or bfloat16", lambda: ops.layernorm_modulate(x.double(), shift.double(), scale.double(), backend=backend)),
        (TypeError, r"x must be float32, float16 or bfloat16", lambda: ops.layernorm_modulate(x.int(), shift, scale, backend=backend)),
        (TypeError, r"shift must be a torch.Tensor", lambda: ops.layernorm_modulate(x, 1.0, scale, backend=backend)),
        (ValueError, r"weight must be \(C,\) = \(8,\)", lambda: ops.layernorm_modulate(x, shift, scale, weight=torch.ones(9), backend=backend)),
        (ValueError, r"eps must be a positive", lambda: ops.layernorm_modulate(x, shift, scale, eps=0.0, backend=backend)),
        (ValueError, r"y must have the shape of x", lambda: ops.gated_residual(x, shift, x[:, :5], backend=backend)),
        (ValueError, r"gate must be", lambda: ops.gated_residual(x, shift[:1], x, backend=backend)),
        (ValueError, r"y must have the shape of x", lambda: ops.residual_layernorm_modulate(x, shift, x[:1], shift, scale, backend=backend)),
        (ValueError, r"unknown backend", lambda: ops.layernorm_modulate(x, shift, scale, backend="fast")),
    ]
    if HAS_GPU:
        cases.append((ValueError, r"shift is on", lambda: ops.layernorm_modulate(x.cuda(), shift, scale.cuda(), backend=backend)))
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()


@pytest.mark.parametrize("backend", kernel_backends())
def test_too_wide_rows_rejected_by_kernels(backend):
    C = A.MAX_C + 1
    x = torch.randn(1, 1, C, device=DEVICE)
    s = torch.randn(1, C, device=DEVICE)
    with pytest.raises(ValueError, match=f"C = {C} features"):
        ops.layernorm_modulate(x, s, s, backend=backend)
    # the reference has no such limit
    ops.layernorm_modulate(x, s, s, backend="torch")


# ---- nn modules ----


def test_modules_match_dit_pattern():
    """ModulatedLayerNorm and GatedResidual equal DiT's modulate(norm(x), shift, scale) and x + gate * y."""
    B, N, C = 2, 5, 16
    x, y = torch.randn(B, N, C), torch.randn(B, N, C)
    shift, scale, gate = torch.randn(B, C), torch.randn(B, C), torch.randn(B, C)
    norm = torch.nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
    dit_modulate = norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    torch.testing.assert_close(dit_fast.nn.ModulatedLayerNorm(C)(x, shift, scale), dit_modulate)
    torch.testing.assert_close(dit_fast.nn.GatedResidual()(x, gate, y), x + gate.unsqueeze(1) * y)
    affine = dit_fast.nn.ModulatedLayerNorm(C, elementwise_affine=True)
    assert {n for n, _ in affine.named_parameters()} == {"weight", "bias"}
    assert "elementwise_affine=True" in repr(affine)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not HAS_GPU, reason="needs Triton's interpreter or a GPU")
def test_module_triton_backend_matches_torch():
    C = 24
    module = dit_fast.nn.ModulatedLayerNorm(C, elementwise_affine=True, backend="triton").to(DEVICE)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x, shift, scale = rand(2, 3, C, dtype=torch.float32), rand(2, C, dtype=torch.float32), rand(2, C, dtype=torch.float32)
    with count_launches() as launches:
        out = module(x, shift, scale)
    assert launches["_adaln_forward_kernel"] >= 1, dict(launches)  # the kernel ran (>=: a GPU's autotuner)
    module.backend = "torch"
    torch.testing.assert_close(out, module(x, shift, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="a harness check of Triton's CPU interpreter")
def test_interpreter_leaves_triton_language_unpatched():
    """A kernel run in the interpreter (with device-function calls) leaves triton.language as it was.

    Regression: Triton 3.9 leaves tl.core's builtins patched after a device call, and every later
    sm_90a compile check in the same process failed (tests/triton_interpreter.py restores them)."""
    import triton.language as tl

    before = dict(vars(tl.core))
    x = torch.randn(2, 37, 6)
    ops.layernorm_modulate(x, torch.randn(2, 6), torch.randn(2, 6), backend="triton")
    changed = [name for name, value in vars(tl.core).items() if before.get(name, value) is not value]
    assert not changed, f"triton.language.core left patched after an interpreted kernel: {changed[:8]}"
