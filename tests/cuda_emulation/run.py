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

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # harness and the check modules beside this file

from check_adaln import check_adaln  # noqa: E402
from check_galore import check_galore  # noqa: E402
from check_rope_patchify import check_patchify, check_rope  # noqa: E402
from harness import ROOT, Checks, build, install, load  # noqa: E402

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
