"""The CUDA extension dit_fast._C: build and import, error paths, the sm_90a compile check, and (on a
GPU) the CUDA adaLN backend against the reference, forward and every gradient.

The Triton backend of the same ops is tested in tests/test_adaln.py; on machines without a GPU the
CUDA kernels run in the CPU emulation of tests/test_cuda_emulation.py.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dit_fast
from dit_fast import _extension, ops
from dit_fast.ops import adaln as A
from tests.conftest import HAS_GPU
from tests.utils import assert_close_to_reference

ROOT = Path(__file__).resolve().parents[1]
COMPILE_CHECK = ROOT / "csrc" / "compile_check.sh"
HAS_NVCC = shutil.which("nvcc") is not None
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_ext = pytest.mark.skipif(_extension.cuda_ext is None, reason=f"dit_fast._C not built: {_extension.load_error}")
needs_gpu = pytest.mark.skipif(not HAS_GPU or _extension.cuda_ext is None,
                               reason="needs a CUDA GPU and the built extension")


# ---------------------------------------------------------------------------------------------
# Build, import and error paths (CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_NVCC or os.environ.get("DIT_FAST_BUILD_CUDA", "") == "0"
                    or not (HAS_GPU or os.environ.get("DIT_FAST_BUILD_CUDA", "") == "1"
                            or os.environ.get("DIT_FAST_CUDA_ARCHS", "")),
                    reason="setup.py builds the extension only where nvcc is found and a GPU is visible, "
                           "DIT_FAST_BUILD_CUDA=1 or DIT_FAST_CUDA_ARCHS asks for it (scripts/test.sh does)")
def test_extension_built_and_imported():
    assert _extension.cuda_ext is not None, f"nvcc is here but dit_fast._C did not load: {_extension.load_error}"


@needs_ext
def test_extension_exposes_adaln_and_matches_python_limits():
    from dit_fast.cuda import adaln as cuda_adaln

    ext = _extension.cuda_ext
    for name in ("adaln_forward", "adaln_backward", "adaln_backward_blocks_per_sm"):
        assert callable(getattr(ext, name)), name
    assert ext.ADALN_MAX_CHANNELS == A.MAX_C == cuda_adaln.MAX_C


@needs_ext
@pytest.mark.parametrize("channels, groups, match", [(0, 1, "C = 0"), (16385, 1, "C = 16385"), (8, 3, "G = 3 must divide")])
def test_launcher_rejects_bad_sizes_with_value_error(channels, groups, match):
    """Size checks run on the host before any CUDA call and surface as ValueError."""
    with pytest.raises(ValueError, match=match):
        _extension.cuda_ext.adaln_forward(x=16, gate=0, branch=0, h=0, shift=16, scale=16, weight=0, bias=0,
                                          out=16, mean=16, rstd=16, rows=4, tokens=4, groups=groups,
                                          channels=channels, eps=1e-6, dtype=0, stream=0)


@needs_ext
def test_launcher_rejects_unknown_dtype_and_uncovered_chunks():
    ext = _extension.cuda_ext
    with pytest.raises(ValueError, match="unsupported dtype code 7"):
        ext.adaln_backward_blocks_per_sm(channels=64, dtype=7)
    with pytest.raises(ValueError, match="must cover N / G"):
        ext.adaln_backward(dout=16, dh=0, x=16, gate=0, branch=0, scale=16, weight=0, bias=0, mean=16, rstd=16,
                           dx=16, dbranch=0, dshift_part=16, dscale_part=16, dgate_part=0, dweight_part=0,
                           dbias_part=0, batch=1, tokens=10, groups=1, channels=64, chunks=5, rows_per_chunk=1,
                           dtype=0, stream=0)


@needs_ext
def test_cuda_errors_become_runtime_errors_with_cuda_message():
    """The occupancy query needs a device: without one, CUDA's own message comes back as RuntimeError."""
    ext = _extension.cuda_ext
    if HAS_GPU:
        assert ext.adaln_backward_blocks_per_sm(channels=1152, dtype=2) >= 1
    else:
        with pytest.raises(RuntimeError, match="dit_fast CUDA error in cudaOccupancy"):
            ext.adaln_backward_blocks_per_sm(channels=1152, dtype=2)


