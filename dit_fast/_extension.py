"""Loads the optional CUDA extension dit_fast._C; never raises.

``cuda_ext`` is the module or None; ``load_error`` says why it is missing. The extension takes
raw device pointers, sizes and a stream handle (see csrc/), so it does not depend on torch's
C++ ABI and loads with any torch version.
"""

import logging

logger = logging.getLogger("dit_fast")

cuda_ext = None
load_error = None

try:
    from dit_fast import _C as cuda_ext  # noqa: N811
except ImportError as exc:  # not built (no nvcc, DIT_FAST_BUILD_CUDA=0) or built for another Python
    load_error = (f"{exc}. Build it with `DIT_FAST_BUILD_CUDA=1 pip install -e .` on a machine with "
                  "the CUDA toolkit")
    logger.info("dit_fast: CUDA extension not loaded (%s); Triton and PyTorch backends still work", exc)


def stream_handle(tensor) -> int:
    """The raw cudaStream_t of torch's current stream on ``tensor``'s device."""
    import torch

    return torch.cuda.current_stream(tensor.device).cuda_stream


DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def dtype_code(tensor) -> int:
    """The integer csrc/common.h uses for a floating dtype (0 fp32, 1 fp16, 2 bf16)."""
    return DTYPE_CODES[str(tensor.dtype).replace("torch.", "")]
