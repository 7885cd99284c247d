"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): processors and blocks.

Attention (HunyuanVideoAttnProcessor2_0, dual- and single-stream blocks): per-head RMSNorm (the
model's norm_q / norm_k), 3D RoPE on the video tokens with theta = rope_theta and split =
rope_axes_dim (interleaved pairs, integer positions: dit_fast's convention) through apply_rope_3d,
joint attention over [video; text] with the text key-padding mask (B, 1, 1, N) on dit_fast's kernels.
Blocks: AdaLayerNormZero / AdaLayerNormZeroSingle -> layernorm_modulate; the gated attention
residual + norm2 + modulation -> residual_layernorm_modulate; the MLP residual -> gated_residual.
The token refiner (2 blocks over the text, a per-query mask) and the token-replace (I2V) blocks'
adaLN (first-frame modulation) stay diffusers' own; the token-replace blocks' processors are patched.
"""

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoAttnProcessor2_0,
                                                                     HunyuanVideoSingleTransformerBlock,
                                                                     HunyuanVideoTransformer3DModel,
                                                                     HunyuanVideoTransformerBlock)

from dit_fast.integrations.diffusers import _processor as P


class HunyuanVideoProcessor(P.DitFastProcessor):
    """HunyuanVideoAttnProcessor2_0 on dit_fast's RoPE and attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:  # [video; text] come in separately and share the projections
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = P.qkv_heads(attn, hidden_states)  # (B, S, heads, D)

        if image_rotary_emb is not None:
            def model_rope(x):
                return apply_rotary_emb(x, image_rotary_emb, sequence_dim=1)

            if single_stream:  # rotate the video tokens only
                n_text = encoder_hidden_states.shape[1]
                query = torch.cat([self.rope(query[:, :-n_text], model_rope), query[:, -n_text:]], dim=1)
                key = torch.cat([self.rope(key[:, :-n_text], model_rope), key[:, -n_text:]], dim=1)
            else:
                query, key = self.rope(query, model_rope), self.rope(key, model_rope)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:  # dual stream: the text's own q, k, v
            encoder_query, encoder_key, encoder_value = P.qkv_heads(attn, encoder_hidden_states, "text")
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        hidden_states = self.attend(query, key, value, attention_mask)  # mask (B, 1, 1, N): text padding
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = P.joint_outputs(attn, hidden_states, encoder_hidden_states.shape[1])
        return hidden_states, encoder_hidden_states


def _modulation(norm, temb, chunks):
    """The AdaLayerNormZero(-Single) projection: ``chunks`` tensors of (B, C)."""
    return norm.linear(norm.silu(temb)).chunk(chunks, dim=1)


def _double_block_forward(self: HunyuanVideoTransformerBlock, hidden_states, encoder_hidden_states, temb,
                          attention_mask=None, freqs_cis=None, *args, **kwargs):
    """HunyuanVideoTransformerBlock.forward on the fused adaLN ops."""
    backend = self._dit_fast_backend
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(self.norm1, temb, 6)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(self.norm1_context,
                                                                                                temb, 6)
    norm_hidden_states = P.layernorm_modulate(self.norm1.norm, hidden_states, shift_msa, scale_msa, backend)
    norm_encoder_hidden_states = P.layernorm_modulate(self.norm1_context.norm, encoder_hidden_states, c_shift_msa,
                                                      c_scale_msa, backend)

    attn_output, context_attn_output = self.attn(hidden_states=norm_hidden_states,
                                                 encoder_hidden_states=norm_encoder_hidden_states,
                                                 attention_mask=attention_mask, image_rotary_emb=freqs_cis)

    hidden_states, norm_hidden_states = P.residual_layernorm_modulate(
        self.norm2, hidden_states, gate_msa, attn_output, shift_mlp, scale_mlp, backend)
    encoder_hidden_states, norm_encoder_hidden_states = P.residual_layernorm_modulate(
        self.norm2_context, encoder_hidden_states, c_gate_msa, context_attn_output, c_shift_mlp, c_scale_mlp, backend)

    hidden_states = P.gated_residual(hidden_states, gate_mlp, self.ff(norm_hidden_states), backend)
    encoder_hidden_states = P.gated_residual(encoder_hidden_states, c_gate_mlp,
                                             self.ff_context(norm_encoder_hidden_states), backend)
    return hidden_states, encoder_hidden_states


def _single_block_forward(self: HunyuanVideoSingleTransformerBlock, hidden_states, encoder_hidden_states, temb,
                          attention_mask=None, image_rotary_emb=None, *args, **kwargs):
    """HunyuanVideoSingleTransformerBlock.forward on the fused adaLN ops."""
    backend = self._dit_fast_backend
    n_text = encoder_hidden_states.shape[1]
    residual = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # (B, N + L, C)
    shift_msa, scale_msa, gate = _modulation(self.norm, temb, 3)
    norm_hidden_states = P.layernorm_modulate(self.norm.norm, residual, shift_msa, scale_msa, backend)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))

    attn_output, context_attn_output = self.attn(hidden_states=norm_hidden_states[:, :-n_text],
                                                 encoder_hidden_states=norm_hidden_states[:, -n_text:],
                                                 attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
    attn_output = torch.cat([attn_output, context_attn_output], dim=1)
    branch = self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
    hidden_states = P.gated_residual(residual, gate, branch, backend)
    return hidden_states[:, :-n_text], hidden_states[:, -n_text:]


def patch(model: HunyuanVideoTransformer3DModel, backend: str = "auto") -> HunyuanVideoTransformer3DModel:
    config = model.config
    patch_size = (config.patch_size_t, config.patch_size, config.patch_size)
    grid = P.record_grid(model, patch_size)
    attention = [m for m in model.modules() if isinstance(getattr(m, "processor", None), HunyuanVideoAttnProcessor2_0)]
    processors = P.set_processors(attention, lambda attn: HunyuanVideoProcessor(
        attn.processor, backend, grid, rope_theta=float(config.rope_theta), rope_split=tuple(config.rope_axes_dim)))
    counts = {"processors": processors, "blocks": 0}
    for block in model.transformer_blocks:
        if type(block) is HunyuanVideoTransformerBlock:
            P.replace_forward(block, _double_block_forward, backend)
            counts["blocks"] += 1
    for block in model.single_transformer_blocks:
        if type(block) is HunyuanVideoSingleTransformerBlock:
            P.replace_forward(block, _single_block_forward, backend)
            counts["blocks"] += 1
    return P.finish(model, counts)
