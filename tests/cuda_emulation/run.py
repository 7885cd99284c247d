"""Runs the CUDA kernels of csrc/*.cu on the CPU, for machines without a GPU (tests/test_cuda_emulation.py).

    python tests/cuda_emulation/run.py [FAMILY ...]    # exit status 0 when every check passes

The torch-free sources csrc/{adaln,rope,patchify,galore}.cu are compiled as host C++ (g++ -std=c++20)
against the stand-in headers in fake/: each CUDA thread is a fiber, __syncthreads a block barrier,
__shfl_*_sync a real exchange between the 32 lanes of a warp, blocks one after another over the
grid (fake/cuda_runtime.h); each ``kernel<<<...>>>(args)`` is rewritten to ``emu_launch(...)``. The
module binds the real csrc/bind_*.cpp and replaces dit_fast._C; CPU tensors stand in for device
memory. The checks go through the real Python launchers in dit_fast/cuda/ (adaLN also through the
public ops: backend="cuda", custom ops, autograd) against the PyTorch references.

It exercises indexing, vector widths and their fallbacks, launch-shape variants, shared-memory
staging, block and warp reductions and the 8-bit requantization; it says nothing about speed,
coalescing or warp timing. The GPU tests (tests/test_cuda_extension.py, test_rope.py, test_patchify.py,
test_galore_kernels.py) remain the real test. The built module is cached in the temp dir under a hash
of everything that goes into it.
"""

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
FAMILIES = ("adaln", "rope", "patchify", "galore")
# Measured on 2 cores: the build's long pole is the pybind11 unit (~6 s at -O0; it only passes integers),
# the kernel units build beside it, where -O1 costs ~1 s of CPU more than -O0 and makes the emulated
# kernels ~15% faster (1.6 s instead of 1.85 s for all checks); -O2 builds longer for nothing.
KERNEL_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread"]
BIND_FLAGS = ["-std=c++20", "-O0", "-fPIC", "-fvisibility=hidden"]
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(([^;]*)\);", re.S)
DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:][\w:\s]*?)\s+(\w+)\[\];")


# ---------------------------------------------------------------------------------------------
# Build and load
# ---------------------------------------------------------------------------------------------


def _split_top_level(text):
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def _launch(match):
    kernel, config, args = match.group(1), _split_top_level(match.group(2)), match.group(3)
    config += ["0", "nullptr"][len(config) - 2:]  # <<<grid, block[, smem[, stream]]>>>
    return f"emu_launch({kernel}, {', '.join(config)}{', ' + args if args.strip() else ''});"


def emulated_source(family):
    """csrc/<family>.cu with launches through emu_launch and dynamic shared memory from the emulator."""
    source, count = LAUNCH.subn(_launch, (CSRC / f"{family}.cu").read_text())
    assert count > 0, f"no kernel launch found in csrc/{family}.cu"
    source = DYNAMIC_SMEM.sub(r"\1* \2 = reinterpret_cast<\1*>(emu_dynamic_smem);", source)
    assert "extern __shared__" not in source, f"an extern __shared__ declaration in csrc/{family}.cu was not rewritten"
    return source


def module_source():
    """One translation unit for the whole pybind11 layer: pybind11's headers are parsed once."""
    includes = "".join(f'#include "bind_{f}.cpp"\n' for f in FAMILIES)
    calls = " ".join(f"bind_{f}(m);" for f in FAMILIES)
    return f"{includes}PYBIND11_MODULE(_C_emu, m) {{ {calls} }}\n"


