"""EasyAnimate (``EasyAnimateTransformer3DModel``): processors.

Attention (EasyAnimateAttnProcessor2_0, which calls SDPA itself: only a processor swap reaches it):
per-head qk-norm, joint attention over [text; video] (one set of projections, or the text's own
add_*_proj in the MMDiT layers), RoPE on the video tokens with the model's 3D tables (resized-crop
positions: not apply_rope_3d's integer grid), attention on dit_fast's kernels.
Blocks (EasyAnimateTransformerBlock) stay diffusers' own.
"""

import torch
from diffusers.models.transformers.transformer_easyanimate import EasyAnimateAttnProcessor2_0

from dit_fast.integrations.diffusers import _processor as P
from dit_fast.integrations.diffusers.cogvideox import rotate_video_tokens


class EasyAnimateProcessor(P.DitFastProcessor):
    """EasyAnimateAttnProcessor2_0 on dit_fast's attention, in the (B, S, heads, D) layout."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        n_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attn.add_q_proj is None and encoder_hidden_states is not None:  # one set of projections for both
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = P.qkv_heads(attn, hidden_states)  # (B, S, heads, D)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:  # MMDiT: the text's own q, k, v
            encoder_query, encoder_key, encoder_value = P.qkv_heads(attn, encoder_hidden_states, "text")
            query = torch.cat([encoder_query, query], dim=1)  # [text; video]
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        query, key = rotate_video_tokens(attn, query, key, n_text, image_rotary_emb)

        hidden_states = self.attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states[:, :n_text], hidden_states[:, n_text:]
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def patch(model, backend: str = "auto"):
    attention = [m for m in model.modules() if type(getattr(m, "processor", None)) is EasyAnimateAttnProcessor2_0]
    processors = P.set_processors(attention, lambda attn: EasyAnimateProcessor(attn.processor, backend))
    return P.finish(model, {"processors": processors, "blocks": 0})
