"""diffusers' generic ``AttnProcessor2_0``, which calls SDPA itself, on dit_fast's attention.

``AttnProcessor`` computes what ``AttnProcessor2_0`` computes (spatial / group norm, 4-D inputs, the
cross-attention norm, per-head qk-norm, ``prepare_attention_mask``'s masks, residual connection and
output rescale) with the attention through the dit_fast backend. Latte runs on it as it is; Allegro
passes its RoPE (``rotate``: a function of the (B, heads, S, D) query or key and the rotary tables,
applied to self-attention only, as AllegroAttnProcessor2_0 does).
"""

from typing import Callable, Optional

from dit_fast.integrations.diffusers import _processor as P


class AttnProcessor(P.DitFastProcessor):
    """AttnProcessor2_0 (or, with ``rotate``, AllegroAttnProcessor2_0) on dit_fast's attention."""

    def __init__(self, original, backend: str = "auto", rotate: Optional[Callable] = None):
        super().__init__(original, backend)
        self.rotate = rotate  # a module-level function (a patched model pickles)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_rotary_emb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, H W, C)
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None
                                          else encoder_hidden_states).shape
        # -> (B, heads, 1 or Sq, Sk), as diffusers prepares it for SDPA
        attention_mask = P.prepared_mask(attn, attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.unflatten(2, (attn.heads, head_dim)) for t in (query, key, value))  # (B, S, heads, D)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.rotate is not None and image_rotary_emb is not None and not attn.is_cross_attention:
            query = self.rotate(query.transpose(1, 2), image_rotary_emb).transpose(1, 2)
            key = self.rotate(key.transpose(1, 2), image_rotary_emb).transpose(1, 2)

        hidden_states = self.attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
