"""Comparison helpers: tolerances relative to PyTorch's own error in the same dtype (flash-attn's rule)."""

import torch

# floor on the allowed error, per dtype, for values of order one
ATOL_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def describe_mismatch(actual, expected, atol, max_show=5):
    """A message naming the worst and the first mismatching indices, NaNs and infs."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    err = (actual - expected).abs()
    bad = (err > atol) | actual.isnan() | actual.isinf()
    idx = bad.nonzero()[:max_show].tolist()
    lines = [f"{int(bad.sum())}/{bad.numel()} elements off; max err {err.nan_to_num(float('inf')).max():.3g} "
             f"(allowed {atol:.3g}); nan: {int(actual.isnan().sum())}, inf: {int(actual.isinf().sum())}"]
    for i in idx:
        lines.append(f"  at {tuple(i)}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}")
    return "\n".join(lines)


def assert_close_to_reference(name, actual, reference_fp64, torch_same_dtype, factor=2.0, dtype=None):
    """``|actual - ref| <= factor * max(|torch_in_dtype - ref|) + floor``, elementwise max.

    reference_fp64: the reference evaluated in float64; torch_same_dtype: the reference evaluated in
    the kernel's dtype, whose error is PyTorch's own in that dtype.
    """
    dtype = dtype or actual.dtype
    assert actual.shape == reference_fp64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference_fp64.shape)}"
    scale = reference_fp64.detach().abs().max().item() if reference_fp64.numel() else 1.0
    torch_err = (torch_same_dtype.detach().double() - reference_fp64.detach().double()).abs().max().item()
    atol = factor * torch_err + ATOL_FLOOR[dtype] * max(1.0, scale)
    err = (actual.detach().double() - reference_fp64.detach().double()).abs()
    ok = bool((err <= atol).all()) and not bool(actual.isnan().any())
    assert ok, f"{name} ({dtype}):\n" + describe_mismatch(actual, reference_fp64, atol)


REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def compile_in_subprocess(args, python=None, timeout=600):
    """Rows of ``python -m benchmarks.kernel_resources *args --json`` run in a clean process.

    The sm_90a compile report needs Triton's real compiler: the process runs without
    TRITON_INTERPRET (which is read when kernels are defined). ``python``: another interpreter, e.g. a
    venv with Triton 3.6 (the GPU machine's version), with this checkout on its PYTHONPATH.
    Returns the list of row dicts; fails the test with the child's stderr if it exits non-zero.
    """
    import json
    import os
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        proc = subprocess.run([python or sys.executable, "-m", "benchmarks.kernel_resources", *map(str, args),
                               "--json", out], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO_ROOT)
        assert proc.returncode == 0, f"kernel_resources {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}"
        with open(out) as f:
            return json.load(f)
