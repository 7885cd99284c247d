"""GaLore kernels (Triton; on CPU through the interpreter) against the PyTorch reference.

Shapes are odd on purpose (37 x 53, rank 8 or 5, partial 8-bit blocks). The CUDA twins run the same
comparisons where a GPU and the compiled extension exist.
"""

import pytest
import torch

from dit_fast import _backend
from dit_fast.optim import GaLoreAdamW
from dit_fast.optim import reference as ref
from tests.conftest import HAS_GPU, kernel_devices
from tests.utils import assert_close_to_reference

DEVICE = kernel_devices()
BACKENDS = ["triton"] + (["cuda"] if HAS_GPU else [])


def _kernels(backend):
    if backend == "triton":
        from dit_fast.triton_kernels import galore

        return galore
    reason = _backend.unavailable_reason("cuda", torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    from dit_fast.cuda import galore

    return galore


def _moments(shape, state_dtype, steps_before=2):
    """Moments after a few reference steps on random gradients (so absmax blocks differ)."""
    if state_dtype == "int8":
        blocks = -(-shape[0] * shape[1] // ref.QBLOCK)
        m = torch.zeros(shape, dtype=torch.int8, device=DEVICE)
        v = torch.zeros(shape, dtype=torch.uint8, device=DEVICE)
        ma = torch.zeros(blocks, device=DEVICE)
        va = torch.zeros(blocks, device=DEVICE)
        for _ in range(steps_before):
            ref.adam_moments_8bit_reference(torch.randn(shape, device=DEVICE), m, ma, v, va, 0.9, 0.99, 1e-8)
        return [m, v, ma, va]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[state_dtype]
    m = torch.zeros(shape, dtype=dtype, device=DEVICE)
    v = torch.zeros(shape, dtype=dtype, device=DEVICE)
    for _ in range(steps_before):
        ref.adam_moments_reference(torch.randn(shape, device=DEVICE), m, v, 0.9, 0.99, 1e-8)
    return [m, v, None, None]


def _reference_step(grad, moments, beta1, beta2, eps):
    m, v, ma, va = moments
    if m.dtype == torch.int8:
        return ref.adam_moments_8bit_reference(grad, m, ma, v, va, beta1, beta2, eps)
    return ref.adam_moments_reference(grad, m, v, beta1, beta2, eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 8), (53, 29)])
