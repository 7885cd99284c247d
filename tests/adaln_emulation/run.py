"""Runs the adaLN CUDA kernels of csrc/adaln.cu on the CPU, for machines without a GPU.

    python tests/adaln_emulation/run.py        # exit status 0 when every check passes

csrc/adaln.cu is compiled as host C++ (g++ -std=c++20) against the stand-in headers in fake/: one
std::thread per CUDA thread, a std::barrier per block for __syncthreads, a real lane exchange for
__shfl_xor_sync, blocks one after another over the 2-D grid; each ``kernel<<<...>>>(args)`` becomes
``emu_launch(...)``. The module binds the real csrc/bind_adaln.cpp, and the checks go through the
public ops (backend="cuda", custom ops, autograd) and the real launchers in dit_fast/cuda/adaln.py,
against the float64 reference with the tolerance rule of tests/utils.py, forward and every gradient.

It exercises indexing, modulation-row mapping, vector widths and their fallback, launch-shape
variants, block reductions and the backward's per-chunk partial sums; it says nothing about speed,
coalescing or warp timing. The GPU tests in tests/test_cuda_extension.py remain the real test.
"""

import contextlib
import hashlib
import importlib.util
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
MODULE = """#include <pybind11/pybind11.h>
namespace py = pybind11;
void bind_adaln(py::module_& m);
PYBIND11_MODULE(_C_adaln_emu, m) { bind_adaln(m); }
"""


def emulated_source() -> str:
    """csrc/adaln.cu with every <<<...>>> launch turned into emu_launch(kernel, grid, block, smem, stream, args)."""
    source = (CSRC / "adaln.cu").read_text()
    source, count = re.subn(r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\(([^;]*)\);",
                            lambda m: f"emu_launch({m.group(1)}, {m.group(2)}, {m.group(3)});", source, flags=re.S)
    assert count >= 2, f"expected the forward and backward launches in adaln.cu, found {count}"
    return source


def build() -> Path:
    import pybind11

    sources = {"adaln_emu.cpp": emulated_source(), "module_emu.cpp": MODULE}
    inputs = [CSRC / "bind_adaln.cpp", CSRC / "adaln.h", CSRC / "common.h", *sorted((HERE / "fake").glob("*.h"))]
    digest = hashlib.sha256("".join(sources.values()).encode() + b"".join(p.read_bytes() for p in inputs))
    out_dir = Path(tempfile.gettempdir()) / f"dit_fast_adaln_emulation_{digest.hexdigest()[:16]}"
    lib = out_dir / ("_C_adaln_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in sources.items():
        (out_dir / name).write_text(text)
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{HERE / 'fake'}", f"-I{CSRC}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           *(str(out_dir / name) for name in sources), str(CSRC / "bind_adaln.cpp"), "-o", str(lib)]
    print("building the emulated adaLN kernels:", " ".join(cmd[:6]), "...", flush=True)
    subprocess.run(cmd, check=True)
    return lib


