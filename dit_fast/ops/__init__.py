"""Functional ops. Each takes ``backend="auto" | "triton" | "cuda" | "torch"``.

One module per op family; see ARCHITECTURE.md for how a call reaches a kernel.
"""

from dit_fast.ops.adaln import gated_residual, layernorm_modulate, residual_layernorm_modulate

__all__ = [
    "layernorm_modulate",
    "gated_residual",
    "residual_layernorm_modulate",
]
