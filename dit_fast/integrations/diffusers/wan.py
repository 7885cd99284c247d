"""The Wan family: Wan 2.1 / 2.2, VACE, Animate, SkyReels-V2, ChronoEdit: processors and blocks.

Attention (WanAttnProcessor and its copies): RMSNorm over all heads (the model's norm_q / norm_k),
Wan's 3D RoPE (theta 10000, split d_h = d_w = 2 (D // 6), d_t the rest, interleaved pairs: dit_fast's
default convention) through apply_rope_3d, attention on the dit_fast backend; I2V's image keys included.
Blocks (WanTransformerBlock and its copies): FP32LayerNorm + modulation -> layernorm_modulate; gated
residual -> gated_residual; the cross-attention residual + norm3 + modulation ->
residual_layernorm_modulate. Modulation per sample (B, 6, C), or per token (B, S, 6, C) for Wan 2.2
TI2V's per-token timesteps: one adaLN group per token.

The variants reuse Wan's blocks and RoPE (or diffusers' copies of them); PLANS says what each adds:
  VACE         Wan's blocks + WanVACETransformerBlock (the control branch: proj_in, the same block
               math on the control tokens, proj_out);
  Animate      diffusers' copies of Wan's block and processor; the face adapter keeps its own processor,
               its dispatcher calls on the dit_fast backend;
  SkyReels-V2  its block takes the self-attention mask (diffusion forcing's block-causal mask over
               frames: diffusers' native attention, warned by the backend) and per-token modulation as
               (B, 6, S, C);
  ChronoEdit   RoPE from the model's own tables: for a 2-frame input its temporal positions are 0 and
               temporal_skip_len - 1 (not a grid), and its split is D - 2 (D // 3), D // 3, D // 3.
"""

from typing import Callable, Dict, NamedTuple, Tuple

import torch
from diffusers.models.transformers import transformer_chronoedit as chronoedit
from diffusers.models.transformers import transformer_skyreels_v2 as skyreels_v2
from diffusers.models.transformers import transformer_wan_animate as wan_animate
from diffusers.models.transformers.transformer_wan import (WanAttention, WanAttnProcessor, WanTransformer3DModel,
                                                           WanTransformerBlock, _get_added_kv_projections,
                                                           _get_qkv_projections)
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock

from dit_fast.integrations import diffusers_model_name
from dit_fast.integrations.diffusers import _processor as P
from dit_fast.integrations.diffusers.backend import backend_member

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


def _wan_block(self, hidden_states, encoder_hidden_states, mods, rotary_emb, attention_mask=None):
    """The Wan block's math on the fused adaLN ops (same math, fp32 statistics and residuals); ``mods``:
    shift, scale, gate of the self-attention, then of the feed-forward, each (B, C) or per token (B, S, C)."""
    backend = self._dit_fast_backend
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods

    # 1. self-attention
    norm_hidden_states = P.layernorm_modulate(self.norm1, hidden_states, shift_msa, scale_msa, backend)
    attn_output = self.attn1(norm_hidden_states, None, attention_mask, rotary_emb)
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