def test_adam_step_matches_reference(backend, state_dtype, grad_dtype, shape):
    k = _kernels(backend)
    grad = torch.randn(shape, device=DEVICE).to(grad_dtype)
    ours = _moments(shape, state_dtype)
    theirs = [t.clone() if t is not None else None for t in ours]
    n = k.adam_step(grad, *ours, 0.9, 0.99, 1e-8)
    n_ref = _reference_step(grad, theirs, 0.9, 0.99, 1e-8)
    if state_dtype == "int8":
        # same formula; a value on a rounding boundary may land one code apart (fma contraction)
        for a, b in zip(ours[:2], theirs[:2]):
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=0)
        torch.testing.assert_close(ours[3], theirs[3], rtol=1e-6, atol=0)
        torch.testing.assert_close(n, n_ref, rtol=1e-5, atol=1e-6)
    else:
        tol = dict(rtol=1e-5, atol=1e-6) if state_dtype == "fp32" else dict(rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(ours[0].float(), theirs[0].float(), **tol)
        torch.testing.assert_close(ours[1].float(), theirs[1].float(), **tol)
        torch.testing.assert_close(n, n_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_adam_step_updates_a_plain_parameter(backend, state_dtype, param_dtype):
    k = _kernels(backend)
    shape = (7, 3, 19)  # a non-2-D parameter, 399 elements: a partial second 8-bit block
    w = torch.randn(shape, device=DEVICE).to(param_dtype)
    grad = torch.randn(shape, device=DEVICE).to(param_dtype)
    ours = _moments((7, 57), state_dtype)
    ours = [t.view(shape) if t is not None and t.numel() == w.numel() else t for t in ours]
    theirs = [t.clone() if t is not None else None for t in ours]
    w_ours = w.clone()
    assert k.adam_step(grad, *ours, 0.9, 0.999, 1e-8, param=w_ours, alpha=0.01, pre_decay=0.999, post_decay=1.0) is None
    n = _reference_step(grad, theirs, 0.9, 0.999, 1e-8)
    expected = w.double() * 0.999 - 0.01 * n.double()
    in_dtype = (w.float() * 0.999 - 0.01 * n).to(param_dtype)
    assert_close_to_reference("param", w_ours, expected, in_dtype)


def _basis(shape, rank, side, dtype):
    g = torch.randn(shape, device=DEVICE)
    return ref.svd_basis(g, rank, side, dtype)[0]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,rank", [((37, 53), 8), ((70, 33), 5), ((130, 67), 20)])
def test_project_back_update_matches_reference(side, param_dtype, shape, rank):
    from dit_fast.triton_kernels import galore as k

    basis = _basis(shape, rank, side, param_dtype)
    low_shape = (shape[0], basis.shape[0]) if side == "right" else (basis.shape[1], shape[1])
    w = torch.randn(shape, device=DEVICE).to(param_dtype)
    alpha, pre, post = 0.03, 0.99, 0.995
    n = torch.randn(low_shape, device=DEVICE)
    w_ours = w.clone()
    k.project_back_update(w_ours, n, basis, side, alpha, pre, post)
    expected = (w.double() * pre - alpha * ref.project_back(n.double(), side, (basis.double(),))) * post
    in_dtype = ((w.float() * pre - alpha * ref.project_back(n, side, (basis.float(),))) * post).to(param_dtype)
    assert_close_to_reference("param", w_ours, expected, in_dtype)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_down_project_adam_matches_reference(side, dtype):
    from dit_fast.triton_kernels import galore as k

    shape, rank = (37, 53), 8
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    basis = _basis(shape, rank, side, dtype)
    low = ref.project(grad, side, (basis,))
    ours_m = _moments(tuple(low.shape), "fp32")
    ref_m = [t.clone() if t is not None else None for t in ours_m]
    n = k.down_project_adam(grad, basis, side, ours_m[0], ours_m[1], 0.9, 0.99, 1e-8)
    n_ref = _reference_step(low, ref_m, 0.9, 0.99, 1e-8)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(n, n_ref, **tol)
    torch.testing.assert_close(ours_m[0], ref_m[0], **tol)


def test_bad_arguments_raise():
    from dit_fast.triton_kernels import galore as k

    w = torch.randn(10, 12, device=DEVICE)
    with pytest.raises(ValueError, match="side"):
        k.project_back_update(w, torch.randn(10, 3, device=DEVICE), torch.randn(3, 12, device=DEVICE), "top", 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="basis"):
        k.project_back_update(w, torch.randn(10, 3, device=DEVICE), torch.randn(4, 12, device=DEVICE), "right", 1.0, 1.0, 1.0)
    m = torch.zeros(10, 12, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="m_absmax"):
        k.adam_step(torch.randn(10, 12, device=DEVICE), m, torch.zeros_like(m, dtype=torch.uint8), None, None, 0.9, 0.9, 1e-8)


# ------------------------------------------------------------------ the optimizer on the kernel backend


def _two_layer(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.Tanh(), torch.nn.Linear(53, 37)).to(DEVICE, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proj_type,state_dtype,kernel,rank,param_dtype", [
    ("std", "fp32", "hybrid", 6, torch.float32), ("std", "fp32", "fused", 6, torch.float32),
    ("reverse_std", "bf16", "hybrid", 6, torch.float32), ("left", "bf16", "fused", 6, torch.float32),
    ("right", "int8", "hybrid", 6, torch.float32), ("full", "fp32", "hybrid", 6, torch.float32),
    ("std", "int8", "fused", 6, torch.float32), ("std", "fp32", "fused", 64, torch.float32),
    ("std", "fp32", "hybrid", 6, torch.bfloat16), ("reverse_std", "int8", "fused", 6, torch.bfloat16),
])
def test_optimizer_kernel_backend_matches_torch(backend, proj_type, state_dtype, kernel, rank, param_dtype):
    _kernels(backend)
    # rank >= the small dimension keeps the directions where the gradient is rounding noise; Adam
    # blows those up to +-1 (m / sqrt(v)), whatever the backend: a larger eps damps them
    eps = 1e-3 if rank >= 37 else 1e-8
    models, opts = [], []
    for name in ("torch", backend):
        model = _two_layer(param_dtype)
        groups = [dict(params=[model[0].weight, model[2].weight], rank=rank, update_proj_gap=2, scale=0.5,
                       proj_type=proj_type),
                  dict(params=[model[0].bias, model[2].bias])]
        opts.append(GaLoreAdamW(groups, lr=1e-2, eps=eps, weight_decay=0.1, state_dtype=state_dtype, kernel=kernel,
                                backend=name))
        models.append(model)
    x = torch.randn(16, 37, device=DEVICE, dtype=param_dtype)
    for _ in range(3):  # crosses a refresh at step 2
        # Both optimizers get the torch model's gradients: the comparison is of the optimizer alone.
        # Each model's own gradients would differ by the previous step's rounding, and a refresh's SVD
        # (cuSOLVER on a GPU) and Adam's m / sqrt(v) on tiny components can amplify that.
        for model, opt in zip(models, opts):
            opt.zero_grad()
        models[0](x).float().square().mean().backward()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    # lr 1e-2 over 3 steps: differences are rounding of N (and rare 8-bit code flips); bf16 weights
    # may round one ulp apart (|w| < 0.25: ulp <= 2^-10)
    atol = 2e-3 if param_dtype == torch.bfloat16 else (2e-5 if state_dtype != "int8" else 1e-4)
    moved = 0.0
    for (name, a), b, w0 in zip(models[0].named_parameters(), models[1].parameters(), _two_layer(param_dtype).parameters()):
        torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        moved = max(moved, (a.float() - w0.float()).abs().max().item())
    assert moved > 10 * atol, "the weights barely moved: the comparison would be vacuous"


# ------------------------------------------------------------------ GPU compilation without a GPU

_COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dit_fast.triton_kernels import galore as k

target = GPUTarget("cuda", 90, 32)


def compile_(fn, signature, constexprs):
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)


