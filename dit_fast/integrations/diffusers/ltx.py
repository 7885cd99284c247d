"""LTX-Video (``LTXVideoTransformer3DModel``): processors and gated residuals.

Attention (LTXVideoAttnProcessor): RMSNorm over all heads (norm_q / norm_k), LTX's RoPE with the
model's own tables (fractional positions, frequencies interleaved across the three axes over the
whole inner dim: not apply_rope_3d's convention), attention on dit_fast's kernels; the text mask
(LTX's additive 0 / -10000, (B, 1, L)) becomes a key-padding mask on the dit_fast backend.
Blocks: LTX normalises with RMSNorm, which the LayerNorm adaLN ops do not compute, so only the two
gated residuals (per-token gates, (B, T, C)) run on ``gated_residual``.
"""

from diffusers.models.transformers.transformer_ltx import (LTXAttention, LTXVideoAttnProcessor,
                                                           LTXVideoTransformer3DModel, LTXVideoTransformerBlock,
                                                           apply_rotary_emb)

from dit_fast.integrations.diffusers import _processor as P


class LTXProcessor(P.DitFastProcessor):
    """LTXVideoAttnProcessor on dit_fast's attention."""

    def __call__(self, attn: LTXAttention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None
                                          else encoder_hidden_states).shape
        # (B, 1, L) additive -> (B, heads, 1, L), as diffusers prepares it
        attention_mask = P.prepared_mask(attn, attention_mask, sequence_length, batch_size)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(encoder_hidden_states))
        value = attn.to_v(encoder_hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # (B, S, heads, D)
        hidden_states = self.attend(query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def _block_forward(self: LTXVideoTransformerBlock, hidden_states, encoder_hidden_states, temb,
                   image_rotary_emb=None, encoder_attention_mask=None):
    """LTXVideoTransformerBlock.forward with the gated residuals on ``gated_residual``."""
    backend = self._dit_fast_backend
    batch_size = hidden_states.size(0)
    num_ada_params = self.scale_shift_table.shape[0]
    ada_values = self.scale_shift_table[None, None].to(temb.device) + temb.reshape(
        batch_size, temb.size(1), num_ada_params, -1)  # (B, T, 6, C): T = 1 or one per token
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada_values.unbind(dim=2)

    norm_hidden_states = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
    attn_hidden_states = self.attn1(hidden_states=norm_hidden_states, encoder_hidden_states=None,
                                    image_rotary_emb=image_rotary_emb)
    hidden_states = P.gated_residual(hidden_states, P.per_sample(gate_msa), attn_hidden_states, backend)

    attn_hidden_states = self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states, image_rotary_emb=None,
                                    attention_mask=encoder_attention_mask)
    hidden_states = hidden_states + attn_hidden_states
    norm_hidden_states = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
    ff_output = self.ff(norm_hidden_states)
    return P.gated_residual(hidden_states, P.per_sample(gate_mlp), ff_output, backend)


def patch(model: LTXVideoTransformer3DModel, backend: str = "auto") -> LTXVideoTransformer3DModel:
    attention = [m for m in model.modules() if isinstance(getattr(m, "processor", None), LTXVideoAttnProcessor)]
    processors = P.set_processors(attention, lambda attn: LTXProcessor(attn.processor, backend))
    blocks = [b for b in model.transformer_blocks if type(b) is LTXVideoTransformerBlock]
    for block in blocks:
        P.replace_forward(block, _block_forward, backend)
    return P.finish(model, {"processors": processors, "blocks": len(blocks)})