@needs_ext
def test_launchers_handle_zero_tokens_without_a_launch():
    """N = 0: outputs are empty and the per-group / per-column gradient sums are zeros."""
    from dit_fast.cuda import adaln as cuda_adaln

    device = "cuda" if HAS_GPU else "cpu"
    B, N, G, C = 2, 0, 1, 8
    x, mod, w = torch.empty(B, N, C, device=device), torch.randn(B, G, C, device=device), torch.randn(C, device=device)
    h, out, mean, rstd = cuda_adaln.adaln_forward(x, mod, x, mod, mod, w, None, 1e-6)
    assert h.shape == out.shape == (B, N, C) and mean.shape == rstd.shape == (0,)
    dx, dbranch, dgate, dshift, dscale, dweight, dbias = cuda_adaln.adaln_backward(
        x, x, x, mod, x, mod, w, None, mean, rstd, G)
    assert dx.shape == dbranch.shape == (B, N, C) and dbias is None
    for grad, shape in ((dgate, (B, G, C)), (dshift, (B, G, C)), (dscale, (B, G, C)), (dweight, (C,))):
        assert grad.shape == shape and not grad.any()


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("op", ["layernorm_modulate", "gated_residual", "residual_layernorm_modulate"])
def test_cuda_backend_on_cpu_tensors_says_why(op):
    B, N, C = 2, 3, 8
    x, y, mod = torch.randn(B, N, C), torch.randn(B, N, C), torch.randn(B, C)
    calls = {
        "layernorm_modulate": lambda: ops.layernorm_modulate(x, mod, mod, backend="cuda"),
        "gated_residual": lambda: ops.gated_residual(x, mod, y, backend="cuda"),
        "residual_layernorm_modulate": lambda: ops.residual_layernorm_modulate(x, mod, y, mod, mod, backend="cuda"),
    }
    with pytest.raises(dit_fast.BackendUnavailableError, match="needs tensors on a CUDA device, got cpu"):
        calls[op]()
    with dit_fast.use_backend("cuda"), pytest.raises(dit_fast.BackendUnavailableError, match="CUDA device"):
        calls[op]()


# ---------------------------------------------------------------------------------------------
# csrc/compile_check.sh: passes on good code, fails on broken code, reports registers and spills
# ---------------------------------------------------------------------------------------------

GOOD_KERNEL = """
#include "common.h"
__global__ void scale_kernel(float* y, const float* x, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i];
}
"""
BROKEN_KERNEL = """
__global__ void broken_kernel(float* y) { y[threadIdx.x] = undefined_name; }
"""


def _run_compile_check(tmp_path, sources):
    """Runs a copy of the script over a csrc/ holding only ``sources`` (plus the real common.h)."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    shutil.copy(COMPILE_CHECK, csrc / "compile_check.sh")
    shutil.copy(ROOT / "csrc" / "common.h", csrc / "common.h")
    for name, text in sources.items():
        (csrc / name).write_text(text)
    return subprocess.run(["bash", str(csrc / "compile_check.sh")], capture_output=True, text=True, timeout=300)


def test_compile_check_script_is_wired_into_ci():
    assert COMPILE_CHECK.exists()
    assert "csrc/compile_check.sh" in (ROOT / ".ci" / "run").read_text()
    assert subprocess.run(["bash", "-n", str(COMPILE_CHECK)]).returncode == 0


@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc")
def test_compile_check_reports_registers_of_good_kernels(tmp_path):
    result = _run_compile_check(tmp_path, {"good.cu": GOOD_KERNEL})
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(l for l in result.stdout.splitlines() if "scale_kernel" in l)
    regs, spill_stores, spill_loads = (int(v) for v in line.split()[2:5])
    assert regs > 0 and spill_stores == 0 and spill_loads == 0, line


@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc")
def test_compile_check_fails_on_a_broken_kernel(tmp_path):
    result = _run_compile_check(tmp_path, {"good.cu": GOOD_KERNEL, "broken.cu": BROKEN_KERNEL})
    assert result.returncode != 0
    assert "FAILED  broken.cu" in result.stdout and "undefined_name" in result.stdout


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA backend against the float64 reference, forward and every gradient
# ---------------------------------------------------------------------------------------------


def _naive_layernorm_modulate(x, shift, scale, weight=None, bias=None, eps=1e-6):
    """The math a user writes, in the input dtype: PyTorch's own error in that dtype."""
    N = x.shape[1]
    normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return normed * (1 + A.expand_modulation(scale, N)) + A.expand_modulation(shift, N)


