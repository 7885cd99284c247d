"""ConsisID (``ConsisIDTransformer3DModel``): CogVideoX's plan.

ConsisID is CogVideoX with identity-preserving face cross-attention: its attention modules use
CogVideoXAttnProcessor2_0 (SDPA in the processor: only a processor swap reaches it) and its
ConsisIDBlock computes CogVideoXBlock's math, so both get cogvideox.py's processor and block forward
(per-head LayerNorm qk-norm, RoPE on the video tokens with the pipeline's tables, joint attention on
dit_fast's kernels; CogVideoXLayerNormZero on layernorm_modulate, the gated residuals on
gated_residual). The face perceiver attention (its own matmul + softmax) stays diffusers'.
"""

from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.transformers.consisid_transformer_3d import ConsisIDBlock

from dit_fast.integrations.diffusers import _processor as P
from dit_fast.integrations.diffusers.cogvideox import CogVideoXProcessor, _block_forward


def patch(model, backend: str = "auto"):
    attention = [m for m in model.modules() if type(getattr(m, "processor", None)) is CogVideoXAttnProcessor2_0]
    processors = P.set_processors(attention, lambda attn: CogVideoXProcessor(attn.processor, backend))
    blocks = [b for b in model.transformer_blocks if type(b) is ConsisIDBlock]
    for block in blocks:
        P.replace_forward(block, _block_forward, backend)
    return P.finish(model, {"processors": processors, "blocks": len(blocks)})