def _block_forward(self: WanTransformerBlock, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """WanTransformerBlock.forward (and Wan-Animate's and ChronoEdit's copies) on the fused adaLN ops."""
    if temb.ndim == 4:  # (B, S, 6, C): Wan 2.2 TI2V, one modulation per token
        mods = (self.scale_shift_table.unsqueeze(0) + temb.float()).unbind(2)  # 6 x (B, S, C)
    else:  # (B, 6, C)
        mods = (self.scale_shift_table + temb.float()).unbind(1)  # 6 x (B, C)
    return _wan_block(self, hidden_states, encoder_hidden_states, mods, rotary_emb)


def _skyreels_block_forward(self: skyreels_v2.SkyReelsV2TransformerBlock, hidden_states, encoder_hidden_states, temb,
                            rotary_emb, attention_mask):
    """SkyReelsV2TransformerBlock.forward: Wan's block with a self-attention mask; diffusion forcing's
    per-token modulation comes as (B, 6, S, C)."""
    if temb.dim() == 4:  # (B, 6, S, C)
        mods = (self.scale_shift_table.unsqueeze(2) + temb.float()).unbind(1)  # 6 x (B, S, C)
    else:  # (B, 6, C)
        mods = (self.scale_shift_table + temb.float()).unbind(1)  # 6 x (B, C)
    return _wan_block(self, hidden_states, encoder_hidden_states, mods, rotary_emb, attention_mask)


def _vace_block_forward(self: WanVACETransformerBlock, hidden_states, encoder_hidden_states, control_hidden_states,
                        temb, rotary_emb):
    """WanVACETransformerBlock.forward: Wan's block math on the control tokens -> (hint or None, control)."""
    if self.proj_in is not None:  # the first control block adds the video tokens to its projected input
        control_hidden_states = self.proj_in(control_hidden_states) + hidden_states  # (B, S, C)
    mods = (self.scale_shift_table + temb.float()).unbind(1)  # 6 x (B, C)
    control_hidden_states = _wan_block(self, control_hidden_states, encoder_hidden_states, mods, rotary_emb)
    conditioning_states = None if self.proj_out is None else self.proj_out(control_hidden_states)
    return conditioning_states, control_hidden_states


# ---------------------------------------------------------------------------------------------
# What each class of the family gets
# ---------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    blocks: Dict[type, Callable]  # block class -> its forward on the fused ops
    processors: Tuple[type, ...]  # diffusers processors replaced by WanProcessor
    grid_rope: bool = True  # RoPE through apply_rope_3d on the recorded grid (else the model's tables)
    keep_on_backend: Tuple[type, ...] = ()  # diffusers processors kept, their dispatcher calls on "dit_fast"


PLANS = {
    "WanTransformer3DModel": Plan({WanTransformerBlock: _block_forward}, (WanAttnProcessor,)),
    "WanVACETransformer3DModel": Plan({WanTransformerBlock: _block_forward,
                                       WanVACETransformerBlock: _vace_block_forward}, (WanAttnProcessor,)),
    "WanAnimateTransformer3DModel": Plan({wan_animate.WanTransformerBlock: _block_forward},
                                         (wan_animate.WanAttnProcessor,),
                                         keep_on_backend=(wan_animate.WanAnimateFaceBlockAttnProcessor,)),
    "SkyReelsV2Transformer3DModel": Plan({skyreels_v2.SkyReelsV2TransformerBlock: _skyreels_block_forward},
                                         (skyreels_v2.SkyReelsV2AttnProcessor,)),
    "ChronoEditTransformer3DModel": Plan({chronoedit.WanTransformerBlock: _block_forward},
                                         (chronoedit.WanAttnProcessor,), grid_rope=False),
}


def patch(model: WanTransformer3DModel, backend: str = "auto") -> WanTransformer3DModel:
    plan = PLANS[diffusers_model_name(model)]
    grid = P.record_grid(model, tuple(model.config.patch_size)) if plan.grid_rope else None
    rope_split = (model.rope.t_dim, model.rope.h_dim, model.rope.w_dim) if plan.grid_rope else None
    attention = [m for m in model.modules() if type(getattr(m, "processor", None)) in plan.processors]
    processors = P.set_processors(attention, lambda attn: WanProcessor(attn.processor, backend, grid,
                                                                       rope_theta=WAN_ROPE_THETA,
                                                                       rope_split=rope_split))
    for module in model.modules():
        if type(getattr(module, "processor", None)) in plan.keep_on_backend:
            module.processor._attention_backend = backend_member()
    blocks = [m for m in model.modules() if type(m) in plan.blocks]
    for block in blocks:
        P.replace_forward(block, plan.blocks[type(block)], backend)
    return P.finish(model, {"processors": processors, "blocks": len(blocks)})
