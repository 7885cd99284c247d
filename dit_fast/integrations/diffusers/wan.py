"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): processors and blocks.

Attention (WanAttnProcessor): RMSNorm over all heads (the model's norm_q / norm_k), Wan's 3D RoPE
(theta 10000, split d_h = d_w = 2 (D // 6), d_t the rest, interleaved pairs: dit_fast's default
convention) through apply_rope_3d, attention on the dit_fast backend; I2V's image keys included.
Blocks (WanTransformerBlock): FP32LayerNorm + modulation -> layernorm_modulate; gated residual ->
gated_residual; the cross-attention residual + norm3 + modulation -> residual_layernorm_modulate.
Modulation per sample (B, 6, C), or per token (B, S, 6, C) for Wan 2.2 TI2V's per-token timesteps:
one adaLN group per token.
"""

import torch
from diffusers.models.transformers.transformer_wan import (WanAttention, WanTransformer3DModel,
                                                           WanTransformerBlock, _get_added_kv_projections,
                                                           _get_qkv_projections)

from dit_fast.integrations.diffusers import _processor as P

WAN_ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default, which WanTransformer3DModel uses


class WanProcessor(P.DitFastProcessor):
    """WanAttnProcessor on dit_fast's RoPE and attention."""

    def __call__(self, attn: WanAttention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:  # I2V: the first tokens are image tokens (the text is 512 long)
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # (B, S, heads, D)
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            cos, sin = rotary_emb[0][..., 0::2], rotary_emb[1][..., 1::2]  # (1, S, 1, D / 2) per pair
            query = self.rope(query, lambda x: P.rotate_pairs(x, cos, sin))
            key = self.rope(key, lambda x: P.rotate_pairs(x, cos, sin))

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = self.attend(query, key_img, value_img, parallel=False)
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

        # cross-attention runs unsharded under context parallelism, as in diffusers (its PR 12909)
        hidden_states = self.attend(query, key, value, attention_mask, parallel=encoder_hidden_states is None)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _block_forward(self: WanTransformerBlock, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """WanTransformerBlock.forward on the fused adaLN ops (same math, fp32 statistics and residuals)."""
    backend = self._dit_fast_backend
    if temb.ndim == 4:  # (B, S, 6, C): Wan 2.2 TI2V, one modulation per token
        mods = (self.scale_shift_table.unsqueeze(0) + temb.float()).unbind(2)  # 6 x (B, S, C)
    else:  # (B, 6, C)
        mods = (self.scale_shift_table + temb.float()).unbind(1)  # 6 x (B, C)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods

    # 1. self-attention
    norm_hidden_states = P.layernorm_modulate(self.norm1, hidden_states, shift_msa, scale_msa, backend)
    attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
    hidden_states = P.gated_residual(hidden_states, gate_msa, attn_output, backend)

    # 2. cross-attention (norm2: an affine FP32LayerNorm without modulation, or Identity)
    norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
    attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)

    # 3. feed-forward: h = x + attn_output and norm3(h) * (1 + scale) + shift in one pass (gate = 1)
    ones = torch.ones_like(c_gate_msa)
    hidden_states, norm_hidden_states = P.residual_layernorm_modulate(
        self.norm3, hidden_states, ones, attn_output, c_shift_msa, c_scale_msa, backend)
    ff_output = self.ffn(norm_hidden_states)
    return P.gated_residual(hidden_states, c_gate_msa, ff_output, backend)


def patch(model: WanTransformer3DModel, backend: str = "auto") -> WanTransformer3DModel:
    patch_size = tuple(model.config.patch_size)
    grid = P.record_grid(model, patch_size)
    blocks = [b for b in model.blocks if isinstance(b, WanTransformerBlock)]
    processors = P.set_processors(
        [m for b in blocks for m in (b.attn1, b.attn2)],
        lambda attn: WanProcessor(attn.processor, backend, grid, rope_theta=WAN_ROPE_THETA,
                                  rope_split=(model.rope.t_dim, model.rope.h_dim, model.rope.w_dim)))
    for block in blocks:
        P.replace_forward(block, _block_forward, backend)
    return P.finish(model, {"processors": processors, "blocks": len(blocks)})