def load(lib: Path):
    spec = importlib.util.spec_from_file_location("_C_adaln_emu", lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    from dit_fast import _backend, _extension, ops
    from dit_fast.cuda import adaln as cuda_adaln
    from dit_fast.ops import adaln as A
    from tests.utils import assert_close_to_reference

    # The emulated module replaces dit_fast._C; CPU tensors stand in for device memory.
    _extension.cuda_ext = load(build())
    _extension.stream_handle = lambda tensor: 0
    torch.cuda.device = lambda device: contextlib.nullcontext()
    real_reason = _backend.unavailable_reason
    _backend.unavailable_reason = lambda name, device: None if name == "cuda" else real_reason(name, device)
    # a small "GPU": few blocks per modulation row, so that backward chunks hold several rows
    cuda_adaln._backward_chunks = lambda groups, tokens, channels, code, device: max(1, min(tokens, -(-3 // groups)))

    torch.manual_seed(0)
    failures = []

    def naive_layernorm_modulate(x, shift, scale, weight=None, bias=None, eps=1e-6):
        N = x.shape[1]
        normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return normed * (1 + A.expand_modulation(scale, N)) + A.expand_modulation(shift, N)

    def naive_gated_residual(x, gate, y):
        return x + A.expand_modulation(gate, x.shape[1]) * y

    def naive_residual_layernorm_modulate(x, gate, y, shift, scale, eps=1e-6):
        h = naive_gated_residual(x, gate, y)
        return h, naive_layernorm_modulate(h, shift, scale, eps=eps)

    def check(label, fn_cuda, fn_naive, fn_reference, inputs, names, dtype):
        def run(fn, cast):
            leaves = [None if t is None else t.detach().to(cast).requires_grad_(True) for t in inputs]
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            gen = torch.Generator().manual_seed(1)
            grad_outs = [torch.randn(o.shape, generator=gen).to(cast) for o in outs]
            return outs, torch.autograd.grad(outs, [t for t in leaves if t is not None], grad_outs)

        try:
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
            print(f"ok    {label}", flush=True)
        except AssertionError as exc:
            print(f"FAIL  {label}\n{exc}", flush=True)
            failures.append(label)

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
                          lambda *a: ops.layernorm_modulate(*a[:3], weight=a[3], bias=a[4], backend="cuda"),
                          naive_layernorm_modulate, A.layernorm_modulate_reference,
                          [x, shift, scale, w, b], ["x", "shift", "scale", "weight", "bias"], dtype)
                check(f"gated_residual {shape}", lambda *a: ops.gated_residual(*a, backend="cuda"),
                      naive_gated_residual, A.gated_residual_reference, [x, gate, y], ["x", "gate", "y"], dtype)
                check(f"residual_layernorm_modulate {shape}",
                      lambda *a: ops.residual_layernorm_modulate(*a, backend="cuda"),
                      naive_residual_layernorm_modulate, A.residual_layernorm_modulate_reference,
                      [x, gate, y, shift, scale], ["x", "gate", "y", "shift", "scale"], dtype)

    # C > 8192: the 1024-thread variant that reloads rows in the backward (fp32 and bf16)
    for dtype in (torch.float32, torch.bfloat16):
        B, N, G, C = 1, 2, 2, 16384
        x, y = rand(B, N, C, dtype=dtype), rand(B, N, C, dtype=dtype)
        gate, shift, scale = (mod(B, G, C, dtype, True) for _ in range(3))
        check(f"residual_layernorm_modulate B={B} N={N} G={G} C={C} {str(dtype)[6:]}",
              lambda *a: ops.residual_layernorm_modulate(*a, backend="cuda"),
              naive_residual_layernorm_modulate, A.residual_layernorm_modulate_reference,
              [x, gate, y, shift, scale], ["x", "gate", "y", "shift", "scale"], dtype)

    # misaligned pointers with C a multiple of 8: the scalar fallback
    B, N, G, C = 2, 4, 2, 64
    for dtype in (torch.float32, torch.bfloat16):
        x, y = misaligned(rand(B, N, C, dtype=dtype)), misaligned(rand(B, N, C, dtype=dtype))
        gate, shift, scale = (misaligned(mod(B, G, C, dtype, True)) for _ in range(3))
        weight, bias = misaligned(rand(C, dtype=dtype) + 1), misaligned(rand(C, dtype=dtype))
        assert x.data_ptr() % 16 != 0
        check(f"misaligned residual_layernorm_modulate C={C} {str(dtype)[6:]}",
              lambda *a: ops.residual_layernorm_modulate(*a, backend="cuda"),
              naive_residual_layernorm_modulate, A.residual_layernorm_modulate_reference,
              [x, gate, y, shift, scale], ["x", "gate", "y", "shift", "scale"], dtype)
        check(f"misaligned layernorm_modulate C={C} {str(dtype)[6:]}",
              lambda *a: ops.layernorm_modulate(*a[:3], weight=a[3], bias=a[4], backend="cuda"),
              naive_layernorm_modulate, A.layernorm_modulate_reference,
              [x, shift, scale, weight, bias], ["x", "shift", "scale", "weight", "bias"], dtype)

    print(f"\n{len(failures)} failed" if failures else "\nall emulated adaLN CUDA checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
