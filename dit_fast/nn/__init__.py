"""Thin nn.Module wrappers over dit_fast.ops."""

from dit_fast.nn.adaln import GatedResidual, ModulatedLayerNorm
from dit_fast.nn.attention import CrossAttention, SpacetimeAttention

__all__ = ["ModulatedLayerNorm", "GatedResidual", "SpacetimeAttention", "CrossAttention"]
