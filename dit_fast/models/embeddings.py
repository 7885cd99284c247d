"""Embedding layers of DiTVideo: 3D patches, timesteps, class labels, captions, 3D sin-cos positions.

Key names follow facebookresearch/DiT (x_embedder.proj, t_embedder.mlp.0/2, y_embedder.embedding_table)
so that an image DiT state dict loads into a video model with patch (1, p, p).
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_fast._checks import check_backend, check_bool, check_int, check_int_triple, check_number
from dit_fast.ops.patchify import patchify_3d
from dit_fast.ops.rope import check_grid


#################################################################################
#                                 Patch Embedding                               #
#################################################################################

class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) video -> (B, N, D) tokens of (pt, ph, pw) patches in (t, h, w) raster order.

    The weight is stored as a Conv3d (``proj``) so DiT's Conv2d weight (D, C, p, p) loads as (D, C, 1, p, p);
    the forward is ``patchify_3d`` then one matmul, which is what a strided conv computes.
    """

    def __init__(self, patch_size: Sequence[int], in_channels: int, hidden_size: int, bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        self.patch_size = check_int_triple("patch_size", patch_size)
        check_int("in_channels", in_channels), check_int("hidden_size", hidden_size), check_bool("bias", bias)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = patchify_3d(x, self.patch_size, order="cthw", backend=self.backend)  # (B, N, C * pt * ph * pw)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (D, C * pt * ph * pw)
        return F.linear(tokens, weight, self.proj.bias)  # (B, N, D)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DiT's sinusoidal embedding: t of any shape (...,) -> (..., dim) as [cos, sin] in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs  # (..., half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[..., :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps, (B,) or per frame (B, T), into vectors (B, D) or (B, T, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        check_int("hidden_size", hidden_size), check_int("frequency_embedding_size", frequency_embedding_size, 2)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (..., 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (..., D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; the extra last row is the "no label" of classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        check_int("num_classes", num_classes), check_int("hidden_size", hidden_size)
        check_number("dropout_prob", dropout_prob, 0, 1, high_open=True)
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: Tensor, drop_ids: Optional[Tensor] = None) -> Tensor:
        if drop_ids is not None:
            if self.dropout_prob <= 0:
                raise ValueError("this model was built with class_dropout_prob=0, so it has no null class for "
                                 "classifier-free guidance")
            labels = torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)  # (B,)
        return self.embedding_table(labels)  # (B, D)


class CaptionEmbedder(nn.Module):
    """Projects text-encoder tokens (B, L, text_dim) to the width of the model, as PixArt's caption MLP.

    ``null_embedding`` is the learned "no caption" token used by classifier-free guidance.
    """

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        check_int("text_dim", text_dim), check_int("hidden_size", hidden_size)
        self.fc1 = nn.Linear(text_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.null_embedding = nn.Parameter(torch.randn(text_dim) / text_dim ** 0.5)

    def forward(self, text: Tensor, text_mask: Optional[Tensor], drop_ids: Optional[Tensor] = None):
        """Returns the projected tokens (B, L, D) and the key mask (B, L), True where a token is real."""
        B, L, _ = text.shape
        mask = torch.ones(B, L, dtype=torch.bool, device=text.device) if text_mask is None else text_mask.bool()
        if drop_ids is not None:
            null = self.null_embedding.to(text.dtype).expand(B, L, -1)  # (B, L, text_dim)
            text = torch.where(drop_ids[:, None, None], null, text)  # (B, L, text_dim)
            mask = mask | drop_ids[:, None]  # a dropped caption is L copies of the null token
        x = self.fc2(F.gelu(self.fc1(text), approximate="tanh"))  # (B, L, D)
        return x, mask


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def sincos_1d(embed_dim: int, pos: Tensor) -> Tensor:
    """DiT's 1D table: positions (M,) -> (M, embed_dim) as [sin, cos] in float64."""
    if check_int("embed_dim", embed_dim) % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos table, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (D/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_hw: Sequence[int]) -> Tensor:
    """DiT's 2D table for an (H, W) grid in raster order -> (H * W, embed_dim), float64.

    As in DiT, the first half encodes the column (w) and the second half the row (h).
    """
    if check_int("embed_dim", embed_dim) % 4:
        raise ValueError(f"hidden size must be a multiple of 4 for 2D sin-cos positions, got {embed_dim}")
    H, W = check_grid((1, *grid_hw), "grid_hw")[1:]
    h, w = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")  # (H, W) each
    return torch.cat([sincos_1d(embed_dim // 2, w), sincos_1d(embed_dim // 2, h)], dim=1)  # (H * W, D)


def get_3d_sincos_pos_embed(embed_dim: int, grid: Sequence[int]) -> Tensor:
    """(T * H * W, embed_dim) float32 table for a (T, H, W) token grid in (t, h, w) raster order.

    DiT's 2D table over (h, w) plus a 1D table over t shifted to be zero at t = 0 (Latte adds a
    temporal table the same way); frame 0, and so any single image, gets exactly DiT's embedding.
    """
    T, H, W = check_grid(grid)
    spatial = get_2d_sincos_pos_embed(embed_dim, (H, W))  # (H * W, D)
    t = torch.arange(T)
    temporal = sincos_1d(embed_dim, t) - sincos_1d(embed_dim, torch.zeros(1))  # (T, D), zero at t = 0
    table = temporal[:, None, :] + spatial[None, :, :]  # (T, H * W, D)
    return table.reshape(T * H * W, embed_dim).float()
