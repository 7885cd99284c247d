"""Mochi (``MochiTransformer3DModel``): processors.

Attention (MochiAttnProcessor2_0, which loops over the batch and calls SDPA on each sample's valid
text tokens): per-head RMSNorm (norm_q / norm_k / norm_added_*), Mochi's RoPE with the model's tables
(learned per-head frequencies mixing the three axes: not apply_rope_3d's convention), then one
batched joint attention over [video; text] with the text padding as a key-padding mask on dit_fast's
kernels. The valid text tokens are packed first, as Mochi's processor packs them (a stable sort on the
device), and padded text queries get zeros, as in Mochi.
Blocks: Mochi's adaLN is RMSNorm-based (MochiRMSNormZero, MochiModulatedRMSNorm with tanh gates),
which the LayerNorm adaLN ops do not compute: the blocks stay diffusers' own.
"""

import torch
from diffusers.models.attention_processor import MochiAttention, MochiAttnProcessor2_0

from dit_fast.integrations.diffusers import _processor as P


class MochiProcessor(P.DitFastProcessor):
    """MochiAttnProcessor2_0 as one batched attention on dit_fast's kernels."""

    def __call__(self, attn: MochiAttention, hidden_states, encoder_hidden_states, attention_mask,
                 image_rotary_emb=None):
        text_mask = attention_mask.bool()  # (B, L), True = a prompt token
        # Mochi runs each prompt's valid tokens packed first (its text rows: the valid tokens in order, then
        # zeros): a stable sort by validity gives that order on the device, with no host read of the mask
        # (so torch.compile traces it without a graph break), for a prefix mask and one with holes alike
        order = torch.sort((~text_mask).to(torch.uint8), dim=1, stable=True).indices  # (B, L)
        text_mask = torch.gather(text_mask, 1, order)  # now a prefix mask
        encoder_hidden_states = torch.gather(encoder_hidden_states, 1,
                                             order[..., None].expand_as(encoder_hidden_states))

        query, key, value = P.qkv_heads(attn, hidden_states)  # (B, N, heads, D)
        encoder_query, encoder_key, encoder_value = P.qkv_heads(attn, encoder_hidden_states, "text")
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb  # (N, heads, D / 2) per pair
            query, key = P.rotate_pairs(query, cos, sin), P.rotate_pairs(key, cos, sin)

        n_video = query.shape[1]
        query = torch.cat([query, encoder_query], dim=1)  # (B, N + L, heads, D)
        key = torch.cat([key, encoder_key], dim=1)
        value = torch.cat([value, encoder_value], dim=1)
        video_keys = torch.ones(text_mask.shape[0], n_video, dtype=torch.bool, device=text_mask.device)
        key_mask = torch.cat([video_keys, text_mask], dim=1)  # (B, N + L)
        hidden_states = self.attend(query, key, value, key_mask[:, None, None, :])
        hidden_states = hidden_states * key_mask[:, :, None, None].to(hidden_states.dtype)  # padded queries: 0
        hidden_states, encoder_hidden_states = hidden_states.flatten(2, 3).split_with_sizes(
            (n_video, hidden_states.shape[1] - n_video), dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def patch(model, backend: str = "auto"):
    attention = [m for m in model.modules() if type(getattr(m, "processor", None)) is MochiAttnProcessor2_0]
    processors = P.set_processors(attention, lambda attn: MochiProcessor(attn.processor, backend))
    return P.finish(model, {"processors": processors, "blocks": 0})
