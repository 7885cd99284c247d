"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): processors and blocks.

Attention (HunyuanVideo15AttnProcessor2_0, dual-stream blocks): per-head RMSNorm (norm_q / norm_k,
norm_added_q / norm_added_k), HunyuanVideo's 3D RoPE on the video tokens (theta = rope_theta, split =
rope_axes_dim, integer positions) through apply_rope_3d, joint attention over [video; text] on
dit_fast's kernels. diffusers builds a (valid query) x (valid key) mask (B, 1, S, S), which the
backend cannot take (it differs between queries: a padded text query sees nothing); here the same
attention is a key-padding mask on the kernels, then the padded queries' rows set to zero, which is
what diffusers' mask gives them (a row with every key masked: zeros).
Blocks (HunyuanVideo15TransformerBlock): HunyuanVideo's dual-stream block math (AdaLayerNormZero,
LayerNorm + modulation, gated residuals), run by hunyuan_video's block forward on the fused adaLN ops.
The token refiner (AttnProcessor2_0, SDPA) stays diffusers' own.
"""

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import (HunyuanVideo15AttnProcessor2_0,
                                                                       HunyuanVideo15Transformer3DModel,
                                                                       HunyuanVideo15TransformerBlock)

from dit_fast.integrations.diffusers import _processor as P
from dit_fast.integrations.diffusers.hunyuan_video import _double_block_forward


def _model_rope(image_rotary_emb):
    """The model's own rotation by its (cos, sin) tables (a context-parallel shard, a call without a grid)."""
    return lambda x: apply_rotary_emb(x, image_rotary_emb, sequence_dim=1)


class HunyuanVideo15Processor(P.DitFastProcessor):
    """HunyuanVideo15AttnProcessor2_0 on dit_fast's RoPE and attention, text padding as a key-padding mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value = P.qkv_heads(attn, hidden_states)  # (B, N, heads, D)
        if image_rotary_emb is not None:  # the video tokens only
            query = self.rope(query, _model_rope(image_rotary_emb))
            key = self.rope(key, _model_rope(image_rotary_emb))
        if encoder_hidden_states is not None:  # the text's own q, k, v
            encoder_query, encoder_key, encoder_value = P.qkv_heads(attn, encoder_hidden_states, "text")
            query = torch.cat([query, encoder_query], dim=1)  # (B, N + L, heads, D)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        valid = None
        if attention_mask is not None:  # (B, L) over the text -> (B, N + L), every video token valid
            valid = F.pad(attention_mask, (query.shape[1] - attention_mask.shape[1], 0), value=True).bool()
        hidden_states = self.attend(query, key, value, None if valid is None else valid[:, None, None, :])
        if valid is not None:  # padded queries: zeros, as diffusers' (valid query) x (valid key) mask gives
            hidden_states = hidden_states * valid[:, :, None, None].to(hidden_states.dtype)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = P.joint_outputs(attn, hidden_states, encoder_hidden_states.shape[1])
        return hidden_states, encoder_hidden_states


def patch(model: HunyuanVideo15Transformer3DModel, backend: str = "auto") -> HunyuanVideo15Transformer3DModel:
    config = model.config
    grid = P.record_grid(model, (config.patch_size_t, config.patch_size, config.patch_size))
    attention = [m for m in model.modules()
                 if type(getattr(m, "processor", None)) is HunyuanVideo15AttnProcessor2_0]
    processors = P.set_processors(attention, lambda attn: HunyuanVideo15Processor(
        attn.processor, backend, grid, rope_theta=float(config.rope_theta), rope_split=tuple(config.rope_axes_dim)))
    blocks = [b for b in model.transformer_blocks if type(b) is HunyuanVideo15TransformerBlock]
    for block in blocks:
        P.replace_forward(block, _double_block_forward, backend)
    return P.finish(model, {"processors": processors, "blocks": len(blocks)})
