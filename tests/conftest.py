"""Test setup shared by every test file.

On a machine without a GPU the Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET must
be set before any kernel is defined, so it is set here, before dit_fast is imported. The interpreter's
bf16 ``tl.dot`` and its leaking device-call patches are fixed in tests/triton_interpreter.py (the
harness, never the kernels).
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one untimed attention tile configuration per sequence-length class: the full autotune
# space compiles and times ~11 configurations per kernel variant (minutes). Read when the kernels are
# defined, which importing dit_fast below can do, so it is set here.
os.environ.setdefault("DIT_FAST_ATTENTION_TUNE", "single")

from tests import triton_interpreter  # noqa: E402

triton_interpreter.patch_interpreter()

import dit_fast  # noqa: E402,F401


def pytest_report_header(config):
    from dit_fast import _extension

    device = torch.cuda.get_device_name() if HAS_GPU else "cpu (Triton interpreter)"
    ext = "loaded" if _extension.cuda_ext is not None else f"not loaded"
    return f"dit_fast device: {device}; torch {torch.__version__}; CUDA extension {ext}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def kernel_devices():
    """The device each kernel backend's tests run on here."""
    return "cuda" if HAS_GPU else "cpu"


def pytest_runtest_logreport(report):
    """With DIT_FAST_FAILURE_LOG=path, append each failure's traceback as it happens.

    Used on the lent GPU machine, where a run cut off by its time limit never reaches pytest's
    final summary (and xdist prints tracebacks only there).
    """
    path = os.environ.get("DIT_FAST_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")
