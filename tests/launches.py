"""Counting real Triton kernel launches, so that a test named for a kernel proves the kernel ran.

    with count_launches() as launches:
        out = dit_fast.ops.attention(q, k, v, backend="triton")
    assert launches["_attn_fwd_kernel"] == 1

Under Triton's CPU interpreter (TRITON_INTERPRET=1, no GPU) every launch goes through
``InterpretedFunction.run``; on a GPU through ``JITFunction.run``, which calls Triton's
``knobs.runtime.launch_enter_hook``. The counter wraps the one and sets the other, for the duration of
the block only: it observes the launch path, it never replaces what decides which path runs.

Keys are the kernel functions' names (``_attn_fwd_kernel``, ``_adaln_forward_kernel``, ...); an
autotuned kernel counts once per launch (the interpreter runs one configuration; on a GPU a tuning
run also launches each configuration it times, so tests there compare with ``>=`` where a cache may
be cold). ``total()`` sums a prefix, e.g. ``launches.total("_attn")``.
"""

import collections
import contextlib
import os
import threading

_lock = threading.Lock()


class Launches(collections.Counter):
    def total(self, prefix: str = "") -> int:
        return sum(n for name, n in self.items() if name.startswith(prefix))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def count_launches():
    """A ``Launches`` counter of the Triton kernels launched inside the block (every thread)."""
    launches = Launches()
    if _interpreting():
        from triton.runtime import interpreter

        cls = interpreter.InterpretedFunction
        original = cls.run

        def run(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                with _lock:
                    launches[self.fn.__name__] += 1
            return original(self, *args, **kwargs)

        cls.run = run
        try:
            yield launches
        finally:
            cls.run = original
        return

    import triton

    runtime = triton.knobs.runtime
    previous = runtime.launch_enter_hook

    def hook(metadata):
        data = metadata.data if hasattr(metadata, "data") else metadata  # Triton's LazyDict
        name = data.get("name", "?") if isinstance(data, dict) else "?"
        with _lock:
            launches[name] += 1
        if previous is not None:
            previous(metadata)

    runtime.launch_enter_hook = hook
    try:
        yield launches
    finally:
        runtime.launch_enter_hook = previous
