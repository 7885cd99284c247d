"""Tiny models of every diffusers 0.42 video transformer class, shared by tests/test_diffusers_models.py,
tests/test_diffusers_drift.py and tests/test_diffusers_cp_models.py.

``build(case)`` -> (model, inputs(dtype, generator) -> forward kwargs). One block deep, 2 heads of 16
(24 for the Wan family: its RoPE cuts D into thirds of even size), a grid of a dozen or two video
tokens (partial tiles), batch 2 with the second prompt padded wherever the class takes a text mask,
every parameter perturbed so that no zero-initialised gate, table or norm hides a branch. The five
families dit_fast patched first (Wan, HunyuanVideo, LTX, CogVideoX, Mochi) come from
tests/test_diffusers.py's builders.
"""

import torch

B, TEXT = 2, 7  # TEXT is read when inputs are made: tests/test_diffusers_cp_models.py sets 8 (an even split)
T_STEPS = torch.tensor([10.0, 700.0])
GRID = (2, 4, 6)  # (F, H, W) latents; 2 x 2 spatial patches -> a 2 x 2 x 3 grid, 12 tokens


def perturb_(model, seed=0, std=0.1):
    """Adds noise to every floating parameter: zero-initialised gates, tables and norms become non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def text_mask(length=None, dtype=torch.bool, valid=4):
    """(B, length or TEXT): the second prompt is padded after ``valid`` tokens."""
    mask = torch.ones(B, TEXT if length is None else length, dtype=dtype)
    mask[1, valid:] = 0
    return mask


def video(g, dtype, channels=4, frames=GRID[0]):
    return rand(g, B, channels, frames, *GRID[1:], dtype=dtype)


def text(g, dtype, dim=16, length=None):
    return rand(g, B, TEXT if length is None else length, dim, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The Wan family: Wan's blocks and RoPE (VACE, Animate) or copies of them (SkyReels-V2, ChronoEdit)
# ---------------------------------------------------------------------------------------------


def _wan_config(**extra):
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32, **extra)


def _wan_inputs(dtype, g):
    return dict(hidden_states=video(g, dtype), timestep=T_STEPS, encoder_hidden_states=text(g, dtype))


def wan_vace():
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(**_wan_config(vace_layers=[0], vace_in_channels=8))
    return model, lambda dtype, g: dict(_wan_inputs(dtype, g), control_hidden_states=video(g, dtype, channels=8))


def wan_animate():
    from diffusers import WanAnimateTransformer3DModel

    model = WanAnimateTransformer3DModel(
        **dict(_wan_config(), in_channels=12), latent_channels=4, image_dim=16,
        motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=1)

    def inputs(dtype, g):  # 3 latent frames (a reference frame + 2 posed ones); 5 face frames -> 2 motion frames
        return dict(hidden_states=rand(g, B, 12, 3, *GRID[1:], dtype=dtype), timestep=T_STEPS,
                    encoder_hidden_states=text(g, dtype), encoder_hidden_states_image=text(g, dtype, length=5),
                    pose_hidden_states=video(g, dtype), face_pixel_values=rand(g, B, 3, 5, 16, 16, dtype=dtype))
    return model, inputs


def wan_animate_2():
    """The reference pass (kv_cache_mode="extract"): dense self-attention, text and CLIP cross-attention."""
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    model = WanAnimate2Transformer3DModel(patch_size=(1, 2, 2), text_len=TEXT + 1, in_dim=8, dim=48, ffn_dim=64,
                                          freq_dim=16, text_dim=16, out_dim=4, num_heads=2, num_layers=1)
    F_, H, W = GRID

    def inputs(dtype, g):
        return dict(hidden_states=[rand(g, 4, *GRID, dtype=dtype) for _ in range(B)], timestep=torch.tensor([1.0]),
                    encoder_hidden_states=[rand(g, TEXT, 16, dtype=dtype) for _ in range(B)],
                    condition_latents=[rand(g, 4, *GRID, dtype=dtype) for _ in range(B)],
                    encoder_hidden_states_image=rand(g, B, 3, 1280, dtype=dtype),  # MLPProj's fixed CLIP width
                    kv_cache=WanAnimate2KVCache(1), kv_cache_mode="extract", seq_len=F_ * H * W // 4,
                    offset_grid_sizes=torch.tensor([[F_, H // 2, W // 2]]))
    return model, inputs


def skyreels_v2():
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(**_wan_config()), _wan_inputs


def skyreels_v2_df():
    """Diffusion forcing: one timestep per frame and a block-causal mask over frames (num_frame_per_block 1 -> 2)."""
    from diffusers import SkyReelsV2Transformer3DModel

    model = SkyReelsV2Transformer3DModel(**_wan_config(num_frame_per_block=2))
    return model, lambda dtype, g: dict(
        hidden_states=rand(g, B, 4, 4, *GRID[1:], dtype=dtype), encoder_hidden_states=text(g, dtype),
        timestep=torch.tensor([[10.0, 10.0, 700.0, 700.0], [300.0, 300.0, 900.0, 900.0]]),
        enable_diffusion_forcing=True)


def chronoedit():
    from diffusers import ChronoEditTransformer3DModel

    return ChronoEditTransformer3DModel(**_wan_config()), _wan_inputs


# ---------------------------------------------------------------------------------------------
# HunyuanVideo 1.5 and Framepack, LTX-2, Cosmos, Cosmos-3
# ---------------------------------------------------------------------------------------------


def hunyuan_video15():
    from diffusers import HunyuanVideo15Transformer3DModel

    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
        rope_axes_dim=(4, 6, 6), target_size=16, task_type="i2v")

    def inputs(dtype, g):  # a 2 x 3 x 4 grid; mLLM text (7, padded), ByT5 text (5, padded), 3 image tokens
        return dict(hidden_states=rand(g, B, 4, 2, 3, 4, dtype=dtype), timestep=T_STEPS.to(dtype),
                    encoder_hidden_states=text(g, dtype), encoder_attention_mask=text_mask(dtype=torch.long),
                    encoder_hidden_states_2=text(g, dtype, dim=8, length=5),
                    encoder_attention_mask_2=text_mask(5, torch.long, valid=3),
                    image_embeds=text(g, dtype, dim=12, length=3))
    return model, inputs


def hunyuan_video_framepack():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)
    F_ = GRID[0]

    def inputs(dtype, g):  # the frames to denoise, one clean frame, 2x and 4x compressed history
        return dict(hidden_states=video(g, dtype), timestep=T_STEPS, encoder_hidden_states=text(g, dtype),
                    encoder_attention_mask=text_mask(dtype=torch.long), pooled_projections=rand(g, B, 8, dtype=dtype),
                    guidance=torch.tensor([3000.0, 4500.0]), image_embeds=text(g, dtype, length=3),
                    indices_latents=torch.arange(F_), latents_clean=video(g, dtype, frames=1),
                    indices_latents_clean=torch.tensor([F_]), latents_history_2x=video(g, dtype, frames=2),
                    indices_latents_history_2x=torch.arange(F_ + 1, F_ + 3),
                    latents_history_4x=rand(g, B, 4, 4, 8, 8, dtype=dtype),
                    indices_latents_history_4x=torch.arange(F_ + 3, F_ + 7))
    return model, inputs


def _ltx2_model(**extra):
    from diffusers import LTX2VideoTransformer3DModel

    return LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=16, audio_cross_attention_dim=32, num_layers=1, caption_channels=16,
        rope_double_precision=False, **extra)


def ltx2():
    model = _ltx2_model()

    def inputs(dtype, g):  # a 2 x 3 x 4 video grid and 5 audio frames, each with its padded prompt
        return dict(hidden_states=rand(g, B, 24, 4, dtype=dtype), audio_hidden_states=rand(g, B, 5, 4, dtype=dtype),
                    encoder_hidden_states=text(g, dtype), audio_encoder_hidden_states=text(g, dtype), timestep=T_STEPS,
                    encoder_attention_mask=text_mask(), audio_encoder_attention_mask=text_mask(), num_frames=2,
                    height=3, width=4, audio_num_frames=5, fps=25.0)
    return model, inputs


def ltx2_stg():
    """LTX-2.3's per-head output gates and spatio-temporal guidance: the second sample's self-attention skipped."""
    model = _ltx2_model(gated_attn=True, audio_gated_attn=True, perturbed_attn=True)
    inputs = ltx2()[1]
    return model, lambda dtype, g: dict(inputs(dtype, g), spatio_temporal_guidance_blocks=[0],
                                        perturbation_mask=torch.tensor([1.0, 0.0], dtype=dtype))


def cosmos():
    """Cosmos-2's layout: no learnable position embedding (Cosmos-1's normalises it in fp32 only, so no fp64
    oracle), no padding-mask channel (needs torchvision, not a test extra); the pipelines pass no text mask."""
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                     num_layers=1, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
                                     max_size=(4, 32, 32), patch_size=(1, 2, 2), concat_padding_mask=False,
                                     extra_pos_embed_type=None)
    return model, lambda dtype, g: dict(hidden_states=video(g, dtype), timestep=T_STEPS,
                                        encoder_hidden_states=text(g, dtype), fps=30)


def cosmos_per_frame():
    """One timestep per latent frame (Video2World's conditioning frames): per-token modulation (B, N, C)."""
    model, inputs = cosmos()
    return model, lambda dtype, g: dict(inputs(dtype, g), timestep=torch.tensor([10.0, 700.0, 300.0, 900.0]).to(
        dtype).reshape(B, 1, GRID[0], 1, 1))


def _cosmos3(kv_heads):
    from diffusers import Cosmos3OmniTransformer

    model = Cosmos3OmniTransformer(head_dim=16, hidden_act="relu2", hidden_size=32, intermediate_size=48,
                                   latent_channel=4, latent_patch_size=1, num_attention_heads=2, num_hidden_layers=1,
                                   num_key_value_heads=kv_heads, patch_latent_dim=4, qk_norm_for_text=False,
                                   rope_axes_dim=[2, 2, 4], rope_theta=1e4, vocab_size=32)
    t, h, w = 2, 2, 3
    n, und = t * h * w, 5  # 12 vision tokens after 5 text tokens, one packed sequence

    def inputs(dtype, g):
        vision = torch.arange(und, und + n)
        positions = torch.zeros(3, und + n, dtype=torch.long)
        positions[:, :und] = torch.arange(und)
        return dict(input_ids=torch.arange(1, und + 1), text_indexes=torch.arange(und), position_ids=positions,
                    und_len=und, sequence_length=und + n, vision_tokens=[rand(g, 1, 4, t, h, w, dtype=dtype)],
                    vision_token_shapes=[(t, h, w)], vision_sequence_indexes=vision, vision_mse_loss_indexes=vision,
                    vision_timesteps=torch.full((n,), 0.3), vision_noisy_frame_indexes=[torch.arange(t)])
    return model, inputs


def cosmos3():
    """Grouped-query heads as in the released model (32 query / 8 key-value heads there, 2 / 1 here)."""
    return _cosmos3(kv_heads=1)


def cosmos3_mha():
    return _cosmos3(kv_heads=2)


# ---------------------------------------------------------------------------------------------
# Kandinsky 5 / 6, Helios, MiniMax-H3, MotifVideo, Sana-Video, Sana-WM, AnyFlow
# ---------------------------------------------------------------------------------------------


def kandinsky5():
    from diffusers import Kandinsky5Transformer3DModel

    model = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                                         patch_size=(1, 2, 2), model_dim=32, ff_dim=48, num_text_blocks=1,
                                         num_visual_blocks=1, axes_dims=(4, 6, 6))
    return model, lambda dtype, g: dict(
        hidden_states=rand(g, B, *GRID, 4, dtype=dtype), encoder_hidden_states=text(g, dtype),
        timestep=T_STEPS.to(dtype), pooled_projections=rand(g, B, 8, dtype=dtype),
        visual_rope_pos=[torch.arange(n) for n in (2, 2, 3)], text_rope_pos=torch.arange(TEXT))


