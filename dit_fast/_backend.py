"""Backend selection: which implementation of an op runs.

Every op has up to three backends:
  "triton"  Triton kernels (CUDA devices; CPU only under TRITON_INTERPRET=1, for tests)
  "cuda"    the compiled extension dit_fast._C (CUDA devices, where it was built)
  "torch"   the readable pure-PyTorch reference kept beside each kernel (any device)

The backend of a call is, in order of precedence: the call's own ``backend=`` argument, the
innermost ``use_backend(...)`` block, the ``DIT_FAST_BACKEND`` environment variable, then
"auto". "auto" means the reference on CPU and, on a GPU, the fastest implementation measured on
that device for that op and shape class (timed once, then cached for the process): among the
runnable kernel backends (adaLN, RoPE, patchify: with one runnable, it runs untimed), and for
attention, which has its own planner (dit_fast/ops/attention_planner.py), our kernel against
torch's own best even when Triton is the only kernel backend (``resolve_backend(planned=True)``).

Compile-safe by construction: torch.compile (Dynamo) traces the resolution below, so it is written
in what Dynamo understands. The innermost block's name is one module global, ``_scoped`` (a str or
None): Dynamo guards on its value, so entering or leaving a ``use_backend`` block between calls of
a compiled model re-traces (or reuses the graph compiled for that backend) instead of running the
old choice. Environment variables are read through ``_getenv``, which Dynamo evaluates once while
tracing (``torch.compiler.assume_constant_result``): set them before compiling; eager calls read
them on every call. Timing ("auto" on a GPU) happens only inside the custom ops, on real tensors,
never while tracing.

What "auto" decides rests on facts about the device, read by one ``DeviceFacts`` object: whether it is
a GPU, and why each kernel backend cannot run there (None: it can). ``set_device_facts`` replaces it,
so that a test on a CPU can state "this is a CUDA device with Triton runnable" and run the real
decision code (resolve_backend, the attention planner) on CPU tensors, the kernels in Triton's
interpreter; the attention planner's ``set_timer`` does the same for timings.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

BACKENDS = ("triton", "cuda", "torch")
KERNEL_BACKENDS = ("triton", "cuda")
ENV_VAR = "DIT_FAST_BACKEND"

# The active use_backend blocks, outermost first, as (block, name); process-wide (like torch.backends
# flags), not per thread. _scoped is the innermost block's name (None outside every block): the one
# value compiled code reads and guards on. Blocks leave by identity, so blocks of different threads
# that overlap unwind to the right state.
_scope_stack: List[tuple] = []
_scoped: Optional[str] = None
_scope_lock = threading.Lock()


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    return name


def _set_scope(block, name: Optional[str]) -> None:
    """Pushes (block, name), or with name None removes block; then recomputes _scoped."""
    global _scoped
    if name is not None:
        _scope_stack.append((block, name))
    else:
        for i in range(len(_scope_stack) - 1, -1, -1):
            if _scope_stack[i][0] is block:
                del _scope_stack[i]
                break
    _scoped = _scope_stack[-1][1] if _scope_stack else None


class use_backend:
    """Run every dit_fast op inside the block on backend ``name`` unless a call names its own.

    ``with dit_fast.use_backend("torch"): ...``; blocks nest (the innermost wins) and work inside a
    torch.compile'd function too. The setting is process-wide, like ``torch.backends`` flags.
    """

    def __init__(self, name: str):
        self.name = _check_name(name, "use_backend")

    def __enter__(self):
        if torch.compiler.is_compiling():  # traced: Dynamo replays the list and global updates
            _set_scope(self, self.name)
        else:
            with _scope_lock:
                _set_scope(self, self.name)
        return self

    def __exit__(self, *exc) -> bool:
        if torch.compiler.is_compiling():
            _set_scope(self, None)
        else:
            with _scope_lock:
                _set_scope(self, None)
        return False


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo at ``import dit_fast``
    (1.4 s of a 2.7 s import): the mark that decorator sets, as torch marks its own justknobs_check.
    tests/test_backend.py checks that the decorator still sets exactly this attribute."""
    fn._dynamo_marked_constant = True
    return fn


@assume_constant_result
def _getenv(name: str) -> str:
    """os.environ[name] stripped ("" if unset). Eager: read on every call; torch.compile: read once
    while tracing and kept in the graph (Dynamo cannot guard on the environment)."""
    return os.environ.get(name, "").strip()


def requested_backend(backend: str = "auto") -> str:
    """The backend a call asked for, after the ``use_backend`` block and the environment variable."""
    _check_name(backend, "backend")
    if backend != "auto":
        return backend
    scoped = _scoped
    if scoped is not None and scoped != "auto":
        return scoped
    env = _getenv(ENV_VAR)
    if env:
        return _check_name(env, ENV_VAR)
    return "auto"


