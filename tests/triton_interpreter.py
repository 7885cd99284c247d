"""Harness fixes for Triton's CPU interpreter.

Triton 3.9's interpreter stores bf16 tensors as raw uint16 and its ``create_dot`` hands those bit
patterns straight to ``np.matmul``: a bf16 ``tl.dot`` multiplies integers, not numbers. We upcast bf16
operands to fp32 before the product. Its fp32 -> bf16 cast (``x.to(tl.bfloat16)``, or a store of fp32
into a bf16 tensor) truncates, where the GPU rounds to nearest even: we round to nearest even too.
Only the test harness is patched; kernels stay as on GPU.

A third fix: a jit function called from inside a kernel (a device function) makes the interpreter
patch ``triton.language`` for that call (``InterpretedFunction.__call__`` -> ``_patch_lang``) and
never undo it. Where the device function's module sees ``triton.language.core`` and the kernel's
does not, 64 builtins of ``tl.core`` stay replaced by interpreter lambdas for the rest of the
process, and a later real compile in the same process (the sm_90a compile checks) fails inside
``InterpreterBuilder.cast_impl`` with "'value' object has no attribute 'dtype'". We restore the
scope when the device call returns (``restore_device_call_patches``).
"""

import os


def patch_interpreter():
    """Every harness fix below, once; a no-op outside the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    patch_bf16_dot()
    restore_device_call_patches()


def restore_device_call_patches():
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    cls = interpreter.InterpretedFunction
    if getattr(cls.__call__, "_dit_fast_restores", False):
        return

    def __call__(self, *args, **kwargs):  # a device function call, as Triton's, then undo the patch
        scope = interpreter._patch_lang(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e
        finally:
            if scope is not None:  # Triton versions whose _patch_lang returns no scope never restore
                scope.restore()

    __call__._dit_fast_restores = True
    cls.__call__ = __call__


def patch_bf16_dot():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_dit_fast_bf16_fix", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def as_fp32(t):
                if t.dtype.scalar != tl.bfloat16:
                    return t.data.astype(np.float32)
                return interpreter._convert_float(t.data, tl.bfloat16, tl.float32, None).view(np.float32).reshape(t.data.shape)

            product = np.matmul(as_fp32(a), as_fp32(b)).astype(d.data.dtype)
            return interpreter.TensorHandle(product + d.data, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._dit_fast_bf16_fix = True
    builder.create_dot = create_dot

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_fp32_to_bf16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.cast_impl = cast_impl


def _fp32_to_bf16_bits(x):
    """fp32 array -> bf16 bit patterns (uint16), rounded to nearest, ties to even, NaN kept NaN."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):
        out = np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), out)
    return out.reshape(np.shape(x))
