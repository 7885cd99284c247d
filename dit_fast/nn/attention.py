"""Attention modules of a video DiT: self-attention over the spacetime grid, and cross-attention to text.

Parameter names (and the qk-norm: LayerNorm over the head dim) follow DiT / timm's ``Attention``
(``qkv``, ``q_norm``, ``k_norm``, ``proj``) and PixArt / Open-Sora's ``MultiHeadCrossAttention``
(``q_linear``, ``kv_linear``, ``proj``), so their checkpoints load with ``load_state_dict``.
"""

from typing import Optional, Sequence

import torch
from torch import nn

from dit_fast._checks import check_backend, check_bool, check_int, check_int_triple
from dit_fast.ops.flash_attention import MAX_HEAD_DIM, MODES, attention, spacetime_attention
from dit_fast.ops.rope import as_rope


def check_heads(dim: int, num_heads: int, name: str = "dim") -> int:
    """The head dim of ``dim`` split over ``num_heads``: ValueError unless the attention ops take it."""
    dim, num_heads = check_int(name, dim), check_int("num_heads", num_heads)
    if dim % num_heads != 0:
        raise ValueError(f"{name} = {dim} must be divisible by num_heads = {num_heads}")
    head_dim = dim // num_heads
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name} / num_heads = {dim} / {num_heads} = {head_dim} is not a supported head dim: "
                         f"the attention kernels take 1 to {MAX_HEAD_DIM}")
    return head_dim


def check_tokens(name: str, x, width: int, width_name: str, tokens: str = "S") -> None:
    """x must be a (B, tokens, width) tensor: one ValueError / TypeError naming ``name`` and the shapes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (B, {tokens}, {width_name} = {width}), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != width:
        raise ValueError(f"{name} must be (B, {tokens}, {width_name}) = (B, {tokens}, {width}), got {tuple(x.shape)}")


class SpacetimeAttention(nn.Module):
    """Multi-head self-attention over video tokens: qkv projection, optional qk-norm, attention, projection.

    forward(x, grid): x (B, S, C) with S = T * H * W tokens in (t, h, w) raster order. ``mode``,
    ``window``, ``window_tile`` and ``rope`` are those of ``dit_fast.ops.spacetime_attention``.
    ``sparse``: set by DiTVideo(attention="block_sparse"), a dit_fast.sparse.runtime.SelfAttentionLayer
    that runs the layer's block-sparse attention (and the tokens' order, which may be tile-major).
    """

    sparse = None

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False, mode: str = "full",
                 window: Optional[Sequence[int]] = None, rope=None, backend: str = "auto",
                 window_tile: Optional[Sequence[int]] = None):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, check_heads(dim, num_heads)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        window = None if window is None else check_int_triple("window", window)
        window_tile = None if window_tile is None else check_int_triple("window_tile", window_tile)
        rope = as_rope(rope)
        if rope is not None:
            rope.resolved_split(self.head_dim)  # the head dim must split into three even parts
        self.mode, self.window, self.rope, self.backend = mode, window, rope, check_backend(backend)
        self.window_tile = window_tile
        check_bool("qkv_bias", qkv_bias), check_bool("qk_norm", qk_norm)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        check_tokens("x", x, self.dim, "dim")
        B, S, C = x.shape
        qkv = self.qkv(x).reshape(B, S, 3, self.num_heads, self.head_dim)  # (B, S, 3, heads, D), timm's order
        q, k, v = qkv.unbind(2)  # each (B, S, heads, D): strided views, read in place by the kernels
        q, k = self.q_norm(q), self.k_norm(k)
        if self.sparse is not None:
            x = self.sparse(q, k, v, grid, rope=self.rope, backend=self.backend)  # (B, S, heads, D)
        else:
            x = spacetime_attention(q, k, v, grid, mode=self.mode, window=self.window,
                                    window_tile=self.window_tile, rope=self.rope, backend=self.backend)
        return self.proj(x.reshape(B, S, C))

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, window={self.window}, "
                f"window_tile={self.window_tile}, rope={self.rope!r}")


class CrossAttention(nn.Module):
    """Multi-head cross-attention from video tokens x (B, S, dim) to a context (B, L, context_dim).

    forward(x, context, context_mask=None): context_mask is an optional bool (B, L), True = attend
    (ragged text); a query with no visible context token gets zeros before the output projection.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.head_dim = check_heads(dim, num_heads)
        self.dim, self.context_dim, self.num_heads = dim, check_int("context_dim", context_dim), num_heads
        self.backend = check_backend(backend)
        check_bool("qkv_bias", qkv_bias), check_bool("qk_norm", qk_norm)
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_tokens("x", x, self.dim, "dim")
        check_tokens("context", context, self.context_dim, "context_dim", "L")
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context {tuple(context.shape)} must have x's batch size {x.shape[0]} "
                             f"(x is {tuple(x.shape)})")
        B, S, C = x.shape
        L = context.shape[1]
        if context_mask is not None and (not isinstance(context_mask, torch.Tensor)
                                         or tuple(context_mask.shape) != (B, L)):
            shape = tuple(context_mask.shape) if isinstance(context_mask, torch.Tensor) else type(context_mask).__name__
            raise ValueError(f"context_mask must be (B, L) = ({B}, {L}) like context {tuple(context.shape)}, "
                             f"got {shape}")
        q = self.q_linear(x).reshape(B, S, self.num_heads, self.head_dim)  # (B, S, heads, D)
        kv = self.kv_linear(context).reshape(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, heads, D)
        k, v = kv.unbind(2)  # each (B, L, heads, D)
        q, k = self.q_norm(q), self.k_norm(k)
        x = attention(q, k, v, key_padding_mask=context_mask, backend=self.backend)  # (B, S, heads, D)
        return self.proj(x.reshape(B, S, C))

    def extra_repr(self):
        return f"dim={self.dim}, context_dim={self.context_dim}, num_heads={self.num_heads}"


__all__ = ["SpacetimeAttention", "CrossAttention"]
