"""Build and load of the emulated CUDA module, and the check runner (see run.py)."""

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
