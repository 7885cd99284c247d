"""LTX-2 (``LTX2VideoTransformer3DModel``, audio + video): processors.

Attention (LTX2AudioVideoAttnProcessor, and LTX2PerturbedAttnProcessor when the model is built with
``perturbed_attn``): RMSNorm over all heads (norm_q / norm_k), LTX-2's RoPE with the model's own
tables (fractional, fps-scaled positions, interleaved or split layout, separate query and key tables
for the audio <-> video cross-attention: not apply_rope_3d's convention), then every attention of the
block (video and audio self-attention, their text cross-attention, audio-to-video and video-to-audio)
on dit_fast's kernels; the text masks (LTX's additive 0 / -10000, per head after
``prepare_attention_mask``) as key-padding masks; LTX-2.3's per-head output gates and the perturbed
(skip-attention) guidance kept.
Blocks: LTX-2 normalises with RMSNorm, which the LayerNorm adaLN ops do not compute: they stay diffusers'.
"""

import torch
from diffusers.models.transformers.transformer_ltx2 import (LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor,
                                                            LTX2VideoTransformer3DModel, apply_interleaved_rotary_emb,
                                                            apply_split_rotary_emb)

from dit_fast.integrations.diffusers import _processor as P

_ROTATE = {"interleaved": apply_interleaved_rotary_emb, "split": apply_split_rotary_emb}


class LTX2Processor(P.DitFastProcessor):
    """LTX2AudioVideoAttnProcessor / LTX2PerturbedAttnProcessor on dit_fast's attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None
                                          else encoder_hidden_states).shape
        # (B, 1, L) additive -> (B, heads, 1, L), as diffusers prepares it
        attention_mask = P.prepared_mask(attn, attention_mask, sequence_length, batch_size)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None  # (B, S, heads)

        value = attn.to_v(encoder_hidden_states)
        if all_perturbed is None:
            all_perturbed = bool(torch.all(perturbation_mask == 0)) if perturbation_mask is not None else False
        if all_perturbed:  # perturbed guidance: the attention is skipped, its output is the value projection
            hidden_states = value
        else:
            query = attn.norm_q(attn.to_q(hidden_states))
            key = attn.norm_k(attn.to_k(encoder_hidden_states))
            if query_rotary_emb is not None:
                rotate = _ROTATE[attn.rope_type]
                query = rotate(query, query_rotary_emb)
                key = rotate(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
            query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # (B, S, heads, D)
            hidden_states = self.attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
            if perturbation_mask is not None:
                hidden_states = torch.lerp(value.flatten(2, 3), hidden_states, perturbation_mask)

        if gate_logits is not None:  # per-head output gates, 1 when the logits are 0
            gates = 2.0 * torch.sigmoid(gate_logits)  # (B, S, heads)
            hidden_states = (hidden_states.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def patch(model: LTX2VideoTransformer3DModel, backend: str = "auto") -> LTX2VideoTransformer3DModel:
    replaced = (LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor)
    attention = [m for m in model.modules() if type(getattr(m, "processor", None)) in replaced]
    processors = P.set_processors(attention, lambda attn: LTX2Processor(attn.processor, backend))
    return P.finish(model, {"processors": processors, "blocks": 0})
