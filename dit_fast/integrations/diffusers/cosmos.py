"""Cosmos (``CosmosTransformer3DModel``: Cosmos 1 / 2 / 2.5 Predict and Transfer): processors and blocks.

Attention (CosmosAttnProcessor2_0, self- and text cross-attention): per-head RMSNorm (norm_q /
norm_k), Cosmos's RoPE with the model's own tables (per-axis NTK thetas, fps-scaled temporal
positions, rotate-half layout: not apply_rope_3d's convention), attention on dit_fast's kernels;
diffusers' processor names no backend (it follows the process-wide one), dit_fast's goes to
"dit_fast". Cosmos 2.5's image-context cross-attention (CosmosAttnProcessor2_5) stays diffusers'.
Blocks (CosmosTransformerBlock): CosmosAdaLayerNormZero (LayerNorm without affine + adaLN-LoRA
modulation, per sample (B, C) or per token (B, N, C)) -> layernorm_modulate; each gated residual with
the next norm + modulation -> residual_layernorm_modulate; the MLP's gated residual -> gated_residual.
"""

from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import (CosmosAttnProcessor2_0, CosmosTransformer3DModel,
                                                              CosmosTransformerBlock)

from dit_fast.integrations.diffusers import _processor as P


class CosmosProcessor(P.DitFastProcessor):
    """CosmosAttnProcessor2_0 on dit_fast's attention, in the (B, S, heads, D) layout."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))  # (B, S, heads, D)
        key = attn.norm_k(attn.to_k(context).unflatten(2, (attn.heads, -1)))
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2, sequence_dim=1)
        if key.shape[-1] != query.shape[-1]:  # diffusers repeats key channels here; no released Cosmos does
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        hidden_states = self.attend(query, key, value, attention_mask).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def _modulation(norm, embedded_timestep, temb):
    """CosmosAdaLayerNormZero's shift, scale, gate: (B, C) each, or (B, N, C) for per-frame timesteps."""
    emb = norm.linear_2(norm.linear_1(norm.activation(embedded_timestep)))
    if temb is not None:  # adaLN-LoRA
        emb = emb + temb
    return emb.chunk(3, dim=-1)


def _block_forward(self: CosmosTransformerBlock, hidden_states, encoder_hidden_states, embedded_timestep, temb=None,
                   image_rotary_emb=None, extra_pos_emb=None, attention_mask=None, controlnet_residual=None,
                   latents=None, block_idx=None):
    """CosmosTransformerBlock.forward on the fused adaLN ops (same math, fp32 statistics and residuals)."""
    backend = self._dit_fast_backend
    if self.before_proj is not None:  # CosmosControlNet's zero conv
        hidden_states = self.before_proj(hidden_states) + latents
    if extra_pos_emb is not None:
        hidden_states = hidden_states + extra_pos_emb

    # 1. self-attention
    shift, scale, gate_msa = _modulation(self.norm1, embedded_timestep, temb)
    norm_hidden_states = P.layernorm_modulate(self.norm1.norm, hidden_states, shift, scale, backend)
    attn_output = self.attn1(norm_hidden_states, image_rotary_emb=image_rotary_emb)

    # 2. cross-attention: h = x + gate * attn and norm2(h) * (1 + scale) + shift in one pass
    shift, scale, gate_ca = _modulation(self.norm2, embedded_timestep, temb)
    hidden_states, norm_hidden_states = P.residual_layernorm_modulate(self.norm2.norm, hidden_states, gate_msa,
                                                                      attn_output, shift, scale, backend)
    attn_output = self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask)

    # 3. feed-forward
    shift, scale, gate_ff = _modulation(self.norm3, embedded_timestep, temb)
    hidden_states, norm_hidden_states = P.residual_layernorm_modulate(self.norm3.norm, hidden_states, gate_ca,
                                                                      attn_output, shift, scale, backend)
    hidden_states = P.gated_residual(hidden_states, gate_ff, self.ff(norm_hidden_states), backend)

    if controlnet_residual is not None:  # scaled by the controlnet
        hidden_states = hidden_states + controlnet_residual
    if self.after_proj is not None:
        return hidden_states, self.after_proj(hidden_states)
    return hidden_states


def patch(model: CosmosTransformer3DModel, backend: str = "auto") -> CosmosTransformer3DModel:
    attention = [m for m in model.modules() if type(getattr(m, "processor", None)) is CosmosAttnProcessor2_0]
    processors = P.set_processors(attention, lambda attn: CosmosProcessor(attn.processor, backend))
    blocks = [b for b in model.transformer_blocks if type(b) is CosmosTransformerBlock]
    for block in blocks:
        P.replace_forward(block, _block_forward, backend)
    return P.finish(model, {"processors": processors, "blocks": len(blocks)})
