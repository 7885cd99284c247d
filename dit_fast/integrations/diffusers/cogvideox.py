"""CogVideoX (``CogVideoXTransformer3DModel``): processors and blocks.

Attention (CogVideoXAttnProcessor2_0, which calls SDPA itself: only a processor swap reaches it):
per-head LayerNorm qk-norm (the model's norm_q / norm_k), RoPE on the video tokens with the cos / sin
tables the pipeline passes in (their positions are rescaled crops: not apply_rope_3d's integer grid),
joint attention over [text; video] on dit_fast's kernels.
Blocks (CogVideoXBlock): CogVideoXLayerNormZero (affine LayerNorm + per-sample modulation) ->
layernorm_modulate for the video and text streams; the four gated residuals -> gated_residual.
``fuse_qkv_projections()`` on a patched model fuses the projections and keeps dit_fast's processors
(they read the fused ``to_qkv``); diffusers' own would put FusedCogVideoXAttnProcessor2_0 (SDPA) in
their place. A model fused before patching is patched the same way.
"""

import torch
from diffusers.models.attention_processor import (Attention, CogVideoXAttnProcessor2_0,
                                                  FusedCogVideoXAttnProcessor2_0)
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock, CogVideoXTransformer3DModel

from dit_fast.integrations.diffusers import _processor as P


def rotate_video_tokens(attn, query, key, n_text, image_rotary_emb):
    """q, k (B, n_text + N, heads, D) of a [text; video] joint attention with the pipeline's RoPE tables
    applied to the video tokens only (k too unless the module is a cross-attention)."""
    if image_rotary_emb is None:
        return query, key
    query = torch.cat([query[:, :n_text], apply_rotary_emb(query[:, n_text:], image_rotary_emb, sequence_dim=1)],
                      dim=1)
    if not attn.is_cross_attention:
        key = torch.cat([key[:, :n_text], apply_rotary_emb(key[:, n_text:], image_rotary_emb, sequence_dim=1)],
                        dim=1)
    return query, key


class CogVideoXProcessor(P.DitFastProcessor):
    """CogVideoXAttnProcessor2_0 on dit_fast's attention, in the (B, S, heads, D) layout."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        n_text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [text; video]
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = P.prepared_mask(attn, attention_mask, sequence_length, batch_size)
        query, key, value = P.qkv_heads(attn, hidden_states)  # (B, S, heads, D)
        query, key = rotate_video_tokens(attn, query, key, n_text, image_rotary_emb)
        hidden_states = self.attend(query, key, value, attention_mask)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.flatten(2, 3)))
        encoder_hidden_states, hidden_states = hidden_states.split([n_text, hidden_states.size(1) - n_text], dim=1)
        return hidden_states, encoder_hidden_states


def _norm_zero(norm, hidden_states, encoder_hidden_states, temb, backend):
    """CogVideoXLayerNormZero.forward on layernorm_modulate: (norm_hs, norm_enc, gate, enc_gate)."""
    shift, scale, gate, enc_shift, enc_scale, enc_gate = norm.linear(norm.silu(temb)).chunk(6, dim=1)
    norm_hidden_states = P.layernorm_modulate(norm.norm, hidden_states, shift, scale, backend)
    norm_encoder_hidden_states = P.layernorm_modulate(norm.norm, encoder_hidden_states, enc_shift, enc_scale, backend)
    return norm_hidden_states, norm_encoder_hidden_states, gate, enc_gate


def _block_forward(self: CogVideoXBlock, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                   attention_kwargs=None):
    """CogVideoXBlock.forward on the fused adaLN ops."""
    backend = self._dit_fast_backend
    n_text = encoder_hidden_states.size(1)
    norm_hidden_states, norm_encoder_hidden_states, gate_msa, enc_gate_msa = _norm_zero(
        self.norm1, hidden_states, encoder_hidden_states, temb, backend)
    attn_hidden_states, attn_encoder_hidden_states = self.attn1(
        hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb, **(attention_kwargs or {}))
    hidden_states = P.gated_residual(hidden_states, gate_msa, attn_hidden_states, backend)
    encoder_hidden_states = P.gated_residual(encoder_hidden_states, enc_gate_msa, attn_encoder_hidden_states, backend)

    norm_hidden_states, norm_encoder_hidden_states, gate_ff, enc_gate_ff = _norm_zero(
        self.norm2, hidden_states, encoder_hidden_states, temb, backend)
    ff_output = self.ff(torch.cat([norm_encoder_hidden_states, norm_hidden_states], dim=1))
    hidden_states = P.gated_residual(hidden_states, gate_ff, ff_output[:, n_text:], backend)
    encoder_hidden_states = P.gated_residual(encoder_hidden_states, enc_gate_ff, ff_output[:, :n_text], backend)
    return hidden_states, encoder_hidden_states


def _fuse_qkv_projections(self: CogVideoXTransformer3DModel) -> None:
    """CogVideoXTransformer3DModel.fuse_qkv_projections keeping dit_fast's processors (qkv_heads reads to_qkv)."""
    for module in self.modules():
        if isinstance(module, Attention):
            module.fuse_projections(fuse=True)


def _unfuse_qkv_projections(self: CogVideoXTransformer3DModel) -> None:
    """Back to the separate projections: the fused layers leave (the state dict is the unfused one again)."""
    for module in self.modules():
        if isinstance(module, Attention) and module.fused_projections:
            for name in ("to_qkv", "to_kv", "to_added_qkv"):
                if hasattr(module, name):
                    delattr(module, name)
            module.fused_projections = False


def patch(model: CogVideoXTransformer3DModel, backend: str = "auto") -> CogVideoXTransformer3DModel:
    attention = [m for m in model.modules()
                 if type(getattr(m, "processor", None)) in (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0)]
    processors = P.set_processors(attention, lambda attn: CogVideoXProcessor(attn.processor, backend))
    blocks = [b for b in model.transformer_blocks if type(b) is CogVideoXBlock]
    for block in blocks:
        P.replace_forward(block, _block_forward, backend)
    P.patch_method(model, "fuse_qkv_projections", _fuse_qkv_projections)
    P.patch_method(model, "unfuse_qkv_projections", _unfuse_qkv_projections)
    return P.finish(model, {"processors": processors, "blocks": len(blocks)})
