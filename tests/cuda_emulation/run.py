"""Runs the CUDA kernels of csrc/rope.cu and csrc/patchify.cu on the CPU, for machines without a GPU.

    python tests/cuda_emulation/run.py          # exit status 0 when every check passes

The .cu sources are compiled as host C++ (g++ -std=c++20) against the stand-in headers in fake/:
one std::thread per CUDA thread, a std::barrier per block for __syncthreads, blocks run one after
another; each ``kernel<<<grid, block, smem, stream>>>(args)`` is rewritten to ``emu_launch(...)``.
The module binds the real csrc/bind_*.cpp, and the checks call the real Python launchers in
dit_fast/cuda/ (with dit_fast._C swapped for the emulated module) against the PyTorch references.
It exercises the kernels' indexing, vector-width choices, shared-memory staging and barriers; it
cannot see warp-level timing, memory coalescing or anything about speed. A GPU run of
tests/test_rope.py and tests/test_patchify.py remains the real test.
"""

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
FAMILIES = ("rope", "patchify")
MODULE = """#include <pybind11/pybind11.h>
namespace py = pybind11;
void bind_rope(py::module_& m);
void bind_patchify(py::module_& m);
PYBIND11_MODULE(_C_emu, m) { bind_rope(m); bind_patchify(m); }
"""


def emulated_source(family: str) -> str:
    """csrc/<family>.cu with launches through emu_launch and dynamic shared memory from the emulator."""
    s = (CSRC / f"{family}.cu").read_text()
    s, n = re.subn(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(([^;]*)\);",
                   lambda m: f"emu_launch({m.group(1)}, {m.group(2)}, {m.group(3)});", s)
    assert n > 0, f"no kernel launch found in {family}.cu"
    return s.replace("extern __shared__ __align__(16) unsigned char smem_raw[];",
                     "unsigned char* smem_raw = emu_smem.data();")


def build() -> Path:
    import pybind11

    sources = {f"{f}_emu.cpp": emulated_source(f) for f in FAMILIES}
    sources["module_emu.cpp"] = MODULE
    inputs = [CSRC / f"bind_{f}.cpp" for f in FAMILIES] + [CSRC / f"{f}.h" for f in FAMILIES]
    inputs += [CSRC / "common.h"] + sorted((HERE / "fake").glob("*.h"))
    digest = hashlib.sha256("".join(sources.values()).encode() + b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"dit_fast_cuda_emulation_{digest}"
    lib = out_dir / ("_C_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in sources.items():
        (out_dir / name).write_text(text)
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{HERE / 'fake'}", f"-I{CSRC}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           *(str(out_dir / n) for n in sources), *(str(CSRC / f"bind_{f}.cpp") for f in FAMILIES), "-o", str(lib)]
    print("building the emulated kernels (about a minute):", " ".join(cmd[:6]), "...", flush=True)
    subprocess.run(cmd, check=True)
    return lib


def load(lib: Path):
    spec = importlib.util.spec_from_file_location("_C_emu", lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from dit_fast import _extension
    from dit_fast.ops import patchify as P
    from dit_fast.ops import rope as R

    _extension.cuda_ext = load(build())
    _extension.stream_handle = lambda tensor: 0
    from dit_fast.cuda import patchify as cuda_patchify
    from dit_fast.cuda import rope as cuda_rope

    torch.manual_seed(0)
    floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    failures = []

    def check_rope(x, grid, split=None, theta=10000.0):
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
        ok = (err <= 2 * torch_err + floor[x.dtype] * max(1.0, ref64.abs().max().item())
              and undo_err <= 4 * floor[x.dtype] * max(1.0, x.abs().max().item()))
        line = (f"rope {tuple(x.shape)} {x.dtype} strides {x.stride()}: err {err:.1e} (torch {torch_err:.1e}), "
                f"inverse err {undo_err:.1e}")
        print(("ok    " if ok else "FAIL  ") + line)
        if not ok:
            failures.append(line)

    def check_patchify(video, patch, order):
        tokens = cuda_patchify.patchify_3d(video, patch, order == "thwc")
        grid = tuple(d // p for d, p in zip(video.shape[2:], patch))
        back = cuda_patchify.unpatchify_3d(tokens, patch, grid, order == "thwc")
        ok = torch.equal(tokens, P.patchify_3d_reference(video, patch, order)) and torch.equal(back, video)
        line = f"patchify {tuple(video.shape)} {video.dtype} strides {video.stride()} patch {patch} {order}"
        print(("ok    " if ok else "FAIL  ") + line)
        if not ok:
            failures.append(line)

    grid = (3, 5, 7)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_rope(torch.randn(2, 105, 3, 72, dtype=dtype), grid)  # 128-bit accesses
        check_rope(torch.randn(1, 105, 2, 64, dtype=dtype), grid, (16, 32, 16))  # custom split
    check_rope(torch.randn(2, 105, 3, 3, 72)[:, :, 1], grid)  # slice of a packed qkv, in place
    check_rope(torch.randn(2, 105, 2, 74)[..., :72], grid)  # even strides, not 16-byte multiples: one pair per access
    check_rope(torch.randn(1, 105, 1, 66, dtype=torch.float16), grid)  # D = 66: one pair per access
    check_rope(torch.randn(1, 2 * 3 * 41, 1, 24), (2, 3, 41), (8, 8, 8))  # angles of tens of radians
    for patch, shape in (((1, 2, 2), (2, 3, 3, 10, 14)), ((2, 2, 2), (1, 5, 6, 10, 14)), ((1, 2, 2), (1, 16, 2, 4, 6))):
        for order in ("cthw", "thwc"):
            for dtype in (torch.float32, torch.float16):  # K * e = 48 / 24, 160 / 80, 256 / 128 bytes
                check_patchify(torch.randn(shape, dtype=dtype), patch, order)
    check_patchify(torch.randn(2, 3, 3, 10, 17)[..., 1:-2], (1, 2, 2), "cthw")  # cropped video
    check_patchify(torch.randn(2, 3, 3, 10, 14).to(memory_format=torch.channels_last_3d), (1, 2, 2), "thwc")
    check_patchify(torch.randn(1, 1100, 1, 2, 40), (1, 2, 2), "cthw")  # 17.6 KB tokens: one per block, rows split
    print(f"\n{len(failures)} failed" if failures else "\nall emulated CUDA checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
