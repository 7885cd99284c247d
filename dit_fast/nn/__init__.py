"""Thin nn.Module wrappers over dit_fast.ops."""

from dit_fast.nn.adaln import GatedResidual, ModulatedLayerNorm

__all__ = ["ModulatedLayerNorm", "GatedResidual"]