def build():
    """Compiles (or finds in the cache) the emulated extension; returns the path of the shared library."""
    import pybind11

    includes = [f"-I{HERE / 'fake'}", f"-I{CSRC}", f"-I{pybind11.get_include()}",
                f"-I{sysconfig.get_paths()['include']}"]
    units = {f"{f}_emu.cpp": (emulated_source(f), KERNEL_FLAGS) for f in FAMILIES}
    units["module_emu.cpp"] = (module_source(), BIND_FLAGS)
    inputs = sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("bind_*.cpp")) + sorted((HERE / "fake").glob("*.h"))
    digest = hashlib.sha256(repr(sorted((n, s, f) for n, (s, f) in units.items())).encode())
    for path in inputs:
        digest.update(path.name.encode() + path.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / f"dit_fast_cuda_emulation_{digest.hexdigest()[:16]}"
    lib = out_dir / ("_C_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir))  # private to this build: concurrent builds do not mix files
    print(f"building the emulated kernels in {work}", flush=True)
    jobs = []
    for name, (text, flags) in units.items():  # one g++ per translation unit, in parallel
        (work / name).write_text(text)
        jobs.append(subprocess.Popen(["g++", *flags, *includes, "-c", str(work / name), "-o", str(work / f"{name}.o")]))
    if any([job.wait() for job in jobs]):
        raise SystemExit(f"building the emulated kernels failed (g++ output above; sources in {work})")
    objects = [str(work / f"{name}.o") for name in units]
    subprocess.run(["g++", "-shared", "-pthread", *objects, "-o", str(work / lib.name)], check=True)
    (work / lib.name).replace(lib)  # atomic: a concurrent run sees a complete library or none
    shutil.rmtree(work)
    return lib


def load(lib):
    spec = importlib.util.spec_from_file_location("_C_emu", lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(module):
    """The emulated module replaces dit_fast._C; CPU tensors stand in for device memory."""
    import torch

    from dit_fast import _backend, _extension
    from dit_fast.cuda import adaln as cuda_adaln

    _extension.cuda_ext = module
    _extension.stream_handle = lambda tensor: 0
    torch.cuda.device = lambda device: contextlib.nullcontext()
    real_reason = _backend.unavailable_reason
    _backend.unavailable_reason = lambda name, device: None if name == "cuda" else real_reason(name, device)
    # a small "GPU": few blocks per modulation row, so that backward chunks hold several rows
    cuda_adaln._backward_chunks = lambda groups, tokens, channels, code, device: max(1, min(tokens, -(-3 // groups)))


class Checks:
    """Runs each check, prints ``ok    label`` or ``FAIL  label`` and the reason, keeps going."""

    def __init__(self):
        self.passed, self.failed = 0, []

    def __call__(self, label, fn, *args):
        try:
            detail = fn(*args)
        except Exception as exc:  # an assertion, or an error raised by the launcher or the emulator
            print(f"FAIL  {label}\n{type(exc).__name__}: {exc}", flush=True)
            self.failed.append(label)
        else:
            self.passed += 1
            print(f"ok    {label}{': ' + detail if detail else ''}", flush=True)


# ---------------------------------------------------------------------------------------------
# adaLN (csrc/adaln.cu) through the public ops: forward and every gradient
# ---------------------------------------------------------------------------------------------


def check_adaln(check):
    import torch
    import torch.nn.functional as F

    from dit_fast import ops
    from dit_fast.ops import adaln as A
    from tests.utils import assert_close_to_reference

    def naive_layernorm_modulate(x, shift, scale, weight=None, bias=None, eps=1e-6):
        N = x.shape[1]
        normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return normed * (1 + A.expand_modulation(scale, N)) + A.expand_modulation(shift, N)

    def naive_gated_residual(x, gate, y):
        return x + A.expand_modulation(gate, x.shape[1]) * y

    def naive_residual_layernorm_modulate(x, gate, y, shift, scale, eps=1e-6):
        h = naive_gated_residual(x, gate, y)
        return h, naive_layernorm_modulate(h, shift, scale, eps=eps)

    def compare(fn_cuda, fn_naive, fn_reference, inputs, names, dtype):
        def run(fn, cast):
            leaves = [None if t is None else t.detach().to(cast).requires_grad_(True) for t in inputs]
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            gen = torch.Generator().manual_seed(1)
            grad_outs = [torch.randn(o.shape, generator=gen).to(cast) for o in outs]
            return outs, torch.autograd.grad(outs, [t for t in leaves if t is not None], grad_outs)

        out_c, grad_c = run(fn_cuda, dtype)
        out_n, grad_n = run(fn_naive, dtype)
        out_r, grad_r = run(fn_reference, torch.float64)
        for i, (c, n, r) in enumerate(zip(out_c, out_n, out_r)):
            assert c.dtype == dtype, f"output {i} has dtype {c.dtype}"
            assert_close_to_reference(f"output {i}", c, r, n)
        present = [n for n, t in zip(names, inputs) if t is not None]
        for name, c, n, r in zip(present, grad_c, grad_n, grad_r):
            assert c.dtype == dtype, f"grad of {name} has dtype {c.dtype}"
            assert_close_to_reference(f"grad of {name}", c, r, n)

    def layernorm_modulate(*a):
        return ops.layernorm_modulate(*a[:3], weight=a[3], bias=a[4], backend="cuda")

    def gated_residual(*a):
        return ops.gated_residual(*a, backend="cuda")

    def residual_layernorm_modulate(*a):
        return ops.residual_layernorm_modulate(*a, backend="cuda")

    LN = (layernorm_modulate, naive_layernorm_modulate, A.layernorm_modulate_reference)
    GR = (gated_residual, naive_gated_residual, A.gated_residual_reference)
    RLN = (residual_layernorm_modulate, naive_residual_layernorm_modulate, A.residual_layernorm_modulate_reference)
    LN_NAMES, GR_NAMES = ["x", "shift", "scale", "weight", "bias"], ["x", "gate", "y"]
    RLN_NAMES = ["x", "gate", "y", "shift", "scale"]

    def rand(*shape, dtype, scale=1.0):
        return (scale * torch.randn(*shape)).to(dtype)

    def mod(B, G, C, dtype, per_group):
        return rand(*((B, G, C) if per_group else (B, C)), dtype=dtype, scale=0.5)

    def misaligned(t):
        """A contiguous copy starting one element into its storage: no 128-bit accesses."""
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)

    # (B, N, G, C): C = 37 and 100 scalar, 64 / 1152 vectorised with <= 256 threads, 5120 the
    # 16-elements-per-thread variant, 8200 (fp32: 16 x 1024 threads) and 4100 (scalar, 16 x 1024)
    cases = [(2, 6, 3, 37), (1, 5, 1, 100), (3, 4, 2, 64), (1, 4, 2, 1152), (1, 2, 1, 5120), (1, 2, 1, 4100)]
    for B, N, G, C in cases:
        dtypes = (torch.float32, torch.float16, torch.bfloat16) if C <= 1152 else (torch.float32, torch.bfloat16)
        for dtype in dtypes:
            for per_group in (False, True):
                shape = f"B={B} N={N} G={G if per_group else '-'} C={C} {str(dtype)[6:]}"
                x, y = rand(B, N, C, dtype=dtype), rand(B, N, C, dtype=dtype)
                gate, shift, scale = (mod(B, G, C, dtype, per_group) for _ in range(3))
                weight, bias = rand(C, dtype=dtype, scale=0.1) + 1, rand(C, dtype=dtype, scale=0.1)
                affine = [(None, None), (weight, None), (weight, bias)] if C <= 1152 else [(weight, bias)]
                for w, b in affine:
                    check(f"layernorm_modulate {shape} weight={w is not None} bias={b is not None}",
                          compare, *LN, [x, shift, scale, w, b], LN_NAMES, dtype)
                check(f"gated_residual {shape}", compare, *GR, [x, gate, y], GR_NAMES, dtype)
                check(f"residual_layernorm_modulate {shape}", compare, *RLN, [x, gate, y, shift, scale], RLN_NAMES,
                      dtype)

    # C > 8192: the 1024-thread variant that reloads rows in the backward (fp32 and bf16)
    for dtype in (torch.float32, torch.bfloat16):
        B, N, G, C = 1, 2, 2, 16384
        x, y = rand(B, N, C, dtype=dtype), rand(B, N, C, dtype=dtype)
        gate, shift, scale = (mod(B, G, C, dtype, True) for _ in range(3))
        check(f"residual_layernorm_modulate B={B} N={N} G={G} C={C} {str(dtype)[6:]}",
              compare, *RLN, [x, gate, y, shift, scale], RLN_NAMES, dtype)

    # misaligned pointers with C a multiple of 8: the scalar fallback
    B, N, G, C = 2, 4, 2, 64
    for dtype in (torch.float32, torch.bfloat16):
        x, y = misaligned(rand(B, N, C, dtype=dtype)), misaligned(rand(B, N, C, dtype=dtype))
        gate, shift, scale = (misaligned(mod(B, G, C, dtype, True)) for _ in range(3))
        weight, bias = misaligned(rand(C, dtype=dtype) + 1), misaligned(rand(C, dtype=dtype))
        assert x.data_ptr() % 16 != 0
        check(f"misaligned residual_layernorm_modulate C={C} {str(dtype)[6:]}",
              compare, *RLN, [x, gate, y, shift, scale], RLN_NAMES, dtype)
        check(f"misaligned layernorm_modulate C={C} {str(dtype)[6:]}",
              compare, *LN, [x, shift, scale, weight, bias], LN_NAMES, dtype)


# ---------------------------------------------------------------------------------------------
# RoPE (csrc/rope.cu) and patchify (csrc/patchify.cu) through dit_fast/cuda/{rope,patchify}.py
# ---------------------------------------------------------------------------------------------

FLOOR = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def check_rope(check):
    import torch

    from dit_fast.cuda import rope as cuda_rope
    from dit_fast.ops import rope as R

    def rope(x, grid, split=None, theta=10000.0):
        D = x.shape[-1]
        split = R.rope_split(D, split)
        table = R.rope_inv_freq_reference(D, theta, split)
        out = cuda_rope.rope_3d(x, grid, table, split, False)
        back = cuda_rope.rope_3d(out, grid, table, split, True)
        ref = R.apply_rope_3d_reference(x, grid, theta, split)
        ref64 = R.apply_rope_3d_reference(x.double(), grid, theta, split)
        err = (out.double() - ref64).abs().max().item()
        torch_err = (ref.double() - ref64).abs().max().item()
        undo_err = (back.double() - x.double()).abs().max().item()
        floor = FLOOR[str(x.dtype)[6:]]
        detail = f"err {err:.1e} (torch {torch_err:.1e}), inverse err {undo_err:.1e}"
        assert err <= 2 * torch_err + floor * max(1.0, ref64.abs().max().item()), detail
        assert undo_err <= 4 * floor * max(1.0, x.abs().max().item()), detail
        return detail

    def case(x, grid, split=None):
        check(f"rope {tuple(x.shape)} {x.dtype} strides {x.stride()} split {split}", rope, x, grid, split)

    grid = (3, 5, 7)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        case(torch.randn(2, 105, 3, 72, dtype=dtype), grid)  # 128-bit accesses
        case(torch.randn(1, 105, 2, 64, dtype=dtype), grid, (16, 32, 16))  # custom split
    case(torch.randn(2, 105, 3, 3, 72)[:, :, 1], grid)  # slice of a packed qkv, in place
    case(torch.randn(2, 105, 2, 74)[..., :72], grid)  # even strides, not 16-byte multiples: one pair per access
    case(torch.randn(1, 105, 1, 66, dtype=torch.float16), grid)  # D = 66: one pair per access
    case(torch.randn(1, 2 * 3 * 41, 1, 24), (2, 3, 41), (8, 8, 8))  # angles of tens of radians


def check_patchify(check):
    import torch

    from dit_fast.cuda import patchify as cuda_patchify
    from dit_fast.ops import patchify as P

    def roundtrip(video, patch, order):
        tokens = cuda_patchify.patchify_3d(video, patch, order == "thwc")
        grid = tuple(d // p for d, p in zip(video.shape[2:], patch))
        back = cuda_patchify.unpatchify_3d(tokens, patch, grid, order == "thwc")
        assert torch.equal(tokens, P.patchify_3d_reference(video, patch, order)), "patchify differs from the reference"
        assert torch.equal(back, video), "unpatchify does not restore the video"

    def case(video, patch, order):
        check(f"patchify {tuple(video.shape)} {video.dtype} strides {video.stride()} patch {patch} {order}",
              roundtrip, video, patch, order)

    for patch, shape in (((1, 2, 2), (2, 3, 3, 10, 14)), ((2, 2, 2), (1, 5, 6, 10, 14)), ((1, 2, 2), (1, 16, 2, 4, 6))):
        for order in ("cthw", "thwc"):
            for dtype in (torch.float32, torch.float16):  # K * e = 48 / 24, 160 / 80, 256 / 128 bytes
                case(torch.randn(shape, dtype=dtype), patch, order)
    case(torch.randn(2, 3, 3, 10, 17)[..., 1:-2], (1, 2, 2), "cthw")  # cropped video
    case(torch.randn(2, 3, 3, 10, 14).to(memory_format=torch.channels_last_3d), (1, 2, 2), "thwc")
    case(torch.randn(1, 1100, 1, 2, 40), (1, 2, 2), "cthw")  # 17.6 KB tokens: one per block, rows split


# ---------------------------------------------------------------------------------------------
# GaLoreAdamW's Adam step (csrc/galore.cu) through dit_fast/cuda/galore.py; the same comparisons as
# tests/test_galore_kernels.py. (project_back_update is cuBLAS through torch.addmm_: no kernel here.)
# ---------------------------------------------------------------------------------------------


def check_galore(check):
    import torch

    from dit_fast.cuda import galore as cuda_galore
    from dit_fast.optim import reference as ref
    from tests.utils import assert_close_to_reference

    def moments(shape, state_dtype, steps_before=2):
        """Moments after a few reference steps on random gradients (so absmax blocks differ)."""
        if state_dtype == "int8":
            blocks = -(-shape[0] * shape[1] // ref.QBLOCK)
            m, v = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.uint8)
            ma, va = torch.zeros(blocks), torch.zeros(blocks)
            for _ in range(steps_before):
                ref.adam_moments_8bit_reference(torch.randn(shape), m, ma, v, va, 0.9, 0.99, 1e-8)
            return [m, v, ma, va]
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[state_dtype]
        m, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        for _ in range(steps_before):
            ref.adam_moments_reference(torch.randn(shape), m, v, 0.9, 0.99, 1e-8)
        return [m, v, None, None]

    def reference_step(grad, state, beta1, beta2, eps):
        m, v, ma, va = state
        if m.dtype == torch.int8:
            return ref.adam_moments_8bit_reference(grad, m, ma, v, va, beta1, beta2, eps)
        return ref.adam_moments_reference(grad, m, v, beta1, beta2, eps)

    def adam_step(state_dtype, grad_dtype, shape):
        grad = torch.randn(shape).to(grad_dtype)
        ours = moments(shape, state_dtype)
        theirs = [t.clone() if t is not None else None for t in ours]
        n = cuda_galore.adam_step(grad, *ours, 0.9, 0.99, 1e-8)
        n_ref = reference_step(grad, theirs, 0.9, 0.99, 1e-8)
        if state_dtype == "int8":
            # same formula; a value on a rounding boundary may land one code apart (fma contraction)
            for a, b in zip(ours[:2], theirs[:2]):
                diff = (a.int() - b.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02, f"codes differ: {diff.max()}"
            torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=0)
            torch.testing.assert_close(ours[3], theirs[3], rtol=1e-6, atol=0)
            torch.testing.assert_close(n, n_ref, rtol=1e-5, atol=1e-6)
        else:
            tol = dict(rtol=1e-5, atol=1e-6) if state_dtype == "fp32" else dict(rtol=8e-3, atol=1e-5)
            torch.testing.assert_close(ours[0].float(), theirs[0].float(), **tol)
            torch.testing.assert_close(ours[1].float(), theirs[1].float(), **tol)
            torch.testing.assert_close(n, n_ref, rtol=1e-4, atol=1e-5)

    def updates_param(state_dtype, param_dtype):
        shape = (7, 3, 19)  # a non-2-D parameter, 399 elements: a partial second 8-bit block
        w = torch.randn(shape).to(param_dtype)
        grad = torch.randn(shape).to(param_dtype)
        ours = moments((7, 57), state_dtype)
        ours = [t.view(shape) if t is not None and t.numel() == w.numel() else t for t in ours]
        theirs = [t.clone() if t is not None else None for t in ours]
        w_ours = w.clone()
        out = cuda_galore.adam_step(grad, *ours, 0.9, 0.999, 1e-8, param=w_ours, alpha=0.01, pre_decay=0.999,
                                    post_decay=1.0)
        assert out is None
        n = reference_step(grad, theirs, 0.9, 0.999, 1e-8)
        expected = w.double() * 0.999 - 0.01 * n.double()
        in_dtype = (w.float() * 0.999 - 0.01 * n).to(param_dtype)
        assert_close_to_reference("param", w_ours, expected, in_dtype)

    for state_dtype in ("fp32", "bf16", "int8"):
        for grad_dtype in (torch.float32, torch.bfloat16):
            for shape in ((37, 8), (53, 29)):
                check(f"galore adam_step state={state_dtype} grad={str(grad_dtype)[6:]} shape={shape}",
                      adam_step, state_dtype, grad_dtype, shape)
    for state_dtype in ("fp32", "int8"):
        for param_dtype in (torch.float32, torch.bfloat16):
            check(f"galore adam_step in place state={state_dtype} param={str(param_dtype)[6:]}",
                  updates_param, state_dtype, param_dtype)


# ---------------------------------------------------------------------------------------------


CHECKS = {"adaln": check_adaln, "rope": check_rope, "patchify": check_patchify, "galore": check_galore}


def main(families):
    sys.path.insert(0, str(ROOT))
    import torch

    unknown = set(families) - set(CHECKS)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; choose from {list(CHECKS)}")
    install(load(build()))
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only contend (and the kernels use one thread)
    check = Checks()
    for family in families or CHECKS:
        torch.manual_seed(0)
        CHECKS[family](check)
    total = check.passed + len(check.failed)
    if check.failed:
        print(f"\n{len(check.failed)} of {total} emulated CUDA checks failed")
        return 1
    print(f"\nall {total} emulated CUDA checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
