"""Functional ops. Each takes ``backend="auto" | "triton" | "cuda" | "torch"``.

One module per op family; see ARCHITECTURE.md for how a call reaches a kernel.
"""

from dit_fast.ops.adaln import gated_residual, layernorm_modulate, residual_layernorm_modulate
from dit_fast.ops.flash_attention import attention, spacetime_attention
from dit_fast.ops.attention_planner import AttentionPlan, attention_plan
from dit_fast.ops.block_sparse import block_sparse_attention
from dit_fast.ops.patchify import patchify_3d, unpatchify_3d
from dit_fast.ops.rope import RoPE3D, apply_rope_3d

__all__ = [
    "attention",
    "spacetime_attention",
    "attention_plan",
    "block_sparse_attention",
    "AttentionPlan",
    "layernorm_modulate",
    "gated_residual",
    "residual_layernorm_modulate",
    "apply_rope_3d",
    "RoPE3D",
    "patchify_3d",
    "unpatchify_3d",
]