def kandinsky6():
    from diffusers import Kandinsky6Transformer3DModel

    model = Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
                                         patch_size=(1, 2, 2), model_dim=32, ff_dim=48, num_text_blocks=1,
                                         num_visual_blocks=1, axes_dims=(4, 6, 6), visual_cond=False, in_audio_dim=4,
                                         out_audio_dim=4, model_dim_a=32, time_dim_a=16, ff_dim_a=48,
                                         axes_dims_a=(16,))
    return model, lambda dtype, g: dict(
        hidden_states=rand(g, B, *GRID, 4, dtype=dtype), encoder_hidden_states=text(g, dtype),
        pooled_projections=rand(g, B, 8, dtype=dtype), timestep=T_STEPS,
        audio_hidden_states=rand(g, B, 5, 4, dtype=dtype),
        encoder_attention_mask=text_mask())


def kandinsky6_sr():
    """NABLA attention needs 8 x 8 token tiles: one 8 x 8 frame."""
    from diffusers import Kandinsky6SRTransformer3DModel

    model = Kandinsky6SRTransformer3DModel(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1),
                                           model_dim=32, ff_dim=48, num_visual_blocks=1, axes_dims=(4, 6, 6))
    return model, lambda dtype, g: dict(hidden_states=rand(g, B, 1, 8, 8, 9, dtype=dtype), timestep=T_STEPS)