try:
    import triton  # noqa: F401

    _TRITON_IMPORT_ERROR: Optional[str] = None
except ImportError as _exc:  # Triton is optional: the reference and CUDA backends work without it
    _TRITON_IMPORT_ERROR = f"Triton is not installed ({_exc}); `pip install triton`"


def triton_interpreting() -> bool:
    return _getenv("TRITON_INTERPRET") == "1"


class DeviceFacts:
    """What backend choice needs to know about a device, read from this machine.

    is_gpu(device): "auto" chooses among kernels there (elsewhere it runs the reference).
    unavailable_reason(backend, device): None if ``backend``'s kernels can run on ``device``, else a
    sentence saying why not. Replace with set_device_facts (e.g. StatedFacts) to give the decision
    code another machine; written in what torch.compile traces (no I/O, no CUDA calls)."""

    def is_gpu(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def unavailable_reason(self, backend: str, device: torch.device) -> Optional[str]:
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


class StatedFacts(DeviceFacts):
    """Facts stated instead of read: every device is a GPU (``gpu``) on which exactly the kernel backends
    in ``runnable`` can run. For tests and the benchmarks' CPU smoke runs: the tensors stay where they
    are (on CPU, Triton's interpreter runs the kernels), only the decision sees a GPU."""

    def __init__(self, gpu: bool = True, runnable: Sequence[str] = ("triton",)):
        if not isinstance(gpu, bool):
            raise TypeError(f"StatedFacts: gpu must be True or False, got {gpu!r}")
        if isinstance(runnable, str) or not isinstance(runnable, (tuple, list)):
            raise TypeError(f"StatedFacts: runnable must be a tuple of backend names such as ('triton',), got "
                            f"{runnable!r}")
        for name in runnable:
            _check_name(name, "StatedFacts")
        self.gpu = bool(gpu)
        self.runnable = tuple(runnable)

    def is_gpu(self, device: torch.device) -> bool:
        return self.gpu

    def unavailable_reason(self, backend: str, device: torch.device) -> Optional[str]:
        if backend == "torch" or backend in self.runnable:
            return None
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        return f"{backend!r} is not runnable on the stated device (StatedFacts(runnable={self.runnable}))"

    def __repr__(self) -> str:
        return f"StatedFacts(gpu={self.gpu}, runnable={self.runnable})"


_device_facts: DeviceFacts = DeviceFacts()


def set_device_facts(facts: Optional[DeviceFacts] = None) -> DeviceFacts:
    """Replaces the device facts every resolution reads (None: this machine's). Returns the previous
    ones, to restore. Process-wide; for tests and experiments."""
    global _device_facts
    if facts is not None and not isinstance(facts, DeviceFacts):
        raise TypeError(f"facts must be a DeviceFacts (or None for this machine's), got {type(facts).__name__}")
    previous = _device_facts
    _device_facts = facts if facts is not None else DeviceFacts()
    return previous


def device_facts() -> DeviceFacts:
    """The device facts in use."""
    return _device_facts


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else a sentence saying why not (the device facts')."""
    return _device_facts.unavailable_reason(backend, device)


def resolve_backend(backend: str, device: torch.device, op: str,
                    implemented: Sequence[str] = KERNEL_BACKENDS, planned: bool = False) -> str:
    """Turns a requested backend into "torch", one kernel backend, or "auto" (= measure in the op).

    ``implemented`` lists the kernel backends this op has. "auto" on a device the facts call a GPU is
    "auto" when several of them can run, or when the op has its own planner (``planned``: attention,
    which also times torch's implementations, so even one kernel backend has a rival); the one runnable
    kernel backend of an op without a planner (nothing to time); "torch" when none can run, and on
    every other device. Raises BackendUnavailableError when an explicitly requested backend cannot run.
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
    if not _device_facts.is_gpu(device):
        return "torch"
    runnable = [b for b in implemented if unavailable_reason(b, device) is None]
    if not runnable:
        return "torch"
    return "auto" if planned or len(runnable) > 1 else runnable[0]


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
    """Buckets a size to its power of two so that "auto" measures once per size class.

    Written with comparisons only, so that under torch.compile a symbolic size (dynamic shapes) gives a
    plain int: each comparison becomes a guard, and the graph is specialised to the size class."""
    c = 1
    while c < n:
        c *= 2
    return c


def exact_int(n) -> int:
    """n as a plain int; a symbolic size (torch.compile, dynamic shapes) is pinned by a binary search of
    comparisons, each a guard (about 2 log2(n) of them), so that the graph is specialised to n. (Always
    searched: Dynamo answers isinstance(symbolic size, int) with True.)"""
    hi = shape_class(n)
    lo = hi // 2  # lo < n <= hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if n <= mid:
            hi = mid
        else:
            lo = mid
    return hi if n > lo else lo
