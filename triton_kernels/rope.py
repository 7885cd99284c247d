"""Triton kernel for the standalone 3D rotary position embedding (RoPE).

x is (B, S, heads, D) with S = T * H * W tokens in (t, h, w) raster order; each pair
(x[2p], x[2p+1]) of a token is rotated by angle = pos_axis(p) * inv_freq[p] where axis(p) is t for
p < PAIRS_T, h for p < PAIRS_TH, else w (the convention lives in dit_fast/ops/rope.py, next to the
readable reference ``apply_rope_3d_reference``).

Angles are computed on the fly from the token index and the (D / 2,) frequency table: no (S, D)
cos/sin table is read. Each program owns BLOCK_S tokens of one sample, computes their cos/sin
once, and reuses them for HEADS_PER_PROGRAM heads.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from dit_fast import _backend
from dit_fast.triton_kernels._layout import aligned_16


@triton.jit
def _rope_3d_kernel(
    X_ptr,  # input, (B, S, heads, D) with strides (stride_xb, stride_xs, stride_xh, 1)
    OUT_ptr,  # output, contiguous (B, S, heads, D)
    INV_FREQ_ptr,  # (D / 2,) fp32 frequency of each pair, axes t, h, w concatenated
    S,  # tokens per sample, T * H * W
    HEADS,
    D: tl.constexpr,  # head dim (even); a constant, so masks on it keep 16-byte vectors
    H,  # grid height
    W,  # grid width
    stride_xb,
    stride_xs,
    stride_xh,
    PAIRS_T,  # d_t / 2: pairs [0, PAIRS_T) rotate with t
    PAIRS_TH,  # (d_t + d_h) / 2: pairs [PAIRS_T, PAIRS_TH) rotate with h, the rest with w
    HEADS_PER_PROGRAM,
    INVERSE: tl.constexpr,  # rotate by -angle (the backward)
    ACCURATE_TRIG: tl.constexpr,  # libdevice sin/cos on GPU (tl.sin/tl.cos are approximate there)
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr,  # x, out and every stride of x multiples of 16 bytes (checked by the launcher)
):
    """RoFormer, https://arxiv.org/abs/2104.09864; 3D split as Wan2.1 / CogVideoX."""
    b = tl.program_id(1).to(tl.int64)  # int64: offsets pass 2^31 at video sizes
    first_head = tl.program_id(2) * HEADS_PER_PROGRAM
    tokens = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    mask = (tokens < S)[:, None] & (cols < D)[None, :]

    # position of each token on each axis, then the one each pair rotates with
    t = tokens // (H * W)
    h = (tokens // W) % H
    w = tokens % W
    pair = tl.arange(0, BLOCK_D // 2)
    pos = tl.where(pair[None, :] < PAIRS_T, t[:, None], tl.where(pair[None, :] < PAIRS_TH, h[:, None], w[:, None]))
    inv_freq = tl.load(INV_FREQ_ptr + pair, mask=pair < D // 2, other=0.0)  # padding pairs: angle 0
    angle = pos.to(tl.float32) * inv_freq[None, :]  # (BLOCK_S, BLOCK_D / 2): one per pair, for every head
    if ACCURATE_TRIG:
        cos = libdevice.cos(angle)
        sin = libdevice.sin(angle)
    else:  # the CPU interpreter evaluates tl.cos / tl.sin with numpy, accurately
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    if INVERSE:
        sin = -sin

    # out[2p] = x[2p] cos - x[2p+1] sin,  out[2p+1] = x[2p+1] cos + x[2p] sin. The pairs are split
    # apart in registers (each thread holds whole pairs), so x is read and written in 16-byte vectors;
    # reading each column's partner again (cols ^ 1) compiled to one 2-byte load per element.
    x_rows = b * stride_xb + tokens.to(tl.int64) * stride_xs  # (BLOCK_S,)
    out_rows = (b * S + tokens.to(tl.int64)) * HEADS * D
    for head in range(first_head, tl.minimum(first_head + HEADS_PER_PROGRAM, HEADS)):
        x_ptrs = X_ptr + (x_rows + head * stride_xh)[:, None] + cols[None, :]
        out_ptrs = OUT_ptr + (out_rows + head * D)[:, None] + cols[None, :]
        if ALIGNED:  # a head stride such as 72 hides the alignment from Triton: say it (bytes)
            x_ptrs = tl.multiple_of(x_ptrs, [16, 16])
            out_ptrs = tl.multiple_of(out_ptrs, [16, 16])
        x = tl.load(x_ptrs, mask=mask, other=0.0)
        even, odd = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_S, BLOCK_D // 2, 2)))
        out = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_S, BLOCK_D))
        tl.store(out_ptrs, out.to(OUT_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher. Arguments are validated by dit_fast.ops.rope; no autograd here.
# ---------------------------------------------------------------------------------------------


def rope_3d(x, grid, inv_freq, split, inverse=False):
    """x (B, S, heads, D) rotated by +angle (-angle with ``inverse``) -> new contiguous tensor.

    grid: (T, H, W); inv_freq: (D / 2,) fp32 on x's device; split: (d_t, d_h, d_w).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, S, heads, D = x.shape
    out = x.new_empty((B, S, heads, D))
    if out.numel() == 0:
        return out
    _, H, W = grid
    block_d = triton.next_power_of_2(D)
    block_s = max(1, min(64, 4096 // block_d))  # ~4k elements per tile
    token_blocks = triton.cdiv(S, block_s)
    # split heads across programs only when tokens alone leave the GPU underfilled
    if x.device.type == "cuda":
        target = 4 * _multiprocessors(x.device)
        head_groups = max(1, min(heads, triton.cdiv(target, token_blocks * B)))
    else:
        head_groups = 1  # the interpreter runs programs one by one
    heads_per_program = triton.cdiv(heads, head_groups)
    head_groups = triton.cdiv(heads, heads_per_program)
    _rope_3d_kernel[(token_blocks, B, head_groups)](
        x, out, inv_freq,
        S, heads, D, H, W,
        x.stride(0), x.stride(1), x.stride(2),
        split[0] // 2, (split[0] + split[1]) // 2,
        heads_per_program,
        INVERSE=bool(inverse),
        ACCURATE_TRIG=not _backend.triton_interpreting(),
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        ALIGNED=aligned_16([x], D),
        num_warps=4,
    )
    return out


def _multiprocessors(device):
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count