def helios():
    from diffusers import HeliosTransformer3DModel

    model = HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                     rope_dim=(8, 8, 8))
    F_ = GRID[0]

    def inputs(dtype, g):  # the frames to denoise after short, mid (2x) and long (4x) history: 12 + 6 + 2 + 2 tokens
        return dict(hidden_states=video(g, dtype), timestep=T_STEPS, encoder_hidden_states=text(g, dtype),
                    indices_hidden_states=torch.arange(10, 10 + F_).repeat(B, 1),
                    indices_latents_history_short=torch.tensor([[9]] * B),
                    indices_latents_history_mid=torch.tensor([[8]] * B),
                    indices_latents_history_long=torch.arange(8).repeat(B, 1),
                    latents_history_short=video(g, dtype, frames=1), latents_history_mid=video(g, dtype, frames=1),
                    latents_history_long=video(g, dtype, frames=8))
    return model, inputs


def minimax_h3():
    from diffusers import MiniMaxH3Transformer3DModel

    model = MiniMaxH3Transformer3DModel(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=1,
                                        num_refiner_layers=1, ffn_dim=32, in_channels=4, audio_in_channels=6,
                                        patch_size=(1, 2, 2), text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
                                        time_embed_dim=16, rope_freq_dim=2)
    n_text, n_audio, n_video = 4, 6, 12  # one packed sequence (22 rows, an even split): text, audio, 2 x 2 x 3 video
    seq = n_text + n_audio + n_video

    def inputs(dtype, g):
        text_idx, audio_idx = torch.arange(n_text), torch.arange(n_text, n_text + n_audio)
        video_idx = torch.arange(n_text + n_audio, seq)
        tags = torch.zeros(seq, dtype=torch.long)  # 0 video, 1 text, 2 audio
        tags[text_idx], tags[audio_idx] = 1, 2
        timestep_indices = torch.zeros(seq, dtype=torch.long)
        timestep_indices[audio_idx] = 1
        positions = torch.zeros(seq, 3)
        positions[:, 0] = torch.arange(seq).float()
        positions[video_idx, 1] = (torch.arange(n_video) // 3 % 2).float()
        positions[video_idx, 2] = (torch.arange(n_video) % 3).float()
        return dict(hidden_states=rand(g, B, n_video, 16, dtype=dtype), audio_hidden_states=rand(g, B, n_audio, 6,
                                                                                             dtype=dtype),
                    encoder_hidden_states=rand(g, B, n_text, 8, dtype=dtype), timestep=torch.tensor([0.7, 0.3]),
                    timestep_indices=timestep_indices, token_tags=tags, position_ids=positions, video_indices=video_idx,
                    audio_indices=audio_idx, text_indices=text_idx)
    return model, inputs


def motif_video():
    from diffusers import MotifVideoTransformer3DModel

    model = MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                         num_layers=1, num_single_layers=1, mlp_ratio=2.0, patch_size=2,
                                         text_embed_dim=16, image_embed_dim=8, rope_axes_dim=(4, 6, 6))
    return model, lambda dtype, g: dict(hidden_states=video(g, dtype), timestep=T_STEPS.to(dtype),
                                        encoder_hidden_states=text(g, dtype),
                                        encoder_attention_mask=text_mask(dtype=torch.long),
                                        image_embeds=text(g, dtype, dim=8, length=3))


