"""Build script for dit_fast.

The Python package installs everywhere. The CUDA extension ``dit_fast._C`` is built from
``csrc/`` only where nvcc is found and it is wanted:

  DIT_FAST_BUILD_CUDA=0      never build it (Triton and PyTorch backends still work)
  DIT_FAST_BUILD_CUDA=1      build it, and fail the install if that is impossible
  DIT_FAST_CUDA_ARCHS="90a;80"   architectures to compile for (default: sm_90a for H100/H200, sm_80);
                             setting it also asks for the build (a container built without a GPU)
  (neither)                  build it when nvcc is found and a GPU is visible (nvidia-smi -L, or
                             /dev/nvidia*), otherwise skip it with a line saying how to force it; a
                             failed build warns and installs without it

``python setup.py --cuda-plan`` prints that decision in one line without building anything (and
without setuptools: scripts/install.sh says it before pip runs).

The extension is torch-free: kernels take raw pointers, sizes and a cudaStream_t, and a
pybind11 layer exposes them. Building therefore needs no torch headers (the CPU wheel's are
incomplete for CUDA code) and never breaks with a torch ABI change. Sources compile in
parallel, one nvcc process per file.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "90a;80"
YES, NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def cuda_archs():
    archs = os.environ.get("DIT_FAST_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


def gencode_flags(archs):
    """SASS for every listed arch, plus PTX of the oldest portable one so that newer GPUs
    (for example sm_100) can JIT-compile the kernels instead of failing with "no kernel image"."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    portable = [a for a in archs if a.isdigit()]  # "90a" features do not carry forward; plain numbers do
    if portable:
        oldest = min(portable, key=int)
        flags += ["-gencode", f"arch=compute_{oldest},code=compute_{oldest}"]
    return flags


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def gpu_visible() -> bool:
    """An NVIDIA GPU this process could use: nvidia-smi lists one (or, without nvidia-smi, a
    /dev/nvidiaN node exists), and CUDA_VISIBLE_DEVICES does not hide them all. No torch needed."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.SubprocessError):
            return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def cuda_build_plan():
    """(nvcc or None, forced, one line saying what the install does with the CUDA extension and why)."""
    mode = os.environ.get("DIT_FAST_BUILD_CUDA", "auto").strip().lower()
    archs_asked = bool(os.environ.get("DIT_FAST_CUDA_ARCHS", "").strip())
    forced = mode in YES
    if mode in NO:
        return None, False, "dit_fast: DIT_FAST_BUILD_CUDA=0, skipping the CUDA extension"
    nvcc = find_nvcc()
    if nvcc is None:
        if forced:
            raise RuntimeError("DIT_FAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return None, False, ("dit_fast: CUDA toolkit is not available. Skipping compilation of CUDA extensions "
                             "(the Triton and PyTorch backends work without it)")
    if not list(CSRC.glob("*.cu")):
        return None, False, "dit_fast: no CUDA sources in csrc/, nothing to build"
    why = ("DIT_FAST_BUILD_CUDA=1" if forced else "DIT_FAST_CUDA_ARCHS is set" if archs_asked
           else "a GPU is visible" if gpu_visible() else None)
    if why is None:
        return None, False, ("dit_fast: no GPU visible, skipping the CUDA extension (nvcc is here: "
                             "DIT_FAST_BUILD_CUDA=1 or DIT_FAST_CUDA_ARCHS=\"90a;80\" builds it anyway)")
    return nvcc, forced, (f"dit_fast: building the CUDA extension for sm_{', sm_'.join(cuda_archs())} ({why}; "
                          f"a few minutes, one nvcc per file)")


if __name__ == "__main__" and sys.argv[1:] == ["--cuda-plan"]:
    print(cuda_build_plan()[2])
    sys.exit(0)

from setuptools import Extension, setup  # noqa: E402  (after --cuda-plan, which must run without setuptools)
from setuptools.command.build_ext import build_ext  # noqa: E402


class BuildCudaExtension(build_ext):
    """Compiles csrc/*.cu and csrc/*.cpp with nvcc and links them into dit_fast/_C."""

    def run(self):
        # Decide once whether to build; when skipping, drop the extension so that setuptools
        # (editable installs included) does not look for a library that was never made.
        self.nvcc, self.forced, plan = cuda_build_plan()
        print(plan)
        if self.nvcc is None:
            self.extensions = []
        super().run()

    def build_extension(self, ext):
        start = time.time()
        try:
            self._build_cuda(ext)
        except (subprocess.CalledProcessError, OSError) as exc:
            if self.forced:
                raise
            # Without DIT_FAST_BUILD_CUDA=1 a failed CUDA build must not fail the install: the Triton
            # and PyTorch backends work without it, and dit_fast._extension reports why it is missing.
            print(f"dit_fast: WARNING: building the CUDA extension failed ({exc}); installing without it. "
                  "Set DIT_FAST_BUILD_CUDA=1 to make this an error.")
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.extensions = [e for e in self.extensions if e is not ext]  # nothing for setuptools to copy
            return
        print(f"dit_fast: built the CUDA extension in {time.time() - start:.0f} s")

    def _build_cuda(self, ext):
        nvcc = self.nvcc
        import pybind11

        out_path = Path(self.get_ext_fullpath(ext.name))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        obj_dir = Path(self.build_temp) / "csrc"
        obj_dir.mkdir(parents=True, exist_ok=True)
        includes = [
            f"-I{CSRC}",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
        ]
        common = ["-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr"]
        gencode = gencode_flags(cuda_archs())

        def compile_one(src):
            obj = obj_dir / (src.name + ".o")
            if src.suffix == ".cu":
                flags = ["-O3", "-lineinfo"] + gencode
            else:  # the pybind11 layer only passes integers through: -O1 builds it a third faster than -O3
                flags = ["-O1", "-x", "c++", "-Xcompiler", "-fvisibility=hidden"]
            cmd = [nvcc, "-c", str(src), "-o", str(obj)] + common + includes + flags
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            return str(obj)

        sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            objects = list(pool.map(compile_one, sources))
        link = [nvcc, "-shared", "-o", str(out_path), *objects, "-cudart", "static"] + gencode
        print(" ".join(link))
        subprocess.run(link, check=True)


PACKAGES = [
    "dit_fast",
    "dit_fast.ops",
    "dit_fast.nn",
    "dit_fast.optim",
    "dit_fast.models",
    "dit_fast.diffusion",
    "dit_fast.cuda",
    "dit_fast.triton_kernels",
]

setup(
    packages=PACKAGES,
    # triton_kernels/ ships inside our namespace: a top-level `triton_kernels` module would clash
    # with the package of that name that Triton's project publishes (and vLLM users have).
    package_dir={"dit_fast.triton_kernels": "triton_kernels"},
    package_data={"dit_fast": ["assets/*"]},
    ext_modules=[Extension("dit_fast._C", sources=[])],
    cmdclass={"build_ext": BuildCudaExtension},
)
