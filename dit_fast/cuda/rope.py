"""Python launcher of the standalone 3D RoPE CUDA kernel (csrc/rope.cu through dit_fast._C).

Same signature as dit_fast.triton_kernels.rope.rope_3d; the readable reference is
dit_fast.ops.rope.apply_rope_3d_reference.
"""

import torch

from dit_fast import _extension


def _ext():
    if _extension.cuda_ext is None:
        raise RuntimeError(f"the CUDA extension dit_fast._C is not available: {_extension.load_error}")
    return _extension.cuda_ext


def rope_3d(x, grid, inv_freq, split, inverse=False):
    """x (B, S, heads, D) rotated by +angle (-angle with ``inverse``) -> new contiguous tensor.

    grid: (T, H, W); inv_freq: (D / 2,) fp32 on x's device; split: (d_t, d_h, d_w). x is read in
    place when D is contiguous and the other strides are even (pairs 2-element aligned).
    """
    ext = _ext()
    pair_bytes = 2 * x.element_size()
    if x.stride(-1) != 1 or any(s % 2 for s in x.stride()[:3]) or x.data_ptr() % pair_bytes:
        # a fresh copy: contiguous() would hand back a contiguous x whose pointer is off alignment
        x = x.clone(memory_format=torch.contiguous_format)
    B, S, heads, D = x.shape
    out = x.new_empty((B, S, heads, D))
    if out.numel() == 0:
        return out
    _, H, W = grid
    ext.rope_3d(
        x.data_ptr(), out.data_ptr(), inv_freq.contiguous().data_ptr(),
        B, S, heads, D, H, W,
        x.stride(0), x.stride(1), x.stride(2),
        split[0] // 2, (split[0] + split[1]) // 2,
        bool(inverse), _extension.dtype_code(x), _extension.stream_handle(x),
    )
    return out
