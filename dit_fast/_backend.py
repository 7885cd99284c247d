"""Backend selection: which implementation of an op runs.

Every op has up to three backends:
  "triton"  Triton kernels (CUDA devices; CPU only under TRITON_INTERPRET=1, for tests)
  "cuda"    the compiled extension dit_fast._C (CUDA devices, where it was built)
  "torch"   the readable pure-PyTorch reference kept beside each kernel (any device)

The backend of a call is, in order of precedence: the call's own ``backend=`` argument, the
innermost ``use_backend(...)`` block, the ``DIT_FAST_BACKEND`` environment variable, then
"auto". "auto" means the reference on CPU and, on a GPU, the fastest kernel backend measured
on that device for that op and shape class (timed once, then cached for the process).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

BACKENDS = ("triton", "cuda", "torch")
KERNEL_BACKENDS = ("triton", "cuda")
ENV_VAR = "DIT_FAST_BACKEND"

_scoped_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("dit_fast_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run every dit_fast op inside the block on backend ``name`` unless a call names its own."""
    token = _scoped_backend.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def requested_backend(backend: str = "auto") -> str:
    """The backend a call asked for, after the context manager and the environment variable."""
    _check_name(backend, "backend")
    if backend != "auto":
        return backend
    scoped = _scoped_backend.get()
    if scoped is not None and scoped != "auto":
        return scoped
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, ENV_VAR)
    return "auto"


try:
    import triton  # noqa: F401

    _TRITON_IMPORT_ERROR: Optional[str] = None
except ImportError as _exc:  # Triton is optional: the reference and CUDA backends work without it
    _TRITON_IMPORT_ERROR = f"Triton is not installed ({_exc}); `pip install triton`"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if _TRITON_IMPORT_ERROR:
            return _TRITON_IMPORT_ERROR
        if device.type == "cuda" or triton_interpreting():
            return None
        return (f"Triton kernels need a CUDA device, got tensors on {device}; move them to a GPU, "
                "use backend='torch', or set TRITON_INTERPRET=1 before importing dit_fast to run "
                "the kernels in Triton's (slow) CPU interpreter")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA backend needs tensors on a CUDA device, got {device}"
        from dit_fast import _extension

        if _extension.cuda_ext is None:
            return f"the CUDA extension dit_fast._C is not available: {_extension.load_error}"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def resolve_backend(backend: str, device: torch.device, op: str,
                    implemented: Sequence[str] = KERNEL_BACKENDS) -> str:
    """Turns a requested backend into "torch", one kernel backend, or "auto" (= measure in the op).

    ``implemented`` lists the kernel backends this op has. Raises BackendUnavailableError when an
    explicitly requested backend cannot run.
    """
    name = requested_backend(backend)
    if name == "torch":
        return name
    if name != "auto":
        if name not in implemented:
            raise BackendUnavailableError(f"{op}: no {name!r} implementation (this op has {tuple(implemented) + ('torch',)})")
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run: {reason}")
        return name
    if device.type != "cuda":
        return "torch"
    runnable = [b for b in implemented if unavailable_reason(b, device) is None]
    if not runnable:
        return "torch"
    return runnable[0] if len(runnable) == 1 else "auto"


def runnable_kernel_backends(device: torch.device, implemented: Iterable[str] = KERNEL_BACKENDS) -> Tuple[str, ...]:
    return tuple(b for b in implemented if unavailable_reason(b, device) is None)


# ---- "auto" on a GPU: time each kernel backend once per (op, device, shape class) ----

_fastest: Dict[tuple, str] = {}


def _time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def pick_fastest(op: str, key: tuple, candidates: Dict[str, Callable[[], object]]) -> str:
    """Name of the fastest candidate for (op, key); measured on first use, then cached.

    Called from inside an op's implementation with real tensors, so it also works under
    torch.compile (the op is opaque to the compiler). During CUDA graph capture nothing can be
    timed, so the first candidate is used until a measurement exists.
    """
    names = list(candidates)
    if len(names) == 1:
        return names[0]
    device = torch.cuda.current_device()
    cache_key = (op, torch.cuda.get_device_name(device), key)
    if cache_key not in _fastest:
        if torch.cuda.is_current_stream_capturing():
            return names[0]
        times = {name: _time_ms(fn) for name, fn in candidates.items()}
        _fastest[cache_key] = min(times, key=times.get)
    return _fastest[cache_key]


def shape_class(n: int) -> int:
    """Buckets a size to its power of two so that "auto" measures once per size class."""
    return 1 << max(0, int(n) - 1).bit_length()
