"""CUDA launchers for adaLN modulation over dit_fast._C (csrc/adaln.cu).

Same signatures and return conventions as dit_fast/triton_kernels/adaln.py, so the ops layer
(dit_fast/ops/adaln.py) can swap them. Inputs are made contiguous here; the C++ launchers take
raw pointers (0 for an absent tensor), sizes, a dtype code and torch's current stream.
"""

import functools

import torch

from dit_fast import _adaln_partials as adaln_partials
from dit_fast import _extension

MAX_C = 16384  # csrc/adaln.h kAdalnMaxChannels
MAX_CHUNKS = 65535  # the backward's chunks are gridDim.y


def _ext():
    if _extension.cuda_ext is None:
        raise RuntimeError(f"the CUDA extension dit_fast._C is not available: {_extension.load_error}")
    return _extension.cuda_ext


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _contiguous(t):
    return None if t is None else t.contiguous()


@functools.lru_cache(maxsize=None)
def _resident_backward_blocks(device_index: int, channels: int, dtype_code: int) -> int:
    """Backward blocks that run at once on the whole GPU (SMs x blocks per SM for this C, dtype)."""
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    return sms * _ext().adaln_backward_blocks_per_sm(channels, dtype_code)


def _backward_chunks(num_groups: int, tokens_per_group: int, channels: int, dtype_code: int,
                     device: torch.device) -> int:
    """Enough blocks to fill every SM with as many as fit, never more than one per token."""
    target = _resident_backward_blocks(device.index if device.index is not None else torch.cuda.current_device(),
                                       channels, dtype_code)
    return max(1, min(tokens_per_group, MAX_CHUNKS, -(-target // num_groups)))


def adaln_forward(x, gate, branch, shift, scale, weight, bias, eps, has_norm=True):
    """Returns (h, out, mean, rstd); h is None without a residual, out/mean/rstd None without norm."""
    ext = _ext()
    x = x.contiguous()
    B, N, C = x.shape
    has_residual = gate is not None
    modulation = shift if has_norm else gate
    G = modulation.shape[1]
    R = B * N
    if x.numel() == 0:  # nothing to launch (the C++ launcher rejects N = 0)
        empty = lambda flag, *size, dtype=x.dtype: torch.empty(*size, device=x.device, dtype=dtype) if flag else None  # noqa: E731
        return (empty(has_residual, x.shape), empty(has_norm, x.shape), empty(has_norm, R, dtype=torch.float32),
                empty(has_norm, R, dtype=torch.float32))
    gate, branch = (_contiguous(gate), _contiguous(branch)) if has_residual else (None, None)
    shift, scale = (_contiguous(shift), _contiguous(scale)) if has_norm else (None, None)
    weight, bias = _contiguous(weight), _contiguous(bias)
    h = torch.empty_like(x) if has_residual else None
    out = torch.empty_like(x) if has_norm else None
    mean = torch.empty(R, device=x.device, dtype=torch.float32) if has_norm else None
    rstd = torch.empty(R, device=x.device, dtype=torch.float32) if has_norm else None
    with torch.cuda.device(x.device):  # the kernel launches on the current device
        ext.adaln_forward(
            _ptr(x), _ptr(gate), _ptr(branch), _ptr(h), _ptr(shift), _ptr(scale), _ptr(weight), _ptr(bias),
            _ptr(out), _ptr(mean), _ptr(rstd), R, N, G, C, float(eps), _extension.dtype_code(x),
            _extension.stream_handle(x),
        )
    return h, out, mean, rstd


def adaln_backward(dout, dh, x_normed, gate, branch, scale, weight, bias, mean, rstd, num_groups):
    """Gradients of adaln_forward.

    ``x_normed`` is the tensor that was normalised (h with a residual, else x). Returns
    (dx, dbranch, dgate, dshift, dscale, dweight, dbias); entries that do not apply are None.
    Per-group sums come back as (B, G, C) in the input dtype, dweight/dbias as (C,).
    """
    ext = _ext()
    has_norm = dout is not None
    has_residual = gate is not None
    like = dout if has_norm else dh
    B, N, C = like.shape
    G = num_groups
    tokens_per_group = N // G
    dtype = like.dtype
    if like.numel() == 0:  # no rows: the per-group and per-column sums are zeros
        zeros = lambda flag, *size: torch.zeros(*size, device=like.device, dtype=dtype) if flag else None  # noqa: E731
        return (torch.empty_like(like), zeros(has_residual, like.shape), zeros(has_residual, B, G, C),
                zeros(has_norm, B, G, C), zeros(has_norm, B, G, C), zeros(weight is not None, C),
                zeros(bias is not None, C))
    code = _extension.dtype_code(like)
    dout, x_normed, scale = (_contiguous(dout), _contiguous(x_normed), _contiguous(scale)) if has_norm else (None,) * 3
    mean, rstd = (_contiguous(mean), _contiguous(rstd)) if has_norm else (None, None)
    dh, gate, branch = (_contiguous(dh), _contiguous(gate), _contiguous(branch)) if has_residual else (None,) * 3
    weight, bias = _contiguous(weight), _contiguous(bias)

    with torch.cuda.device(like.device):  # occupancy query and launch use the current device
        chunks = _backward_chunks(B * G, tokens_per_group, C, code, like.device)
        rows_per_chunk = -(-tokens_per_group // chunks)
        chunks = -(-tokens_per_group // rows_per_chunk)  # no empty chunk
        dx = torch.empty((B, N, C), device=like.device, dtype=dtype)
        dbranch = torch.empty_like(dx) if has_residual else None

        partials = adaln_partials.allocate(B * G, chunks, C, like.device, has_norm, has_residual,
                                           weight is not None, bias is not None)
        ext.adaln_backward(
            _ptr(dout), _ptr(dh), _ptr(x_normed), _ptr(gate), _ptr(branch), _ptr(scale), _ptr(weight),
            _ptr(bias), _ptr(mean), _ptr(rstd), _ptr(dx), _ptr(dbranch), *(_ptr(p) for p in partials),
            B, N, G, C, chunks, rows_per_chunk, code, _extension.stream_handle(like),
        )

    return (dx, dbranch, *adaln_partials.reduce(partials, B, G, C, dtype, weight, bias))
