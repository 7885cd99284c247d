"""The CUDA kernels of csrc/ (adaLN, RoPE, patchify, GaLore's Adam step) run on the CPU by the emulator in
tests/cuda_emulation/ and checked against the PyTorch references through the real launchers.

One test runs every check in a subprocess (the emulated module replaces dit_fast._C there, and the
patching must not leak into other tests). It also runs on GPU machines, where the real kernels are
tested as well (tests/test_cuda_extension.py and the *_cuda cases of the per-family tests).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# every check of tests/cuda_emulation/run.py: 150 adaLN, 10 RoPE, 15 patchify, 16 GaLore Adam step
MIN_CHECKS = 191


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulation compiles csrc/*.cu as host C++ with g++")
def test_cuda_kernels_in_cpu_emulation():
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_emulation" / "run.py")],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = result.stdout
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 0, "\n".join(failed) or out[-3000:] + result.stderr[-3000:]
    passed = re.search(r"all (\d+) emulated CUDA checks passed", out)
    assert passed, out[-3000:] + result.stderr[-3000:]
    ok = sum(line.startswith("ok    ") for line in out.splitlines())
    assert int(passed.group(1)) == ok >= MIN_CHECKS, f"{ok} checks passed, expected at least {MIN_CHECKS}"
