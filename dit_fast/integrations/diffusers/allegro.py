"""Allegro (``AllegroTransformer3DModel``): processors.

Attention (AllegroAttnProcessor2_0, which calls SDPA itself: only a processor swap reaches it):
diffusers' generic attention with Allegro's RoPE on the self-attention (the model's position tables,
gathered per token by its positions: ``apply_rotary_emb_allegro``), the caption cross-attention with
its padding as an additive 0 / -10000 mask, on dit_fast's kernels (generic.AttnProcessor).
Blocks (AllegroTransformerBlock, adaLN-single) stay diffusers' own.
"""

from diffusers.models.attention_processor import AllegroAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb_allegro

from dit_fast.integrations.diffusers import _processor as P
from dit_fast.integrations.diffusers.generic import AttnProcessor


def rotate(x, image_rotary_emb):
    """Allegro's RoPE on x (B, heads, S, D): ``image_rotary_emb`` = (freqs, positions)."""
    return apply_rotary_emb_allegro(x, image_rotary_emb[0], image_rotary_emb[1])


def patch(model, backend: str = "auto"):
    attention = [m for m in model.modules() if type(getattr(m, "processor", None)) is AllegroAttnProcessor2_0]
    processors = P.set_processors(attention, lambda attn: AttnProcessor(attn.processor, backend, rotate=rotate))
    return P.finish(model, {"processors": processors, "blocks": 0})
