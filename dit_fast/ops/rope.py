"""3D rotary position embedding (RoPE) over a (T, H, W) token grid.

Convention (shared by the reference, the standalone kernels and the rotation fused into attention):
  * tokens are in (t, h, w) raster order: token s sits at t = s // (H * W), h = (s // W) % H, w = s % W;
  * the head dim D is split into (d_t, d_h, d_w), each even; the default is Wan2.1's split
    d_h = d_w = 2 * (D // 6), d_t = D - d_h - d_w (D = 128 -> (44, 42, 42); D = 72 -> (24, 24, 24));
  * within the part of axis a, pair i = (x[2i], x[2i+1]) (interleaved, as Wan and CogVideoX) is rotated
    by the angle pos_a * theta ** (-2i / d_a).

Standalone op: ``apply_rope_3d(x, grid)`` rotates x (B, S, heads, D) with S = T * H * W. Its backward
is the rotation by the negative angle (a rotation's inverse is its transpose). Call flow as in
dit_fast/ops/adaln.py: "torch" runs ``apply_rope_3d_reference``; kernels run under the custom op
``torch.ops.dit_fast.rope_3d`` -> dit_fast/triton_kernels/rope.py or dit_fast/cuda/rope.py (csrc/rope.cu).
Both kernels compute the angles on the fly from the token index and a (D / 2,) table of the
per-pair frequencies (``rope_inv_freq``): no (S, D) cos/sin table is read from memory.
"""

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dit_fast import _backend


@dataclass(frozen=True)
class RoPE3D:
    """How q and k are rotated: base ``theta`` and the head-dim ``split`` (d_t, d_h, d_w), or None for Wan's."""

    theta: float = 10000.0
    split: Optional[Tuple[int, int, int]] = None

    def __post_init__(self):
        check_theta(self.theta)
        if self.split is not None:  # the sum is checked against the head dim when it is known
            object.__setattr__(self, "split", _split_ints(self.split))

    def resolved_split(self, head_dim: int) -> Tuple[int, int, int]:
        return rope_split(head_dim, self.split)


def _split_ints(split) -> Tuple[int, int, int]:
    """Three even non-negative ints; floats and strings are refused, never truncated."""
    try:
        if isinstance(split, (str, bytes)) or any(isinstance(s, bool) for s in split):
            raise TypeError
        values = tuple(operator.index(s) for s in split)  # ints, numpy ints, 0-d integer tensors
    except TypeError:
        raise ValueError(f"rope split must be three even ints (d_t, d_h, d_w), got {split!r}") from None
    if len(values) != 3 or any(s < 0 or s % 2 for s in values):
        raise ValueError(f"rope split must be three even ints (d_t, d_h, d_w), got {split!r}")
    return values