def sana_video():
    from diffusers import SanaVideoTransformer3DModel

    model = SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                        num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                        cross_attention_dim=32, caption_channels=16, sample_size=8,
                                        patch_size=(1, 2, 2), rope_max_seq_len=32)
    return model, lambda dtype, g: dict(hidden_states=video(g, dtype), encoder_hidden_states=text(g, dtype),
                                        timestep=T_STEPS, encoder_attention_mask=text_mask(dtype=torch.long))


def sana_wm():
    """Two blocks: a gated-delta-net block (linear attention) and a softmax block (softmax_every_n=2)."""
    from diffusers import SanaWMTransformer3DModel

    model = SanaWMTransformer3DModel(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
                                     patch_size=(1, 1, 1), softmax_every_n=2, linear_head_dim=16, caption_channels=8,
                                     mlp_ratio=2.0, chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2)
    F_, H, W = 4, 3, 4

    def inputs(dtype, g):  # a camera moving forward, pinhole intrinsics on the latent grid
        c2w = torch.eye(4).repeat(B, F_, 1, 1)
        c2w[..., 2, 3] = torch.arange(F_) * 0.1
        intrinsics = torch.tensor([float(W), float(H), W / 2, H / 2]).expand(B, F_, 4)
        return dict(hidden_states=rand(g, B, 4, F_, H, W, dtype=dtype),
                    timestep=torch.tensor([[[10.0] * F_], [[700.0] * F_]]),
                    encoder_hidden_states=rand(g, B, 1, TEXT, 8, dtype=dtype),
                    encoder_attention_mask=text_mask(dtype=torch.long),
                    camera_conditions=torch.cat([c2w.flatten(-2), intrinsics], -1).to(dtype),
                    chunk_plucker=rand(g, B, 8, F_, H, W, dtype=dtype))
    return model, inputs