def _naive_gated_residual(x, gate, y):
    return x + A.expand_modulation(gate, x.shape[1]) * y


def _naive_residual_layernorm_modulate(x, gate, y, shift, scale, eps=1e-6):
    h = _naive_gated_residual(x, gate, y)
    return h, _naive_layernorm_modulate(h, shift, scale, eps=eps)


def _compare(fn_cuda, fn_naive, fn_reference, inputs, names, dtype):
    """Outputs and the gradients of every input: CUDA vs float64 reference, bounded by torch's error."""

    def run(fn, cast):
        leaves = [None if t is None else t.detach().to(cast).requires_grad_(True) for t in inputs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator(device="cuda").manual_seed(1)
        grad_outs = [torch.randn(o.shape, device="cuda", generator=gen).to(cast) for o in outs]
        grads = torch.autograd.grad(outs, [t for t in leaves if t is not None], grad_outs)
        return outs, grads

    out_c, grad_c = run(fn_cuda, dtype)
    out_n, grad_n = run(fn_naive, dtype)
    out_r, grad_r = run(fn_reference, torch.float64)
    for i, (c, n, r) in enumerate(zip(out_c, out_n, out_r)):
        assert c.dtype == dtype
        assert_close_to_reference(f"output {i}", c, r, n)
    for name, c, n, r in zip([n for n, t in zip(names, inputs) if t is not None], grad_c, grad_n, grad_r):
        assert c.dtype == dtype, f"grad of {name} has dtype {c.dtype}"
        assert_close_to_reference(f"grad of {name}", c, r, n)


def _rand(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, device="cuda", dtype=torch.float32)).to(dtype)


def _mod(B, G, C, dtype, per_group):
    return _rand(*((B, G, C) if per_group else (B, C)), dtype=dtype, scale=0.5)