for quant in (False, True):
    for update in (False, True):
        state = "*i8" if quant else "*bf16"
        sig = {"G_ptr": "*bf16", "M_ptr": state, "V_ptr": "*u8" if quant else state, "MABS_ptr": "*fp32",
               "VABS_ptr": "*fp32", "N_ptr": "*fp32", "W_ptr": "*bf16", "numel": "i64", "beta1": "fp32",
               "beta2": "fp32", "eps": "fp32", "alpha": "fp32", "pre_decay": "fp32", "post_decay": "fp32",
               "BLOCK": "constexpr", "QUANT": "constexpr", "UPDATE_PARAM": "constexpr", "M_LEVELS_C": "constexpr",
               "V_LEVELS_C": "constexpr"}
        compile_(k._adam_moments_kernel, sig, {"BLOCK": 256 if quant else 1024, "QUANT": quant,
                                               "UPDATE_PARAM": update, "M_LEVELS_C": 127.0, "V_LEVELS_C": 255.0})
for ieee in (True, False):
    sig = {"W_ptr": "*bf16", "L_ptr": "*fp32", "R_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_lm": "i32", "stride_lk": "i32", "stride_rk": "i32", "stride_rn": "i32", "alpha": "fp32",
           "pre_decay": "fp32", "post_decay": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr", "IEEE": "constexpr"}
    compile_(k._project_back_kernel, sig, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "IEEE": ieee})
for dtype, ieee in (("fp32", True), ("bf16", False)):
    sig = {"A_ptr": "*" + dtype, "B_ptr": "*" + dtype, "MOM_M_ptr": "*fp32", "MOM_V_ptr": "*fp32", "OUT_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32",
           "stride_bn": "i32", "beta1": "fp32", "beta2": "fp32", "eps": "fp32", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "IEEE": "constexpr"}
    compile_(k._down_project_adam_kernel, sig, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "IEEE": ieee})
print("compiled")
'''


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the kernels are compiled and run by the tests above")
def test_triton_kernels_compile_for_sm90():
    """The interpreter does not lower kernels; Triton's compiler (with its bundled ptxas) does, GPU or not."""
    import os
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