def rope_split(head_dim: int, split: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """The (d_t, d_h, d_w) split of ``head_dim``; validates a user-given one."""
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of head-dim columns: the head dim must be even, got D = {head_dim}")
    if split is None:
        d_hw = 2 * (head_dim // 6)
        split = (head_dim - 2 * d_hw, d_hw, d_hw)
    split = _split_ints(split)
    if sum(split) != head_dim:
        raise ValueError(f"rope split must be three even sizes summing to head_dim={head_dim}, got {split}")
    return split


def check_theta(theta) -> float:
    """RoPE's base: a finite number >= 1. Below 1 the frequencies theta ** (-2i / d) grow past 1 rad per
    position (theta=1e-300 overflows float32 to inf, then NaN), and the fp32 angles lose all precision."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 1 <= theta < float("inf"):
        raise ValueError(f"theta must be a positive finite number >= 1 (RoPE's base, 10000 by default), "
                         f"got {theta!r}")
    return float(theta)


def as_rope(rope) -> Optional[RoPE3D]:
    """Normalizes the ``rope=`` argument of the ops: None, "3d" or a RoPE3D."""
    if rope is None or isinstance(rope, RoPE3D):
        return rope
    if rope == "3d":
        return RoPE3D()
    raise ValueError(f"rope must be None, '3d' or a dit_fast.ops.RoPE3D, got {rope!r}")


def grid_positions(grid: Sequence[int], device=None) -> Tensor:
    """(S, 3) int64 (t, h, w) position of each token of a (T, H, W) grid in raster order."""
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T, device=device), torch.arange(H, device=device),
                             torch.arange(W, device=device), indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def rope_3d_angles(grid: Sequence[int], head_dim: int, theta: float = 10000.0,
                   split: Optional[Sequence[int]] = None, device=None, dtype=torch.float32) -> Tensor:
    """(S, D / 2) rotation angle of each (token, pair), computed in fp64, returned in ``dtype`` (fp32)."""
    positions = grid_positions(grid, device).to(torch.float64)  # (S, 3)
    angles = []
    for axis, d_axis in enumerate(rope_split(head_dim, split)):
        inv_freq = theta ** (-torch.arange(0, d_axis, 2, device=device, dtype=torch.float64) / d_axis)  # (d_a / 2,)
        angles.append(positions[:, axis, None] * inv_freq[None, :])  # (S, d_a / 2)
    return torch.cat(angles, dim=1).to(dtype)


def apply_rope_3d_reference(x: Tensor, grid: Sequence[int], theta: float = 10000.0,
                            split: Optional[Sequence[int]] = None) -> Tensor:
    """Rotates x: (B, S, heads, D) with S = T * H * W; math in fp32 (fp64 for fp64 x), result in x.dtype."""
    B, S, heads, D = x.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp64: the tests' oracle
    angles = rope_3d_angles(grid, D, theta, split, x.device, dtype=compute)  # (S, D / 2)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, S, 1, D / 2)
    pairs = x.to(compute).reshape(B, S, heads, D // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.reshape(B, S, heads, D).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The CPU path: the reference's math with cached tables, a block of tokens at a time.
# ---------------------------------------------------------------------------------------------
# On CPU, backend "auto" (and "torch") runs this. Per element it does what apply_rope_3d_reference does
# (the same fp32 cos / sin of the same fp32 angles, the same products and sums, one rounding: bitwise
# the same, tests/test_rope.py), but the cos / sin tables are built once per (grid, D, theta, split)
# instead of on every call, and the fp32 temporaries hold one block of tokens, not the whole tensor (an
# fp32 copy of a large bf16 q is twice its size, and allocations that large come from fresh pages on
# every call). Models run RoPE eagerly the same way: tables built once (Wan, CogVideoX).

CPU_BLOCK_BYTES = 4 << 20  # fp32 bytes of one block of x: below glibc's 32 MB mmap ceiling, few blocks
_CPU_TABLES: Dict[tuple, Tuple[Tensor, Tensor]] = {}
_CPU_TABLES_MAX = 8  # the grids of one model (training size, sampling sizes); the oldest goes first


def _cpu_tables(grid, head_dim, theta, split, device) -> Tuple[Tensor, Tensor]:
    """(cos, sin), each (S, D / 2) fp32, of rope_3d_angles: cached."""
    key = (tuple(grid), head_dim, float(theta), tuple(split) if split is not None else None, torch.device(device))
    tables = _CPU_TABLES.get(key)
    if tables is None:
        with torch.inference_mode(False):  # a cache: ordinary tensors even if first built under inference_mode
            angles = rope_3d_angles(grid, head_dim, theta, split, device, dtype=torch.float32)
            tables = _CPU_TABLES[key] = (angles.cos(), angles.sin())
        while len(_CPU_TABLES) > _CPU_TABLES_MAX:
            _CPU_TABLES.pop(next(iter(_CPU_TABLES)))
    return tables


def apply_rope_3d_cpu(x: Tensor, grid: Sequence[int], theta: float = 10000.0, split: Optional[Sequence[int]] = None,
                      block_bytes: int = CPU_BLOCK_BYTES) -> Tensor:
    """apply_rope_3d_reference (fp32 / fp16 / bf16 x), with cached tables, a block of tokens at a time."""
    B, S, heads, D = x.shape
    if x.numel() == 0:  # empty batch, heads or head dim: nothing to rotate
        return apply_rope_3d_reference(x, grid, theta, split)
    cos, sin = _cpu_tables(grid, D, theta, split, x.device)
    tokens = max(1, block_bytes // (4 * heads * D))
    grad = torch.is_grad_enabled() and x.requires_grad

    spans = [(lo, min(lo + tokens, S)) for _ in range(B) for lo in range(0, S, tokens)]
    sizes = [hi - lo for lo, hi in spans]

    def split(t):  # (B, S, heads, D) -> one (tokens, heads, D) view per block; split's backward joins once
        return t.reshape(B * S, heads, D).split(sizes)

    def block(part, lo, hi):
        pairs = part.float().reshape(hi - lo, heads, D // 2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        c, s = cos[lo:hi, None], sin[lo:hi, None]  # (tokens, 1, D / 2)
        return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).reshape(hi - lo, heads, D)

    if grad:
        return torch.cat([block(part, lo, hi).to(x.dtype) for part, (lo, hi) in zip(split(x), spans, strict=True)]
                         ).view(B, S, heads, D)
    out = torch.empty(B, S, heads, D, dtype=x.dtype, device=x.device)
    for target, part, (lo, hi) in zip(split(out), split(x), spans, strict=True):
        target.copy_(block(part, lo, hi))
    return out


def rope_inv_freq_reference(head_dim: int, theta: float = 10000.0,
                            split: Optional[Sequence[int]] = None, device=None) -> Tensor:
    """(D / 2,) fp32 frequency of each pair, the axes' parts concatenated (t, h, w): the kernels' table.

    Pair p belongs to axis t for p < d_t / 2, to h for p < (d_t + d_h) / 2, else to w; its angle is
    pos_axis * inv_freq[p]. Computed in fp64 as in ``rope_3d_angles``, then rounded once to fp32.
    """
    parts = [theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float64) / d) for d in rope_split(head_dim, split)]
    return torch.cat(parts).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Input checks: clear ValueError / TypeError naming the argument and the shapes.
# ---------------------------------------------------------------------------------------------

OP = "rope_3d"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 1024  # one token's head dim is one tile of the Triton kernel and one CUDA block's table


def check_grid(grid, name: str = "grid") -> Tuple[int, int, int]:
    """A (T, H, W) of three positive ints, or ValueError."""
    try:
        if any(isinstance(v, bool) for v in grid):
            raise TypeError
        values = tuple(operator.index(v) for v in grid)  # ints, numpy ints, 0-d integer tensors
    except TypeError:
        raise ValueError(f"{name} must be a (T, H, W) tuple of positive ints, got {grid!r}") from None
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(f"{name} must be a (T, H, W) tuple of positive ints, got {grid!r}")
    return values


def _check_rope_inputs(x, grid, theta, split):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, S, heads, D), got shape {tuple(x.shape)}")
    grid = check_grid(grid)
    T, H, W = grid
    B, S, heads, D = x.shape
    if T * H * W != S:
        raise ValueError(f"grid {grid} has T * H * W = {T * H * W} tokens but x {tuple(x.shape)} has S = {S}")
    if D % 2:
        raise ValueError(f"x has an odd head dim D = {D} (shape {tuple(x.shape)}); RoPE rotates pairs")
    split = rope_split(D, split)
    check_theta(theta)
    return grid, split


# ---------------------------------------------------------------------------------------------
# Kernel dispatch and torch.library registration.
# ---------------------------------------------------------------------------------------------

_inv_freq_cache: Dict[tuple, Tensor] = {}


def rope_inv_freq(head_dim: int, theta: float, split: Sequence[int], device) -> Tensor:
    """``rope_inv_freq_reference`` cached per device: built with device ops, so no host sync."""
    key = (head_dim, float(theta), tuple(split), torch.device(device))
    table = _inv_freq_cache.get(key)
    if table is None:
        with torch.inference_mode(False):  # a cache: ordinary tensors even if first built under inference_mode
            table = _inv_freq_cache[key] = rope_inv_freq_reference(head_dim, theta, split, device)
    return table


def _launchers(backend: str):
    if backend == "triton":
        from dit_fast.triton_kernels import rope
    elif backend == "cuda":
        from dit_fast.cuda import rope
    else:
        raise ValueError(f"no RoPE kernels for backend {backend!r}")
    return rope


@torch.library.custom_op("dit_fast::rope_3d", mutates_args=())
def _rope_3d(x: Tensor, grid: List[int], theta: float, split: List[int], inverse: bool, backend: str) -> Tensor:
    """x rotated by +angle (or -angle with ``inverse``); a new contiguous (B, S, heads, D) tensor."""
    inv_freq = rope_inv_freq(x.shape[-1], theta, split, x.device)

    def run(name):
        return _launchers(name).rope_3d(x, tuple(grid), inv_freq, tuple(split), inverse)

    if backend == "auto":
        names = _backend.runnable_kernel_backends(x.device)
        key = (x.dtype, _backend.shape_class(x.numel()), x.shape[-1], x.is_contiguous())
        backend = _backend.pick_fastest(OP, key, {n: (lambda n=n: run(n)) for n in names})
    return run(backend)


@_rope_3d.register_fake
def _rope_3d_fake(x, grid, theta, split, inverse, backend):
    return x.new_empty(x.shape)


def _rope_setup_context(ctx, inputs, output):
    _, ctx.grid, ctx.theta, ctx.split, ctx.inverse, ctx.backend = inputs


def _rope_backward(ctx, grad):
    # out = R(angle) x  =>  dx = R(angle)^T dout = R(-angle) dout
    dx = torch.ops.dit_fast.rope_3d(grad, ctx.grid, ctx.theta, ctx.split, not ctx.inverse, ctx.backend)
    return dx, None, None, None, None, None


_rope_3d.register_autograd(_rope_backward, setup_context=_rope_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function (re-exported by dit_fast.ops).
# ---------------------------------------------------------------------------------------------


def apply_rope_3d(x: Tensor, grid: Sequence[int], *, theta: float = 10000.0,
                  split: Optional[Sequence[int]] = None, backend: str = "auto") -> Tensor:
    """Rotates x: (B, S, heads, D) by 3D RoPE over the token grid (T, H, W), S = T * H * W.

    ``split`` is the head-dim split (d_t, d_h, d_w), Wan's by default (see the module docstring).
    Any strides in B, S and heads are read in place when D is contiguous; the result is a new
    contiguous tensor in x.dtype, with the rotation computed in fp32. Differentiable in x.
    """
    grid, split = _check_rope_inputs(x, grid, theta, split)
    name = _backend.resolve_backend(backend, x.device, OP, implemented=("triton", "cuda"))
    if name == "torch":
        if x.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled: the reference, fused
            return apply_rope_3d_cpu(x, grid, theta, split)
        return apply_rope_3d_reference(x, grid, theta, split)
    if x.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"x has head dim D = {x.shape[-1]}; the {name} kernels support D <= {MAX_HEAD_DIM} "
                         "(use backend='torch')")
    return torch.ops.dit_fast.rope_3d(x, list(grid), float(theta), list(split), False, name)
