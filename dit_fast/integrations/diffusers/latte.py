"""Latte (``LatteTransformer3DModel``): processors.

Attention (diffusers' generic AttnProcessor2_0, which calls SDPA itself: only a processor swap reaches
it): the spatial blocks' self-attention over each frame's patches, their cross-attention to the
caption, and the temporal blocks' self-attention over each patch's frames, on dit_fast's kernels
(generic.AttnProcessor). Latte has no RoPE (sin-cos position embeddings are added to the input).
Blocks (BasicTransformerBlock with adaLN-single) stay diffusers' own.
"""

from diffusers.models.attention_processor import AttnProcessor2_0

from dit_fast.integrations.diffusers import _processor as P
from dit_fast.integrations.diffusers.generic import AttnProcessor


def patch(model, backend: str = "auto"):
    attention = [m for m in model.modules() if type(getattr(m, "processor", None)) is AttnProcessor2_0]
    processors = P.set_processors(attention, lambda attn: AttnProcessor(attn.processor, backend))
    return P.finish(model, {"processors": processors, "blocks": 0})