# C: odd (scalar path), DiT widths (128-bit path, 8 elements per thread), 5120 (16 per thread),
# 8191 (scalar, 1024 threads) and 16384 (128-bit, 1024 threads).
CHANNELS = [37, 1152, 3072, 5120, 8191, 16384]
# (B, N, G): several groups of tokens, rows that do not fill a wave of blocks
TOKENS = [(2, 12, 3), (3, 5, 1)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("B,N,G", TOKENS)
@pytest.mark.parametrize("per_group", [False, True])
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_layernorm_modulate_cuda(dtype, C, B, N, G, per_group, affine):
    x = _rand(B, N, C, dtype=dtype)
    shift, scale = _mod(B, G, C, dtype, per_group), _mod(B, G, C, dtype, per_group)
    weight = _rand(C, dtype=dtype, scale=0.1) + 1 if affine != "none" else None
    bias = _rand(C, dtype=dtype, scale=0.1) if affine == "both" else None
    _compare(lambda *a: ops.layernorm_modulate(*a[:3], weight=a[3], bias=a[4], backend="cuda"),
             _naive_layernorm_modulate, A.layernorm_modulate_reference,
             [x, shift, scale, weight, bias], ["x", "shift", "scale", "weight", "bias"], dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("B,N,G", TOKENS)
@pytest.mark.parametrize("per_group", [False, True])
def test_gated_residual_cuda(dtype, C, B, N, G, per_group):
    x, y = _rand(B, N, C, dtype=dtype), _rand(B, N, C, dtype=dtype)
    gate = _mod(B, G, C, dtype, per_group)
    _compare(lambda *a: ops.gated_residual(*a, backend="cuda"), _naive_gated_residual, A.gated_residual_reference,
             [x, gate, y], ["x", "gate", "y"], dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("B,N,G", TOKENS)
@pytest.mark.parametrize("per_group", [False, True])
def test_residual_layernorm_modulate_cuda(dtype, C, B, N, G, per_group):
    x, y = _rand(B, N, C, dtype=dtype), _rand(B, N, C, dtype=dtype)
    gate, shift, scale = (_mod(B, G, C, dtype, per_group) for _ in range(3))
    _compare(lambda *a: ops.residual_layernorm_modulate(*a, backend="cuda"),
             _naive_residual_layernorm_modulate, A.residual_layernorm_modulate_reference,
             [x, gate, y, shift, scale], ["x", "gate", "y", "shift", "scale"], dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_per_backward_chunk_cuda(dtype):
    """Enough tokens per group that each backward block loops over several rows (partial sums per chunk)."""
    from dit_fast.cuda import adaln as cuda_adaln

    B, N, G, C = 2, 6000, 2, 96
    chunks = cuda_adaln._backward_chunks(B * G, N // G, C, _extension.dtype_code(torch.empty(0, dtype=dtype)),
                                         torch.device("cuda"))
    assert chunks < N // G, "the case must put several rows in one chunk"
    x, y = _rand(B, N, C, dtype=dtype), _rand(B, N, C, dtype=dtype)
    gate, shift, scale = (_mod(B, G, C, dtype, True) for _ in range(3))
    _compare(lambda *a: ops.residual_layernorm_modulate(*a, backend="cuda"),
             _naive_residual_layernorm_modulate, A.residual_layernorm_modulate_reference,
             [x, gate, y, shift, scale], ["x", "gate", "y", "shift", "scale"], dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_pointers_use_the_scalar_path_cuda(dtype):
    """Contiguous tensors that start one element into their storage cannot use 128-bit accesses."""
    B, N, C = 2, 4, 1152

    def offset_by_one(*shape):
        flat = _rand(1 + torch.Size(shape).numel(), dtype=dtype)
        return flat[1:].view(*shape)

    x, y = offset_by_one(B, N, C), offset_by_one(B, N, C)
    gate, shift, scale = offset_by_one(B, C), offset_by_one(B, C), offset_by_one(B, C)
    assert x.data_ptr() % 16 != 0
    _compare(lambda *a: ops.residual_layernorm_modulate(*a, backend="cuda"),
             _naive_residual_layernorm_modulate, A.residual_layernorm_modulate_reference,
             [x, gate, y, shift, scale], ["x", "gate", "y", "shift", "scale"], dtype)
    weight, bias = offset_by_one(C), offset_by_one(C)
    _compare(lambda *a: ops.layernorm_modulate(*a[:3], weight=a[3], bias=a[4], backend="cuda"),
             _naive_layernorm_modulate, A.layernorm_modulate_reference,
             [x, shift, scale, weight, bias], ["x", "shift", "scale", "weight", "bias"], dtype)


@needs_gpu
def test_cuda_matches_triton_closely():
    """Same math in both backends: bf16 outputs agree to within one rounding step."""
    B, N, C = 2, 33, 1152
    x, y = _rand(B, N, C, dtype=torch.bfloat16), _rand(B, N, C, dtype=torch.bfloat16)
    gate, shift, scale = (_mod(B, 3, C, torch.bfloat16, True) for _ in range(3))
    h_c, out_c = ops.residual_layernorm_modulate(x, gate, y, shift, scale, backend="cuda")
    h_t, out_t = ops.residual_layernorm_modulate(x, gate, y, shift, scale, backend="triton")
    torch.testing.assert_close(h_c, h_t, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out_c, out_t, rtol=1e-2, atol=2e-2)


@needs_gpu
def test_cuda_backend_on_a_side_stream():
    """Kernels run on torch's current stream: results are ready after that stream is synchronised."""
    B, N, C = 2, 64, 1152
    x = _rand(B, N, C, dtype=torch.bfloat16)
    shift, scale = _mod(B, 1, C, torch.bfloat16, False), _mod(B, 1, C, torch.bfloat16, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.layernorm_modulate(x, shift, scale, backend="cuda")
    stream.synchronize()
    want = A.layernorm_modulate_reference(x, shift, scale)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
