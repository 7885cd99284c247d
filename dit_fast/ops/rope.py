"""3D rotary position embedding (RoPE) over a (T, H, W) token grid.

Convention (shared by the reference, the standalone kernels and the rotation fused into attention):
  * tokens are in (t, h, w) raster order: token s sits at t = s // (H * W), h = (s // W) % H, w = s % W;
  * the head dim D is split into (d_t, d_h, d_w), each even; the default is Wan2.1's split
    d_h = d_w = 2 * (D // 6), d_t = D - d_h - d_w (D = 128 -> (44, 42, 42); D = 72 -> (24, 24, 24));
  * within the part of axis a, pair i = (x[2i], x[2i+1]) (interleaved, as Wan and CogVideoX) is rotated
    by the angle pos_a * theta ** (-2i / d_a).
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class RoPE3D:
    """How q and k are rotated: base ``theta`` and the head-dim ``split`` (d_t, d_h, d_w), or None for Wan's."""

    theta: float = 10000.0
    split: Optional[Tuple[int, int, int]] = None

    def resolved_split(self, head_dim: int) -> Tuple[int, int, int]:
        return rope_split(head_dim, self.split)


def rope_split(head_dim: int, split: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """The (d_t, d_h, d_w) split of ``head_dim``; validates a user-given one."""
    if split is None:
        d_hw = 2 * (head_dim // 6)
        split = (head_dim - 2 * d_hw, d_hw, d_hw)
    split = tuple(int(s) for s in split)
    if len(split) != 3 or sum(split) != head_dim or any(s < 0 or s % 2 for s in split):
        raise ValueError(f"rope split must be three even sizes summing to head_dim={head_dim}, got {split}")
    return split


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
                   split: Optional[Sequence[int]] = None, device=None) -> Tensor:
    """(S, D / 2) fp32 rotation angle of each (token, pair)."""
    positions = grid_positions(grid, device).to(torch.float64)  # (S, 3)
    angles = []
    for axis, d_axis in enumerate(rope_split(head_dim, split)):
        inv_freq = theta ** (-torch.arange(0, d_axis, 2, device=device, dtype=torch.float64) / d_axis)  # (d_a / 2,)
        angles.append(positions[:, axis, None] * inv_freq[None, :])  # (S, d_a / 2)
    return torch.cat(angles, dim=1).to(torch.float32)


def apply_rope_3d_reference(x: Tensor, grid: Sequence[int], theta: float = 10000.0,
                            split: Optional[Sequence[int]] = None) -> Tensor:
    """Rotates x: (B, S, heads, D) with S = T * H * W; math in fp32, result in x.dtype."""
    B, S, heads, D = x.shape
    angles = rope_3d_angles(grid, D, theta, split, x.device)  # (S, D / 2)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, S, 1, D / 2)
    pairs = x.float().reshape(B, S, heads, D // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.reshape(B, S, heads, D).to(x.dtype)