def sana_wm_refiner():
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    model = SanaWMLTX2RefinerTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                                num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                                audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                                                audio_attention_head_dim=16, audio_cross_attention_dim=32,
                                                num_layers=1, caption_channels=16, rope_double_precision=False)
    F_, H, W = 2, 3, 4

    def inputs(dtype, g):
        rope = model.build_rotary_emb_for_absolute_positions(batch_size=B, frame_positions=list(range(F_)), height=H,
                                                             width=W, device=torch.device("cpu"), fps=24.0)
        return dict(hidden_states=rand(g, B, F_ * H * W, 4, dtype=dtype), encoder_hidden_states=text(g, dtype),
                    timestep=torch.full((B, F_ * H * W), 500.0), video_rotary_emb=tuple(r.to(dtype) for r in rope),
                    encoder_attention_mask=text_mask())
    return model, inputs


def _anyflow_config():
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)


def _anyflow_inputs(width):
    def inputs(dtype, g):  # (B, F, C, H, W) latents, per-frame flow-map timesteps t and r
        return dict(hidden_states=rand(g, B, 2, 4, 4, width, dtype=dtype), timestep=torch.tensor([[500.0, 400.0]] * B),
                    r_timestep=torch.tensor([[250.0, 200.0]] * B), encoder_hidden_states=text(g, dtype))
    return inputs


def anyflow():
    from diffusers import AnyFlowTransformer3DModel

    return AnyFlowTransformer3DModel(**_anyflow_config()), _anyflow_inputs(6)


def anyflow_far():
    from diffusers import AnyFlowFARTransformer3DModel

    model = AnyFlowFARTransformer3DModel(**_anyflow_config(), compressed_patch_size=(1, 4, 4), full_chunk_limit=3)
    inputs = _anyflow_inputs(8)
    return model, lambda dtype, g: dict(inputs(dtype, g), chunk_partition=[1, 1])


# ---------------------------------------------------------------------------------------------
# Models whose processors call SDPA themselves: EasyAnimate, Allegro, Latte, ConsisID
# ---------------------------------------------------------------------------------------------


def easyanimate():
    from diffusers import EasyAnimateTransformer3DModel

    model = EasyAnimateTransformer3DModel(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=1,
                                          num_layers=1, out_channels=4, patch_size=2, text_embed_dim=16,
                                          time_embed_dim=8)
    return model, lambda dtype, g: dict(hidden_states=video(g, dtype), timestep=T_STEPS,
                                        encoder_hidden_states=text(g, dtype))


def allegro():
    """Head dim 24: Allegro's RoPE gives each axis a third of it."""
    from diffusers import AllegroTransformer3DModel

    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    model = AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
                                      num_layers=1, cross_attention_dim=48, sample_width=8, sample_height=8,
                                      sample_frames=8, caption_channels=16)
    # the pipeline's RoPE: per-axis tables and each token's (t, h, w) position on the 2 x 2 x 3 grid
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=24, crops_coords=((0, 0), (2, 3)), grid_size=(2, 3), temporal_size=2,
        interpolation_scale=(2.2, 2.0, 2.0), device=torch.device("cpu"))
    positions = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long()).T.reshape(3, 1, -1).contiguous()

    def inputs(dtype, g):
        return dict(hidden_states=video(g, dtype), encoder_hidden_states=text(g, dtype), timestep=T_STEPS,
                    encoder_attention_mask=text_mask(dtype=torch.long),
                    image_rotary_emb=((freqs_t, freqs_h, freqs_w), tuple(positions)))
    return model, inputs


def latte():
    """Spatial blocks over each frame's 4 x 4 patches, temporal blocks over the 2 frames at each patch."""
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=16,
                                    num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=32,
                                    out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                    num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                    norm_elementwise_affine=False, norm_eps=1e-6, video_length=2)
    return model, lambda dtype, g: dict(hidden_states=rand(g, B, 4, 2, 8, 8, dtype=dtype),
                                        encoder_hidden_states=text(g, dtype), timestep=T_STEPS,
                                        enable_temporal_attentions=True)


def consisid():
    from diffusers import ConsisIDTransformer3DModel

    model = ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=6, sample_height=4, sample_frames=5, patch_size=2,
        max_text_seq_length=TEXT, cross_attn_interval=1, is_train_face=True, cross_attn_dim_head=16,
        cross_attn_num_heads=2, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2,
        LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=21, LFE_ff_mult=1, LFE_num_scale=1)
    return model, lambda dtype, g: dict(hidden_states=rand(g, B, 2, 4, 4, 6, dtype=dtype),
                                        encoder_hidden_states=text(g, dtype), timestep=T_STEPS,
                                        id_vit_hidden=[rand(g, B, 2, 2, dtype=dtype)],
                                        id_cond=rand(g, B, 2, dtype=dtype))


# ---------------------------------------------------------------------------------------------


_FIRST_FAMILIES = ("wan", "wan_per_token", "wan_i2v", "hunyuan_video", "hunyuan_video_i2v", "ltx", "cogvideox", "mochi")
BUILDERS = {name: fn for name, fn in dict(globals()).items()
            if callable(fn) and not name.startswith("_") and fn.__module__ == __name__
            and name not in ("perturb_", "rand", "text_mask", "video", "text", "build", "tensors")}


def build(case, seed=0):
    """(perturbed model, inputs(dtype, generator) -> forward kwargs) of one case; the same model in every
    process (diffusers' initialisation draws from the global generator: seeded here, then restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if case in _FIRST_FAMILIES:
            from tests.test_diffusers import build as build_first

            return build_first(case, layers=1, seed=seed)
        model, inputs = BUILDERS[case]()
    return perturb_(model, seed), inputs


def tensors(output):
    """Every tensor of a model's output (tuples, lists of per-sample tensors, nested), in order."""
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in tensors(item)]
    return []
